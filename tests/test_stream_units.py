"""The service's plain parts without sockets: PCM decoding/resampling, the session's latency
bookkeeping with an injected clock, micro-batching across sessions, abandoned speculative decodes,
and failures that must cost one utterance, not the session. ASR is faked where the test is about
the plumbing, not about Whisper."""

from __future__ import annotations

import asyncio
import threading

from collections.abc import Sequence

import numpy as np
import pytest

from streamer import protocol as P
from streamer.client import stream_audio
from streamer.config import InferenceConfig, SegmenterConfig
from streamer.infer.engine import InferenceEngine
from streamer.metrics import Metrics
from streamer.pipeline.session import PcmDecoder, Session
from streamer.infer.transcriber import Transcript

from tests.stream_util import StubAsr, WAIT_S, check_session_events, load, served


class FakeAsr(StubAsr):
    """Records each batch it is asked to decode; returns a fixed text (or raises)."""

    def __init__(self, text: str = "hello there", fail: bool = False, gate: threading.Event | None = None) -> None:
        self.text, self.fail, self.gate = text, fail, gate
        self.batches: list[int] = []

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        self.batches.append(len(audios))
        if self.fail:
            raise RuntimeError("decoder exploded")
        return [Transcript(self.text, 0.0, -0.1) for _ in audios]


def test_pcm_decoder_resamples_downmixes_and_reports_odd_bytes() -> None:
    sr = 44_100
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = (tone * 32767).astype("<i2")
    dec = PcmDecoder(sr, 1)
    out = np.concatenate([dec.decode(pcm[i : i + 4410].tobytes())[0] for i in range(0, sr, 4410)] + [dec.flush()])
    assert abs(len(out) - 16_000) <= 2  # streaming resampler: one second in, one second out
    spectrum = np.abs(np.fft.rfft(out[:16_000]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 2  # the tone survives, at the right pitch
    stereo = np.stack([pcm, np.zeros_like(pcm)], axis=1).reshape(-1)
    x, dropped = PcmDecoder(16_000, 2).decode(stereo[:1001].tobytes() + b"\x01")
    assert dropped == (1001 * 2 + 1) % 4 and len(x) == (1001 * 2 + 1) // 4
    assert np.allclose(x, (stereo[0:len(x) * 2:2] / 32768.0) / 2, atol=1e-4)  # mean of the two channels


def test_session_latency_uses_the_injected_clock() -> None:
    now = [100.0]
    session = Session("s", SegmenterConfig(), clock=lambda: now[0])
    audio = load("LJ001-0008.wav")
    ends = []
    for i in range(0, len(audio), 1600):  # 100 ms chunks, 100 ms apart on the fake clock
        now[0] += 0.1
        ends += [e for e in session.feed(audio[i : i + 1600]) if type(e).__name__ == "SpeechEnded"]
    ends += [e for e in session.flush() if type(e).__name__ == "SpeechEnded"]
    assert len(ends) == 1
    arrived = session.arrival_time(ends[0].end_s)
    assert 100.0 < arrived <= now[0]
    now[0] = arrived + 0.25
    assert session.latency_ms(ends[0].end_s) == pytest.approx(250.0, abs=0.1)
    assert [session.event(P.TRANSCRIPT, text="x")["seq"] for _ in range(3)] == [0, 1, 2]


def test_jobs_from_many_sessions_share_one_batch(tiny_model) -> None:
    """Utterances that wait together are decoded together: one ASR call for all sessions."""
    gate = threading.Event()
    asr = FakeAsr(gate=gate)
    engine = InferenceEngine(tiny_model, asr, InferenceConfig(max_batch=16, max_wait_ms=50), Metrics())
    audio = load("LJ001-0002.wav")

    async def scenario():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            blocker = engine.analyze(audio)  # occupies the thread until the gate opens
            jobs = [engine.analyze(audio) for _ in range(5)]  # five sessions' utterances queue up
            abandoned = engine.analyze(audio)
            abandoned.abandoned = True  # speech resumed: never decoded
            gate.set()
            await asyncio.wait_for(blocker.future, WAIT_S)
            results = await asyncio.wait_for(asyncio.gather(*[j.future for j in jobs]), WAIT_S)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(abandoned.future, WAIT_S)
            contexts = [engine.new_context() for _ in jobs]
            scored = await asyncio.wait_for(asyncio.gather(*[
                engine.predict(c, 0, r.encoded) for c, r in zip(contexts, results)
            ]), WAIT_S)
            again = await engine.predict(contexts[0], 1, results[1].encoded)
            return results, scored, again
        finally:
            await asyncio.to_thread(engine.stop)

    results, scored, again = asyncio.run(scenario())
    # the five queued utterances went through in one call (with or without the first); the abandoned one never
    assert sum(asr.batches) == 6 and max(asr.batches) >= 5, asr.batches
    assert all(r.transcript.text == "hello there" and r.encoded.text_vec is not None for r in results)
    assert all(s.revised is None and abs(sum(s.prediction.scores.values()) - 1) < 1e-5 for s in scored)
    assert again.utterance_id == 1 and again.revised_id == 0 and again.revised is not None  # lookahead re-score


def test_empty_transcript_masks_the_text_modality(emotion_model) -> None:
    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, FakeAsr(text="")) as app:
            return await stream_audio(app.url, load("LJ001-0004.wav"), realtime=False)

    res = asyncio.run(scenario())
    check_session_events(res.events)
    emotions = res.of_type(P.EMOTION)
    assert emotions and all(e["text_masked"] and e["modality_weights"]["text"] == 0.0 for e in emotions)
    # honest uncertainty at the checkpoint's default threshold (0.5): "low" exactly when the top score is below it
    for e in emotions + res.of_type(P.EMOTION_REVISED):
        assert e["confidence"] == (P.LOW_CONFIDENCE if max(e["scores"].values()) < 0.5 else P.OK_CONFIDENCE), e
    assert all(t["text"] == "" for t in res.of_type(P.TRANSCRIPT))


def test_a_failing_model_costs_the_utterance_not_the_session(emotion_model) -> None:
    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, FakeAsr(fail=True)) as app:
            res = await stream_audio(app.url, load("jfk.flac"), realtime=False)
            health = app.health()
            return res, health

    res, health = asyncio.run(scenario())
    errors = res.of_type(P.ERROR)
    ended = res.of_type(P.UTTERANCE_ENDED)
    assert len(ended) >= 3 and len(errors) == len(ended)
    assert all(e["code"] == P.E_INTERNAL and "decoder exploded" in e["message"] for e in errors)
    assert res.events[-1]["type"] == P.SESSION_ENDED and res.close_code == P.CLOSE_NORMAL
    assert health["status"] == "ok"


