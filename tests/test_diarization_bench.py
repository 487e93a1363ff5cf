"""The pure parts of bench/diarization.py: the folds, the scoring and the cross-validation that
chooses the voice space's whitening (synthetic embeddings; the bench itself needs the corpora)."""

from __future__ import annotations

import numpy as np

from bench.diarization import (Embedded, Turn, cross_validate, mapped_accuracy, paired_added_ms, score_conversation,
                               speaker_folds)
from tests.test_diarize import emotional, voices


def test_speaker_folds_halve_each_corpus() -> None:
    names = [f"A{i:02d}" for i in range(1, 21)] + ["E03", "E08", "E09", "E10", "E11", "E12"]
    first, second = speaker_folds(names)
    assert first.isdisjoint(second) and first | second == set(names)
    assert sorted(first) == [f"A{i:02d}" for i in range(1, 11)] + ["E03", "E08", "E09"]


def test_mapped_accuracy_uses_the_best_one_to_one_mapping() -> None:
    assert mapped_accuracy(["a", "a", "b", "b"], ["S2", "S2", "S1", "S1"]) == 1.0
    assert mapped_accuracy(["a", "a", "b", "b"], ["S1", "S1", "S1", "S1"]) == 0.5
    assert mapped_accuracy(["a", "b"], ["S1", None]) == 0.5  # no label is wrong


def test_score_conversation_keeps_every_utterances_labels() -> None:
    """Two turns, the second split by the VAD; the split's first half was first called S1 and
    revised to S2: the scores and the per-utterance rows say so."""
    turns = [Turn("A21", np.zeros(16_000, np.float32)), Turn("JFK", np.zeros(32_000, np.float32))]
    spans = [(1.0, 2.0), (3.0, 5.0)]
    events = [
        {"type": "utterance.ended", "utterance_id": 0, "start_s": 0.9, "end_s": 2.1},
        {"type": "transcript", "utterance_id": 0, "speaker": "S1"},
        {"type": "utterance.ended", "utterance_id": 1, "start_s": 2.9, "end_s": 3.8},
        {"type": "transcript", "utterance_id": 1, "speaker": "S1"},
        {"type": "utterance.ended", "utterance_id": 2, "start_s": 4.2, "end_s": 5.1},
        {"type": "transcript", "utterance_id": 2, "speaker": "S2"},
        {"type": "speaker.revised", "utterance_id": 1, "speaker": "S2", "previous_speaker": "S1"},
    ]
    r = score_conversation(turns, spans, events)
    assert (r["utterances"], r["turns_split"], r["revisions"], r["labels_used"]) == (3, 1, 1, 2)
    assert (r["correct_final"], r["correct_live"]) == (3, 2)
    assert r["labels"] == [
        {"utterance_id": 0, "turn": 0, "start_s": 0.9, "end_s": 2.1, "true": "A21", "live": "S1", "final": "S1"},
        {"utterance_id": 1, "turn": 1, "start_s": 2.9, "end_s": 3.8, "true": "JFK", "live": "S1", "final": "S2"},
        {"utterance_id": 2, "turn": 1, "start_s": 4.2, "end_s": 5.1, "true": "JFK", "live": "S2", "final": "S2"},
    ]


def test_cross_validation_prefers_whitening_where_moods_hide_voices() -> None:
    rng = np.random.default_rng(3)
    names = [f"A{i:02d}" for i in range(1, 9)] + [f"E{i:02d}" for i in range(1, 9)]
    clips = dict(zip(names, emotional(voices(len(names), seed=21), 24, rng)))
    folds = speaker_folds(names)
    convs = []
    for fold, members in enumerate(folds):
        members = sorted(members)
        for k in range(4):
            who = [members[k], members[k + 4]]
            turns = [who[t % 2] for t in range(8)]
            idx = rng.choice(24, 8, replace=False)
            convs.append(Embedded(fold, 2, turns, np.stack([clips[w][i] for w, i in zip(turns, idx)]), [2.0] * 8))
    thresholds = [0.5, 1.0, 1.5, 2.0, 3.0]
    whitened, centred = (cross_validate(clips, folds, convs, s, [16.0], thresholds) for s in (0.2, 1.0))
    assert [f["held_out_fold"] for f in whitened["folds"]] == [0, 1]
    assert whitened["mean_acc_final"] > 0.95
    assert centred["mean_acc_final"] < whitened["mean_acc_final"] - 0.1


def test_jfk_is_cut_into_its_phrases() -> None:
    """The real-speech voice with one recording is cut at the pauses the service's segmenter finds,
    so its turns stay within the bench's 1-8 s (librosa.effects.split at 35 dB found none in it)."""
    from bench.diarization import DATA, SR, phrases, trimmed

    jfk = trimmed(DATA / "speech" / "jfk.flac")
    pieces = phrases(jfk)
    assert len(pieces) == 4
    assert all(0.8 * SR <= len(p) <= 3.0 * SR for p in pieces)
    assert sum(len(p) for p in pieces) >= 0.7 * len(jfk)


def test_paired_added_latency_matches_each_utterance_with_itself() -> None:
    row = lambda conv, uid, ms: {"conversation": conv, "utterance_id": uid, "client_ms": ms}  # noqa: E731
    latency = {"off": [row("2-0", 0, 500.0), row("2-0", 1, 700.0), row("3-0", 0, 505.0)],
               "on": [row("2-0", 0, 510.0), row("2-0", 1, 730.0), row("3-0", 0, 505.0), row("3-0", 7, 900.0)]}
    got = paired_added_ms(latency)
    assert got["pairs"] == 3  # utterance 7 was not streamed with diarize off: no pair
    assert got["median_ms"] == 10.0 and got["mean_ms"] == 40.0 / 3
