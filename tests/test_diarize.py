"""Speakers within one channel, without models: the start message's diarize / max_speakers, the
online clustering on synthetic voice embeddings (new speakers, stable labels, a revision,
max_speakers, a voice coming back after leaving the window), the call summary following
speaker.revised, and the terminal view's line for it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamer import protocol as P
from streamer.calls.summary import CallSummary
from streamer.pipeline.diarize import Revision, SpeakerClusters, VoiceSpace, cluster, gram_matrix

DIM = 256


def voices(n: int, seed: int = 0) -> np.ndarray:
    """n orthonormal 'speaker' directions."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((DIM, n)))
    return q.T


def utter(v: np.ndarray, rng: np.random.Generator, spread: float = 0.2) -> np.ndarray:
    x = v + spread * rng.standard_normal(DIM) / np.sqrt(DIM)
    return x / np.linalg.norm(x)


# ---- protocol ------------------------------------------------------------------------------------------
def test_start_message_diarize_fields() -> None:
    s = P.StartMessage.from_dict({"type": "start", "sample_rate": 16000, "diarize": True, "max_speakers": 3})
    assert s.diarize is True and s.max_speakers == 3
    assert json.loads(s.to_json())["diarize"] is True and json.loads(s.to_json())["max_speakers"] == 3
    plain = P.StartMessage.from_dict({"type": "start", "sample_rate": 16000})
    assert plain.diarize is False and plain.max_speakers is None
    assert "diarize" not in json.loads(plain.to_json()) and "max_speakers" not in json.loads(plain.to_json())
    assert P.StartMessage.from_dict(json.loads(P.StartMessage(diarize=True).to_json())).diarize is True
    assert P.SPEAKER_REVISED in P.EVENT_TYPES