from tests.stream_util import emotion_model  # noqa: E402,F401  (session fixture)


@pytest.mark.parametrize("fmt,subtype", [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"), ("FLAC", "PCM_16"), ("WAV", "PCM_16")])
def test_files_of_every_served_format_decode_to_16k_mono(tmp_path, fmt: str, subtype: str) -> None:
    import soundfile as sf

    from streamer.sources import load_file

    audio, sr = sf.read(str(load.__globals__["SPEECH"] / "LJ001-0002.wav"), dtype="float32")
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(str(path), np.stack([audio, audio], axis=1), sr, format=fmt, subtype=subtype)  # stereo, 22.05 kHz
    x = load_file(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / 16_000 - len(audio) / sr) < 0.1


def test_missing_or_broken_files_are_clear_errors(tmp_path) -> None:
    from streamer.sources import SourceError, load_file

    with pytest.raises(SourceError, match="not found"):
        load_file(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    with pytest.raises(SourceError, match="cannot decode"):
        load_file(bad)


def test_clients_can_import_the_protocol_without_the_service() -> None:
    """`import streamer.protocol` must stay standard-library only (clients import it)."""
    import subprocess
    import sys

    code = ("import sys, streamer.protocol; heavy = [m for m in ('torch', 'websockets', 'numpy', 'model') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=str(load.__globals__["SPEECH"].parent.parent.parent))
    assert r.returncode == 0, r.stdout + r.stderr


def test_decoder_load_counts_busy_time_in_hand_jobs_and_the_mean_job(monkeypatch) -> None:
    """streamer/infer/load.py, as the engine (admission) and a remote worker (heartbeat) read it."""
    from streamer.infer import load as L

    now = [100.0]
    monkeypatch.setattr(L.time, "monotonic", lambda: now[0])
    meter = L.DecoderLoad(decoders=2, job_s=0.3)
    a = meter.begin(4)
    now[0] += 1.0
    b = meter.begin(2)
    assert (meter.busy, meter.in_hand) == (2, 6)
    assert meter.load() == 0.0  # nothing finished yet ...
    now[0] += 1.0
    assert meter.load(running=True) == pytest.approx((2.0 + 1.0) / (L.LOAD_WINDOW_S * 2))  # ... but in hand
    meter.end(a, 4)  # 2 s for 4 jobs: 0.5 s each
    assert (meter.busy, meter.in_hand) == (1, 2)
    assert meter.job_s == pytest.approx(0.8 * 0.3 + 0.2 * 0.5)
    meter.end(b, 2, counted=False)  # idle-time work: neither load nor cost
    assert meter.busy == 0 and meter.job_s == pytest.approx(0.34)
    assert meter.load() == pytest.approx(2.0 / (L.LOAD_WINDOW_S * 2))
    now[0] += L.LOAD_WINDOW_S + 0.5  # the span has left the window
    assert meter.load() == 0.0
