"""The segmenter on real speech: clean (jfk.flac) and in background noise (noisy_pauses.flac).

noisy_pauses.flac (the first 30 s of Silero's test recording) was labelled by listening/Silero:
speech with pauses of 0.5-2 s at about 2.2, 6.9-8.9 and 15.8-16.3 s. webrtcvad alone glues
sentences there; the default hybrid VAD must cut at each of them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from streamer.config import SegmenterConfig
from streamer.pipeline.segmenter import FRAME, Segmenter, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted

from tests.stream_util import SPEECH


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    from model.features import load_audio

    return load_audio(str(SPEECH / "jfk.flac"))


@pytest.fixture(scope="module")
def noisy() -> np.ndarray:
    from model.features import load_audio

    return load_audio(str(SPEECH / "noisy_pauses.flac"))


def run(seg: Segmenter, audio: np.ndarray, chunk: int = 1600) -> list:
    events = []
    for i in range(0, len(audio), chunk):
        events += seg.feed(audio[i : i + chunk])
    return events + seg.flush()


def ends(events: list) -> list[SpeechEnded]:
    return [e for e in events if isinstance(e, SpeechEnded)]


def test_silence_and_noise_give_no_utterance() -> None:
    rng = np.random.default_rng(0)
    silence = np.zeros(16000 * 5, np.float32)
    noise = (0.05 * rng.standard_normal(16000 * 5)).astype(np.float32)
    hum = (0.2 * np.sin(2 * np.pi * 50 * np.arange(16000 * 5) / 16000)).astype(np.float32)
    for audio in (silence, noise, hum):
        assert run(Segmenter(SegmenterConfig()), audio) == []


def test_clean_speech_splits_at_pauses(jfk: np.ndarray) -> None:
    events = run(Segmenter(SegmenterConfig()), jfk)
    utts = ends(events)
    # "And so my fellow Americans, | ask not | what your country can do for you, | ask what you ..."
    assert len(utts) == 4
    assert [u.index for u in utts] == [0, 1, 2, 3]
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert [s.index for s in starts] == [0, 1, 2, 3]
    for u in utts:
        assert 0 <= u.start_s < u.end_s <= len(jfk) / 16000 + 1e-6
        assert 0.3 < len(u.audio) / 16000 < 5
    assert all(a.end_s < b.start_s for a, b in zip(utts, utts[1:]))
    assert utts[-1].reason == "end_of_stream"  # the file stops 0.5 s after the last word: flushed, not lost


def test_noisy_speech_splits_at_every_half_second_pause(noisy: np.ndarray) -> None:
    utts = ends(run(Segmenter(SegmenterConfig()), noisy))
    bounds = [(u.start_s, u.end_s) for u in utts]
    for pause in (2.3, 7.5, 16.0):  # inside a real pause: no utterance may span it
        assert not any(s < pause < e for s, e in bounds), (pause, bounds)
    assert 5 <= len(utts) <= 9, bounds
    assert max(e - s for s, e in bounds) <= 15.0 + 0.05


def test_webrtcvad_alone_glues_sentences_in_noise(noisy: np.ndarray) -> None:
    """Why the default is hybrid: webrtcvad hears the noise as speech and misses pauses."""
    hybrid = ends(run(Segmenter(SegmenterConfig()), noisy))
    webrtc = ends(run(Segmenter(SegmenterConfig(vad="webrtc")), noisy))
    assert len(webrtc) < len(hybrid)


def test_chunk_size_does_not_change_the_result(jfk: np.ndarray) -> None:
    a = ends(run(Segmenter(SegmenterConfig()), jfk, chunk=len(jfk)))
    b = ends(run(Segmenter(SegmenterConfig()), jfk, chunk=FRAME * 3 + 37))
    assert [(u.start_s, u.end_s, len(u.audio)) for u in a] == [(u.start_s, u.end_s, len(u.audio)) for u in b]


def test_max_length_splits_a_monologue_with_reason(noisy: np.ndarray) -> None:
    cfg = SegmenterConfig(max_utterance_s=3.0)
    events = run(Segmenter(cfg), noisy)
    utts = ends(events)
    assert any(u.reason == "max_length" for u in utts)
    assert all(len(u.audio) / 16000 <= 3.0 + 0.1 + cfg.tail_pad_s for u in utts)
    split = [u for u in utts if u.reason == "max_length"][0]
    nxt = utts[utts.index(split) + 1]
    assert nxt.start_s == pytest.approx(split.end_s, abs=1e-6)  # contiguous: no audio lost


def test_short_blips_are_dropped() -> None:
    from model.features import load_audio

    word = load_audio(str(SPEECH / "LJ001-0008.wav"))[: int(0.2 * 16000)]  # 0.2 s of a real word
    audio = np.concatenate([np.zeros(16000, np.float32), word, np.zeros(16000, np.float32)])
    assert ends(run(Segmenter(SegmenterConfig(min_utterance_s=0.5)), audio)) == []


def test_pre_roll_and_tail_pad_frame_the_speech(jfk: np.ndarray) -> None:
    cfg = SegmenterConfig()
    lead = np.zeros(16000 * 2, np.float32)
    utts = ends(run(Segmenter(cfg), np.concatenate([lead, jfk])))
    first = utts[0]
    # the onset is detected after a few speech frames; the pre-roll reaches back before it
    assert 2.0 - 0.05 <= first.start_s + cfg.pre_roll_s
    assert first.start_s <= 2.2
    dur = len(first.audio) / 16000
    assert dur == pytest.approx(first.end_s - first.start_s + cfg.tail_pad_s, abs=FRAME / 16000 + 1e-6)


def test_speculative_audio_equals_final_audio(jfk: np.ndarray) -> None:
    """SpeechPaused hands out exactly the audio SpeechEnded later carries (so its decode is reused),
    or is withdrawn by SpeechResumed."""
    events = run(Segmenter(SegmenterConfig()), jfk)
    paused: dict[int, SpeechPaused] = {}
    reused = 0
    for e in events:
        if isinstance(e, SpeechPaused):
            paused[e.index] = e
        elif isinstance(e, SpeechResumed):
            paused.pop(e.index)
        elif isinstance(e, SpeechEnded) and e.index in paused:
            assert np.array_equal(paused.pop(e.index).audio, e.audio)
            reused += 1
    assert reused >= 2


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(vad="nope")
    with pytest.raises(ValueError):
        replace(SegmenterConfig(), min_utterance_s=20.0)