@pytest.mark.parametrize("fields, reason", [
    ({"diarize": "yes"}, "diarize must be true or false"),
    ({"diarize": 1}, "diarize must be true or false"),
    ({"diarize": True, "max_speakers": 0}, "max_speakers"),
    ({"diarize": True, "max_speakers": 17}, "max_speakers"),
    ({"diarize": True, "max_speakers": "2"}, "max_speakers"),
    ({"diarize": True, "max_speakers": True}, "max_speakers"),
    ({"diarize": True, "max_speakers": 2.0}, "max_speakers"),
    ({"max_speakers": 2}, "sent with diarize"),
    ({"diarize": True, "channels": 2, "speakers": ["agent", "customer"]}, "one or the other"),
])
def test_start_message_refuses_bad_diarize_fields(fields: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        P.StartMessage.from_dict({"type": "start", "sample_rate": 16000, **fields})


def test_diarize_with_two_channels_downmixed_is_one_channel() -> None:
    assert P.StartMessage.from_dict({"type": "start", "sample_rate": 16000, "channels": 2, "diarize": True}).diarize


# ---- clustering ----------------------------------------------------------------------------------------
def test_a_new_voice_is_a_new_speaker_and_labels_stay_stable() -> None:
    rng = np.random.default_rng(1)
    a, b, c = voices(3)
    sc = SpeakerClusters(threshold=1.0)
    got = []
    for i, v in enumerate([a, b, a, b, b, a, c, a, c, b]):
        label, revisions = sc.add(i, utter(v, rng))
        got.append(label)
        assert revisions == []
    assert got == ["S1", "S2", "S1", "S2", "S2", "S1", "S3", "S1", "S3", "S2"]  # in order of first appearance
    assert sc.speakers == ["S1", "S2", "S3"]


def test_a_later_utterance_revises_an_earlier_one() -> None:
    """Utterance 1 sits between A and B: alone with A it joins A, but once B has spoken it is B's."""
    rng = np.random.default_rng(2)
    a, b = voices(2)
    between = (a + 1.5 * b) / np.linalg.norm(a + 1.5 * b)
    sc = SpeakerClusters(threshold=1.0)
    assert sc.add(0, a) == ("S1", [])
    assert sc.add(1, between) == ("S1", [])
    label, revisions = sc.add(2, utter(b, rng))
    assert label == "S2"
    assert revisions == [Revision(utterance_id=1, speaker="S2", previous_speaker="S1")]
    assert sc.labels == {0: "S1", 1: "S2", 2: "S2"}
    label, revisions = sc.add(3, utter(b, rng))
    assert (label, revisions) == ("S2", [])  # settled: no revision back and forth


def test_max_speakers_is_honoured() -> None:
    rng = np.random.default_rng(3)
    vs = voices(4)
    free, capped = SpeakerClusters(threshold=1.0), SpeakerClusters(threshold=1.0, max_speakers=2)
    for i in range(12):
        x = utter(vs[i % 4], rng)
        free.add(i, x)
        capped.add(i, x)
    assert len(free.speakers) == 4
    assert len(capped.speakers) == 2 and len(set(capped.labels.values())) == 2


def test_a_voice_back_after_leaving_the_window_gets_its_label_again() -> None:
    rng = np.random.default_rng(4)
    a, b = voices(2)
    sc = SpeakerClusters(threshold=1.0, window=4)
    for i in range(3):
        sc.add(i, utter(a, rng))
    for i in range(3, 8):  # A's utterances leave the window (frozen with their label)
        assert sc.add(i, utter(b, rng))[0] == "S2"
    assert sc.add(8, utter(a, rng)) == ("S1", [])
    assert [sc.labels[i] for i in range(3)] == ["S1"] * 3


def test_centering_on_the_model_mean() -> None:
    """Voices that all share one big component (like resemblyzer's positive cone) separate only
    once the component is subtracted."""
    rng = np.random.default_rng(5)
    common = voices(3)[2] * 4.0
    a, b = voices(2)
    xs = [common + (a if i % 2 else b) for i in range(6)]
    raw, centred = SpeakerClusters(threshold=1.0), SpeakerClusters(threshold=1.0, space=VoiceSpace(common))
    for i, x in enumerate(xs):
        raw.add(i, x + 0.01 * rng.standard_normal(DIM))
        centred.add(i, x + 0.01 * rng.standard_normal(DIM))
    assert len(raw.speakers) == 1 and len(centred.speakers) == 2


MOODS = voices(3, seed=7)  # directions every voice moves along with emotion (shared by all speakers)


def emotional(voice_dirs: np.ndarray, n_clips: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Clip embeddings of speakers whose voices move more with their mood than they differ from
    each other, and little in any other way."""
    return [np.stack([v + rng.standard_normal(3) @ MOODS + 0.02 * rng.standard_normal(DIM) for _ in range(n_clips)])
            for v in voice_dirs]


def test_whitening_discounts_how_one_voice_varies() -> None:
    """Two new speakers whose moods vary more than their voices differ: centring alone cannot tell
    them apart; the space whitened on training speakers who vary the same way can."""
    rng = np.random.default_rng(8)
    training = emotional(voices(8, seed=12), 30, rng)
    whitened, centred = VoiceSpace.fit(training, shrink=0.2), VoiceSpace.fit(training, shrink=1.0)
    assert whitened.whiten is not None and whitened.whiten.shape == (DIM, DIM) and centred.whiten is None
    assert np.allclose(centred.center, np.concatenate(training).mean(0))
    a, b = emotional(voices(2, seed=13), 4, rng)
    order, truth = [a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]], [0, 1] * 4

    def separated(space: VoiceSpace, threshold: float) -> bool:
        sc = SpeakerClusters(threshold=threshold, space=space)
        for i, x in enumerate(order):
            sc.add(i, x)
        got = [sc.labels[i] for i in range(len(order))]
        return len(set(got)) == 2 and all((g == got[0]) == (t == truth[0]) for g, t in zip(got, truth))

    thresholds = (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)
    assert all(separated(whitened, th) for th in thresholds)
    assert not any(separated(centred, th) for th in thresholds)


def test_voice_space_round_trip_and_checks(tmp_path) -> None:
    rng = np.random.default_rng(10)
    space = VoiceSpace.fit(emotional(voices(3, seed=14), 10, rng), shrink=0.5)
    space.save(tmp_path / "space.npz")
    back = VoiceSpace.load(tmp_path / "space.npz", DIM)
    assert back.shrink == 0.5 and np.allclose(back.center, space.center, atol=1e-6)
    assert np.allclose(back.project(np.ones(DIM)), space.project(np.ones(DIM)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(space.project(rng.standard_normal((4, DIM))), axis=1), 1.0)
    VoiceSpace(space.center).save(tmp_path / "centre.npz")
    assert VoiceSpace.load(tmp_path / "centre.npz").whiten is None
    with pytest.raises(ValueError):
        VoiceSpace.load(tmp_path / "space.npz", 128)
    with pytest.raises(ValueError):
        VoiceSpace(np.zeros(DIM), np.eye(DIM - 1))
    with pytest.raises(ValueError):
        VoiceSpace(np.full(DIM, np.nan))
    with pytest.raises(ValueError):
        VoiceSpace.fit([np.ones((3, DIM))], shrink=0.5)  # one speaker
    with pytest.raises(ValueError):
        VoiceSpace.fit(emotional(voices(2, seed=14), 5, rng), shrink=0.0)
    with pytest.raises(ValueError):
        space.project(np.ones(DIM - 1))


def test_the_shipped_voice_space_loads() -> None:
    from streamer.infer.voice import EMBEDDING_DIM, voice_space

    space = voice_space()
    assert space.center.shape == (EMBEDDING_DIM,)
    assert space.whiten is None or space.whiten.shape == (EMBEDDING_DIM, EMBEDDING_DIM)
    assert 0 < space.shrink <= 1


def test_cluster_edge_cases_and_bad_input() -> None:
    assert cluster(np.zeros((0, 0)), 1.0).tolist() == []
    assert cluster(gram_matrix(voices(1)), 1.0).tolist() == [0]
    assert cluster(gram_matrix(np.repeat(voices(2), 2, axis=0)), 1.0).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        SpeakerClusters(threshold=0)
    with pytest.raises(ValueError):
        SpeakerClusters(max_speakers=0)
    sc = SpeakerClusters()
    with pytest.raises(ValueError):
        sc.add(0, np.zeros(DIM))
    sc.add(0, voices(1)[0])
    with pytest.raises(ValueError):
        sc.add(0, voices(1)[0])  # the same utterance twice


# ---- summary and rendering -------------------------------------------------------------------------------
def emotion(uid: int, speaker: str, label: str = "joy", type_: str = P.EMOTION) -> dict:
    scores = {"neutral": 0.1, "joy": 0.1, "anger": 0.1}
    scores[label] = 0.8
    return {"type": type_, "session_id": "s", "utterance_id": uid, "label": label, "scores": scores, "speaker": speaker}


def test_call_summary_follows_speaker_revisions() -> None:
    s = CallSummary("s")
    for ev in [emotion(0, "S1"), emotion(1, "S1", "anger"),
               {"type": P.SPEAKER_REVISED, "utterance_id": 1, "speaker": "S2", "previous_speaker": "S1"},
               emotion(1, "S2", "neutral", P.EMOTION_REVISED), emotion(2, "S1")]:
        s.add(ev)
    out = s.to_dict()["speakers"]
    assert {k: [e["utterance_id"] for e in v["timeline"]] for k, v in out.items()} == {"S1": [0, 2], "S2": [1]}
    assert out["S2"]["timeline"][0]["label"] == "neutral"  # the revision found the moved entry
    s.add({"type": P.SPEAKER_REVISED, "utterance_id": 1, "speaker": "S1", "previous_speaker": "S2"})
    assert list(s.to_dict()["speakers"]) == ["S1"]  # a speaker left with no utterance is dropped


def test_renderer_shows_the_speaker_and_its_revision() -> None:
    from clients.client import Event
    from clients.render import Renderer

    r = Renderer(colour=False)

    def ev(d: dict) -> Event:
        return Event(d["type"], "s", 0, {"session_id": "s", **d})

    r.render(ev({"type": P.UTTERANCE_ENDED, "utterance_id": 0, "start_s": 1.0, "end_s": 2.5}))
    r.render(ev({"type": P.TRANSCRIPT, "utterance_id": 0, "text": "hello", "speaker": "S1"}))
    line, = r.render(ev({**emotion(0, "S1"), "modality_weights": {"speech": 0.6, "text": 0.4}}))
    assert "S1" in line and "joy" in line
    line, = r.render(ev({"type": P.SPEAKER_REVISED, "utterance_id": 0, "speaker": "S2", "previous_speaker": "S1",
                         "revised_with": 3}))
    assert "S1 → S2" in line and "00:01.0" in line


def test_a_short_odd_utterance_joins_a_speaker_a_long_one_makes_its_own() -> None:
    """Weights (the service gives seconds of voice): a 0.3 s utterance of an unheard voice is too
    little to make a speaker (its embedding is noisy) and sits with one; 4 s of it is a new speaker."""
    rng = np.random.default_rng(6)
    a, b, c = voices(3)
    for seconds, expect_new in ((0.3, False), (4.0, True)):
        sc = SpeakerClusters(threshold=3.2, cap=16.0)
        for i in range(6):
            sc.add(i, utter(a if i % 2 == 0 else b, rng), weight=4.0)
        assert sc.speakers == ["S1", "S2"]
        label, _ = sc.add(6, utter(c, rng), weight=seconds)
        assert (label == "S3") is expect_new, (seconds, label)
    with pytest.raises(ValueError):
        sc.add(7, utter(c, rng), weight=0.0)


def test_the_faster_silence_trim_matches_resemblyzers() -> None:
    """streamer.infer.voice.trim_long_silences makes the PCM bytes with numpy; it must cut exactly
    what resemblyzer's own does (real speech with pauses, tests/fixtures/speech)."""
    from resemblyzer.audio import normalize_volume
    from resemblyzer.audio import trim_long_silences as reference

    from model.features import load_audio
    from streamer.infer.voice import trim_long_silences
    from tests.conftest import SPEECH

    for name in ("jfk.flac", "noisy_pauses.flac"):
        audio = np.clip(normalize_volume(load_audio(str(SPEECH / name), sr=16_000), -30, increase_only=True), -1, 1)
        ours, theirs = trim_long_silences(audio.astype(np.float32)), reference(audio.astype(np.float32))
        assert len(ours) < len(audio) and np.array_equal(ours, theirs), name


def test_the_voice_thread_runs_at_a_lower_priority() -> None:
    import os
    import threading

    from streamer.infer.voice import lower_thread_priority

    seen = []

    def probe() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        lower_thread_priority(3)
        seen.append((before, os.getpriority(os.PRIO_PROCESS, tid)))

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    before, after = seen[0]
    assert after == min(19, before + 3)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # only that thread
