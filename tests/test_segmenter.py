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
    cfg = SegmenterConfig(split_after_s=0.0)  # the silence wait alone: pause splits would cut the glued turns
    hybrid = ends(run(Segmenter(cfg), noisy))
    webrtc = ends(run(Segmenter(replace(cfg, vad="webrtc")), noisy))
    assert len(webrtc) < len(hybrid)


def test_chunk_size_does_not_change_the_result(jfk: np.ndarray) -> None:
    a = ends(run(Segmenter(SegmenterConfig()), jfk, chunk=len(jfk)))
    b = ends(run(Segmenter(SegmenterConfig()), jfk, chunk=FRAME * 3 + 37))
    assert [(u.start_s, u.end_s, len(u.audio)) for u in a] == [(u.start_s, u.end_s, len(u.audio)) for u in b]


def test_max_length_splits_a_monologue_with_reason(noisy: np.ndarray) -> None:
    cfg = SegmenterConfig(max_utterance_s=3.0, split_after_s=0.0)
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


def test_a_long_utterance_ends_at_its_next_short_pause(noisy: np.ndarray) -> None:
    """Past split_after_s, a pause of split_pause_s ends the utterance (reason "pause"); the rest of the
    turn follows as the next utterance, from the same pause, so no audio is lost. Without the rule
    the same speech is one utterance that runs on across that pause."""
    cfg = SegmenterConfig()
    on = ends(run(Segmenter(cfg), noisy))
    off = ends(run(Segmenter(replace(cfg, split_after_s=0.0)), noisy))
    split = [u for u in on if u.reason == "pause"]
    assert split, [(u.start_s, u.end_s, u.reason) for u in on]
    assert not any(u.reason == "pause" for u in off)
    for u in split:
        assert u.end_s - u.start_s >= cfg.split_after_s
        nxt = on[on.index(u) + 1]
        assert nxt.start_s == pytest.approx(u.end_s, abs=1e-6)  # contiguous: the pause leads in the rest
        assert any(o.start_s < u.end_s < o.end_s for o in off)  # one utterance spans it without the rule
    # every utterance the rule leaves alone is cut where it was; one fewer utterance per split
    assert len(on) == len(off) + len(split)
    assert {(u.start_s, u.end_s) for u in off if not any(u.start_s <= s.end_s <= u.end_s for s in split)} <= \
        {(u.start_s, u.end_s) for u in on}


def test_a_long_turn_that_stops_ends_at_the_short_pause_and_emits_nothing_more(noisy: np.ndarray) -> None:
    """The split pause may be the end of the turn: then the silence runs on, and the continuation,
    which never heard speech, is dropped instead of becoming an empty utterance."""
    cfg = SegmenterConfig()
    long_turn = [u for u in ends(run(Segmenter(cfg), noisy)) if u.reason == "pause"][0]
    s0, s1 = int(long_turn.start_s * 16000), int(long_turn.end_s * 16000)
    audio = np.concatenate([np.zeros(8000, np.float32), noisy[s0:s1], np.zeros(32000, np.float32)])
    events = run(Segmenter(cfg), audio)
    utts = ends(events)
    assert [u.reason for u in utts] == ["pause"]
    assert sum(isinstance(e, SpeechStarted) for e in events) == 1
    assert utts[0].end_s == pytest.approx(0.5 + (s1 - s0) / 16000, abs=0.1)


def test_split_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(split_after_s=15.0)  # not below max_utterance_s
    with pytest.raises(ValueError):
        SegmenterConfig(split_pause_s=0.3)  # longer than the speculative-decode wait
    assert SegmenterConfig(split_after_s=0.0).split_after_s == 0.0  # off


def test_cli_sets_and_disables_the_split() -> None:
    from streamer.__main__ import build_parser, config_from_args

    def seg(*argv: str) -> SegmenterConfig:
        return config_from_args(build_parser().parse_args(list(argv))).segmenter

    assert seg().split_after_s == SegmenterConfig().split_after_s
    assert seg("--split-after", "0").split_after_s == 0.0
    assert seg("--split-after", "6").split_after_s == 6.0
    assert seg("--trailing-silence", "0.08").split_pause_s <= 0.08  # a shorter silence wait stays valid


def test_may_split_can_hold_a_long_turn_whole(noisy: np.ndarray) -> None:
    seg = Segmenter(SegmenterConfig())
    asked = []
    seg.may_split = lambda: asked.append(seg.position_s) or False
    whole = ends(run(seg, noisy))
    assert asked and not any(u.reason == "pause" for u in whole)  # asked at the pause, and told no
    off = ends(run(Segmenter(SegmenterConfig(split_after_s=0.0)), noisy))
    assert [(u.start_s, u.end_s) for u in whole] == [(u.start_s, u.end_s) for u in off]
