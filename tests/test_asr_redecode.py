"""A decode that repeats itself in the short encoder window is decoded again in Whisper's standard
30 s window (AsrConfig.compression_ratio_threshold, faster-whisper's 2.4): on a real utterance the
packaged tiny.en loops on in the 10 s window (tests/fixtures/speech/whisper_loop.flac), through the
Transcriber, the remote wire format and the service's counter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from streamer.config import AsrConfig
from streamer.infer.transcriber import Transcript
from tests.stream_util import StubAsr, WAIT_S, check_session_events, emotion_model, load, served, whisper  # noqa: F401
from tests.test_interim import interim_done
from tests.test_word_timing import check_words, to_redis

THRESHOLD = AsrConfig().compression_ratio_threshold


def decode_in(whisper, audio: np.ndarray, frames: int) -> tuple[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """(text, pooled states) of one utterance decoded alone in a window of `frames` mel frames."""
    from faster_whisper.audio import pad_or_trim

    from model.features import pool_whisper_states, whisper_decode
    from streamer.infer.transcriber import encoder_states

    enc = whisper.model.encode(pad_or_trim(whisper.model.feature_extractor(audio), frames)[None])
    text = whisper_decode(whisper.model, whisper.tokenizer, whisper.prompt, enc, 1)[0][0]  # the service's defaults
    return text, pool_whisper_states(encoder_states(enc)[0], len(audio))


@pytest.mark.slow
def test_a_looping_decode_is_decoded_again_in_the_30_s_window(whisper) -> None:  # noqa: F811
    from faster_whisper.transcribe import get_compression_ratio

    loop, plain = load("whisper_loop.flac"), load("LJ001-0002.wav")
    frames = whisper.window_frames(len(loop))
    assert frames == 1000 == whisper.window_frames(len(plain))  # both in the 10 s window
    short_text, short_states = decode_in(whisper, loop, frames)
    assert get_compression_ratio(short_text) > THRESHOLD, short_text  # why this fixture is here: "a 4% a 4% a 4% ..."
    full_text, _ = decode_in(whisper, loop, 3000)

    got, ok = whisper.transcribe([loop, plain], words=[True, False])
    assert got.redecoded and got.text == full_text and get_compression_ratio(got.text) <= THRESHOLD, got.text
    assert "4%" in got.text and len(got.text.split()) < len(short_text.split()) / 2
    check_words(got, len(loop))  # word timings from the 30 s window's alignment
    np.testing.assert_allclose(got.whisper_states, short_states, atol=1e-5)  # the states the emotion model trained on
    assert not ok.redecoded and ok.words is None and ok.text == decode_in(whisper, plain, frames)[0]
    (draft,) = whisper.transcribe([loop], redecode=[False])  # an interim draft is not worth the second decode
    assert not draft.redecoded and draft.text == short_text


def test_the_threshold_is_checked() -> None:
    assert THRESHOLD == 2.4 and AsrConfig(compression_ratio_threshold=None).compression_ratio_threshold is None
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="compression_ratio_threshold"):
            AsrConfig(compression_ratio_threshold=bad)


def test_the_remote_reply_carries_the_flag() -> None:
    from model import EncodedUtterance
    from streamer.infer.remote import parse_reply, reply_fields

    enc = EncodedUtterance(text_vec=torch.ones(4), speech_vec=None)
    for flag in (True, False):
        fields = to_redis(reply_fields(b"j", Transcript("a 4%", 0.01, -0.3, redecoded=flag), enc, 0.1, 0.02, "w1"))
        assert (b"rd" in fields) == flag
        assert parse_reply(fields, torch.device("cpu"))[1].transcript.redecoded is flag


def test_interim_drafts_are_not_decoded_again_on_either_engine(tiny_model) -> None:
    """The in-process engine passes redecode=[False] for an interim job and nothing for a final
    one; a remote job says it is interim in field i (is_interim, read by the worker's consumer)."""
    from streamer.config import InferenceConfig
    from streamer.infer.engine import InferenceEngine
    from streamer.infer.remote import is_interim, job_fields
    from streamer.metrics import Metrics

    class Recording(StubAsr):
        def __init__(self) -> None:
            self.calls: list[dict[str, object]] = []

        def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                       redecode: Sequence[bool] | None = None) -> list[Transcript]:
            self.calls.append({"n": len(audios), "redecode": None if redecode is None else list(redecode)})
            return [Transcript("hello", 0.0, -0.1) for _ in audios]

    asr = Recording()
    engine = InferenceEngine(tiny_model, asr, InferenceConfig(max_wait_ms=0), Metrics())
    audio = np.zeros(16_000, np.float32)

    async def scenario() -> None:
        engine.start()
        try:
            await asyncio.wait_for(engine.analyze(audio).future, WAIT_S)
            await interim_done(engine, audio)
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(scenario())
    assert asr.calls == [{"n": 1, "redecode": None}, {"n": 1, "redecode": [False]}]
    fields = job_fields("j", "r", audio, 0.0, interim=True)
    assert is_interim(to_redis(fields)) and not is_interim(to_redis(job_fields("j", "r", audio, 0.0)))


class RedecodingAsr(StubAsr):
    """Says every decode was decoded again (warm-up and speculative ones included)."""

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        return [Transcript("well, I don't know", 0.0, -0.1, redecoded=True) for _ in audios]


def test_the_service_counts_redecoded_utterances(emotion_model) -> None:  # noqa: F811
    """emostream_asr_redecoded_total counts utterances whose transcript was published, not decodes."""
    from streamer import protocol as P
    from streamer.client import stream_audio

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, RedecodingAsr()) as app:
            res = await stream_audio(app.url, load("jfk.flac"), realtime=False, timeout_s=WAIT_S)
            return res, app.metrics.value("emostream_asr_redecoded_total")

    res, counted = asyncio.run(scenario())
    check_session_events(res.events)
    assert len(res.of_type(P.TRANSCRIPT)) >= 3 and counted == len(res.of_type(P.TRANSCRIPT))
