"""bench/live_accuracy.py's pure parts: RAVDESS names -> MELD labels, the stream layout, clip <->
utterance matching and the scoring of clips without an emotion event. No models, no service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.live_accuracy import (NONE, build_stream, dialogue_order, match_clips, parse_actors, parse_clip, score,
                                 weight_stats)

MELD = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


@pytest.mark.parametrize("code, native, label", [
    ("01", "neutral", "neutral"), ("02", "calm", "neutral"), ("03", "happy", "joy"), ("04", "sad", "sadness"),
    ("05", "angry", "anger"), ("06", "fearful", "fear"), ("07", "disgust", "disgust"), ("08", "surprised", "surprise"),
])
def test_ravdess_emotions_map_onto_meld_labels(code: str, native: str, label: str) -> None:
    clip = parse_clip(Path(f"Actor_23/03-01-{code}-02-01-01-23.flac"))
    assert (clip.emotion, clip.label, clip.actor, clip.intensity) == (native, label, 23, "02")


def test_names_that_are_not_speech_clips_are_refused() -> None:
    for bad in ("03-02-05-01-01-01-21.flac", "03-01-09-01-01-01-21.flac", "notes.flac", "03-01-05-01-01-21.flac"):
        with pytest.raises(ValueError):
            parse_clip(bad)
    assert parse_actors("21-24") == [21, 22, 23, 24] and parse_actors("21,23") == [21, 23] and parse_actors("22") == [22]
    with pytest.raises(ValueError):
        parse_actors("20-25")


def test_dialogue_order_takes_one_emotion_per_round() -> None:
    clips = [parse_clip(f"03-01-{e:02d}-{i:02d}-01-{r:02d}-21.flac") for e in range(1, 9) for i in (1, 2) for r in (1, 2)]
    order = dialogue_order(clips, np.random.default_rng(0))
    assert sorted(c.path.name for c in order) == sorted(c.path.name for c in clips)
    assert len({c.emotion for c in order[:8]}) == 8  # --limit 8: every emotion once
    assert [c.path for c in dialogue_order(clips, np.random.default_rng(0))] == [c.path for c in order]  # seeded


def test_stream_layout_puts_each_clip_between_gaps() -> None:
    clips = [np.full(16_000, 0.5, np.float32), np.full(8_000, -0.5, np.float32)]
    audio, spans = build_stream(clips, gap_s=1.2, noise_db=-60, rng=np.random.default_rng(0))
    assert len(audio) == 16_000 * 1.5 + 3 * 19_200
    assert spans == [(1.2, 2.2), (3.4, 3.9)]
    (s0, e0), (s1, e1) = spans
    assert np.all(audio[int(s0 * 16_000):int(e0 * 16_000)] == 0.5) and np.all(audio[int(s1 * 16_000):int(e1 * 16_000)] == -0.5)
    gap = audio[:19_200]
    assert 0.0005 < float(np.sqrt(np.mean(gap ** 2))) < 0.002  # -60 dBFS noise, not zeros


def test_utterances_go_to_the_clip_they_overlap_most() -> None:
    spans = [(1.0, 4.0), (5.0, 8.0), (9.0, 12.0), (13.0, 16.0)]
    utts = [
        (0, 0.8, 3.9),  # clip 0, exactly one
        (1, 5.2, 6.0), (2, 6.6, 7.9),  # clip 1 split in two: the longer (2) is scored
        # clip 2: nothing
        (3, 12.5, 12.7),  # in a gap: stray
        (4, 13.2, 16.5),  # clip 3
        (5, 15.9, 17.0),  # mostly after clip 3, overlapping it a little: still clip 3's (its longest is 4)
    ]
    m = match_clips(spans, utts)
    assert m.per_clip == [[0], [1, 2], [], [4, 5]]
    assert m.chosen == [0, 2, None, 4]
    assert m.stray == [3] and m.spanning == []
    # one utterance over two clips (the gap did not split them) counts for the clip it covers most
    m = match_clips([(1.0, 4.0), (4.5, 6.0)], [(7, 1.0, 5.0)])
    assert m.per_clip == [[7], []] and m.chosen == [7, None] and m.spanning == [7]


def test_a_clip_without_an_emotion_is_wrong_and_none_is_not_a_class() -> None:
    rep = score(["anger", "anger", "sadness", "neutral"], ["anger", NONE, "sadness", "joy"], MELD)
    assert rep["acc"] == pytest.approx(50.0)
    assert rep["labels"][-1] == NONE and rep["per_class"][NONE]["support"] == 0
    assert rep["wa"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)  # anger, sadness, neutral: none is left out
    assert rep["confusion"][MELD.index("anger")][-1] == 1
    with pytest.raises(ValueError, match="outside"):
        score(["anger"], ["rage"], MELD)


def test_weight_stats() -> None:
    ws = [{"speech": 0.7, "text": 0.3}, {"speech": 0.2, "text": 0.8}, {"speech": 0.6, "text": 0.4}]
    st = weight_stats(ws)
    assert st["n"] == 3 and st["speech_median"] == pytest.approx(0.6)
    assert st["speech_mean"] == pytest.approx(0.5) and st["speech_gt_text"] == pytest.approx(2 / 3)
    assert weight_stats([]) == {"n": 0}
