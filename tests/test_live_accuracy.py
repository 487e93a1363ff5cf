"""bench/live_accuracy.py's pure parts: RAVDESS names and EmoDB's labels.csv -> MELD labels, the
sentence filter, the dialogue order, the stream layout, clip <-> utterance matching, the scoring of
clips without an emotion event and the report's weight and confidence fields. No models, no service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.live_accuracy import (NONE, RAVDESS_SENTENCES, build_stream, confidence_stats, dialogue_order,
                                 keep_sentences, match_clips, output_paths, output_tag, parse_actors, parse_clip,
                                 parse_emodb_row, parse_speakers, ravdess_sentences, read_emodb, score, score_session,
                                 weight_stats)

MELD = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
EMODB_ROWS = [  # file,speaker,text_id,emotion,emotion_code as in EmoDB's labels.csv (decoded from the names)
    ("03a01Wa.wav", "03", "a01", "anger", "W"), ("03a01La.wav", "03", "a01", "boredom", "L"),
    ("03a01Ea.wav", "03", "a01", "disgust", "E"), ("03a01Aa.wav", "03", "a01", "fear", "A"),
    ("03a01Fa.wav", "03", "a01", "happiness", "F"), ("03a01Ta.wav", "03", "a01", "sadness", "T"),
    ("03a01Nc.wav", "03", "a01", "neutral", "N"), ("08b02Wb.wav", "08", "b02", "anger", "W"),
]
EMODB_MELD = {"anger": "anger", "boredom": "neutral", "disgust": "disgust", "fear": "fear", "happiness": "joy",
              "sadness": "sadness", "neutral": "neutral"}


def emodb_row(name: str, speaker: str, text: str, emotion: str, code: str) -> dict[str, str]:
    return {"file": name, "speaker": speaker, "text_id": text, "emotion": emotion, "emotion_code": code}


def write_emodb(root: Path, rows: list[tuple[str, ...]], missing: tuple[str, ...] = ()) -> Path:
    (root / "wav").mkdir(parents=True)
    lines = ["file,speaker,text_id,emotion,emotion_code", *(",".join(r) for r in rows)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    for r in rows:
        if r[0] not in missing:
            (root / "wav" / r[0]).write_bytes(b"")  # read_emodb checks presence only; audio is loaded later
    return root


@pytest.mark.parametrize("code, native, label", [
    ("01", "neutral", "neutral"), ("02", "calm", "neutral"), ("03", "happy", "joy"), ("04", "sad", "sadness"),
    ("05", "angry", "anger"), ("06", "fearful", "fear"), ("07", "disgust", "disgust"), ("08", "surprised", "surprise"),
])
def test_ravdess_emotions_map_onto_meld_labels(code: str, native: str, label: str) -> None:
    clip = parse_clip(Path(f"Actor_23/03-01-{code}-02-01-01-23.flac"))
    assert (clip.emotion, clip.label, clip.intensity) == (native, label, "02")
    assert (clip.corpus, clip.speaker, clip.sentence) == ("ravdess", "23", "01")
    assert parse_clip(f"03-01-{code}-01-02-02-07.wav").sentence == "02"


def test_names_that_are_not_speech_clips_are_refused() -> None:
    for bad in ("03-02-05-01-01-01-21.flac", "03-01-09-01-01-01-21.flac", "notes.flac", "03-01-05-01-01-21.flac",
                "03-01-05-01-03-01-21.flac"):  # song; emotion 09; not a name; six fields; statement 03
        with pytest.raises(ValueError):
            parse_clip(bad)
    assert parse_actors("21-24") == [21, 22, 23, 24] and parse_actors("21,23") == [21, 23] and parse_actors("22") == [22]
    with pytest.raises(ValueError):
        parse_actors("20-25")


@pytest.mark.parametrize("row", EMODB_ROWS)
def test_emodb_rows_map_onto_meld_labels(row: tuple[str, ...]) -> None:
    clip = parse_emodb_row(emodb_row(*row), Path("/data/emodb/wav"))
    name, speaker, text, emotion, _ = row
    assert clip.path == Path("/data/emodb/wav") / name
    assert (clip.corpus, clip.speaker, clip.sentence, clip.emotion) == ("emodb", speaker, text, emotion)
    assert clip.label == EMODB_MELD[emotion] and clip.intensity == ""


def test_emodb_rows_that_disagree_or_lack_columns_are_refused() -> None:
    wav = Path("wav")
    assert parse_emodb_row(emodb_row("03a01Wa.wav", "3", "a01", "anger", "W"), wav).speaker == "03"
    for bad in (emodb_row("03a01Wa.wav", "03", "a01", "anger", "L"),  # code says boredom
                emodb_row("03a01Xa.wav", "03", "a01", "surprise", "X"),  # not an EmoDB emotion
                emodb_row("03a01Wa.wav", "x3", "a01", "anger", "W")):  # speaker not a number
        with pytest.raises(ValueError):
            parse_emodb_row(bad, wav)
    with pytest.raises(ValueError, match="column"):
        parse_emodb_row({"file": "03a01Wa.wav", "speaker": "03", "emotion": "anger"}, wav)


def test_read_emodb_lists_every_clip_and_refuses_missing_files(tmp_path: Path) -> None:
    root = write_emodb(tmp_path / "emodb", EMODB_ROWS)
    clips = read_emodb(root)
    assert [c.path.name for c in clips] == [r[0] for r in EMODB_ROWS]
    assert all(c.path.parent == root / "wav" for c in clips)
    assert parse_speakers("all", (c.speaker for c in clips)) == ["03", "08"]
    with pytest.raises(ValueError, match="missing"):
        read_emodb(write_emodb(tmp_path / "gaps", EMODB_ROWS, missing=("03a01Ta.wav",)))
    with pytest.raises(ValueError, match="labels.csv"):
        read_emodb(tmp_path / "nothing")


def test_parse_speakers() -> None:
    known = ["03", "08", "09", "16"]
    assert parse_speakers("all", known) == known
    assert parse_speakers("16,3", known) == ["03", "16"] and parse_speakers("08", known) == ["08"]
    for bad in ("04", "", " , "):
        with pytest.raises(ValueError):
            parse_speakers(bad, known)


def ravdess_actor(actor: int = 21) -> list[Any]:
    """All 60 speech file names of one actor: neutral has normal intensity only."""
    return [parse_clip(f"03-01-{e:02d}-{i:02d}-{s:02d}-{r:02d}-{actor:02d}.flac")
            for e in range(1, 9) for i in ((1,) if e == 1 else (1, 2)) for s in (1, 2) for r in (1, 2)]


def test_sentence_filter_keeps_one_statement() -> None:
    clips = ravdess_actor()
    assert len(clips) == 60
    assert ravdess_sentences("both") == ("01", "02") == tuple(RAVDESS_SENTENCES)
    assert ravdess_sentences("1") == ("01",) and ravdess_sentences("2") == ("02",)
    with pytest.raises(ValueError):
        ravdess_sentences("3")
    two = keep_sentences(clips, ravdess_sentences("2"))
    assert len(two) == 30 and {c.path.name.split("-")[4] for c in two} == {"02"}
    assert keep_sentences(clips, ravdess_sentences("both")) == clips
    order = dialogue_order(two, np.random.default_rng([0, 21]))
    assert len({c.emotion for c in order[:8]}) == 8  # still one of each emotion per round
    assert {c.sentence for c in order} == {"02"}


def test_dialogue_order_takes_one_emotion_per_round() -> None:
    clips = [parse_clip(f"03-01-{e:02d}-{i:02d}-01-{r:02d}-21.flac") for e in range(1, 9) for i in (1, 2) for r in (1, 2)]
    order = dialogue_order(clips, np.random.default_rng(0))
    assert sorted(c.path.name for c in order) == sorted(c.path.name for c in clips)
    assert len({c.emotion for c in order[:8]}) == 8  # --limit 8: every emotion once
    assert [c.path for c in dialogue_order(clips, np.random.default_rng(0))] == [c.path for c in order]  # seeded


def test_dialogue_order_of_an_emodb_speaker() -> None:
    rows = [(f"03{t}{c}a.wav", "03", t, e, c) for t in ("a01", "a02", "b01")
            for c, e in (("W", "anger"), ("L", "boredom"), ("E", "disgust"), ("A", "fear"), ("F", "happiness"),
                         ("T", "sadness"), ("N", "neutral"))]
    clips = [parse_emodb_row(emodb_row(*r), Path("wav")) for r in rows]
    order = dialogue_order(clips, np.random.default_rng([0, 3]))
    assert sorted(c.path.name for c in order) == sorted(c.path.name for c in clips)
    for k in range(3):  # three rounds of the seven emotions
        assert len({c.emotion for c in order[7 * k:7 * k + 7]}) == 7


def test_output_names_keep_modes_apart(tmp_path: Path) -> None:
    assert output_tag("ravdess", "both", None) == ""
    assert output_tag("ravdess", "2", None) == "sentence2" and output_tag("emodb", "both", None) == "emodb"
    assert output_tag("emodb", "both", "emodb_v5") == "emodb_v5"
    with pytest.raises(ValueError):
        output_tag("ravdess", "both", "../x")
    assert output_paths(tmp_path, "") == (tmp_path / "live_accuracy.json", tmp_path / "live_accuracy.png")
    assert output_paths(tmp_path, "sentence2") == (tmp_path / "live_accuracy_sentence2.json",
                                                   tmp_path / "live_accuracy_sentence2.png")


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
    assert st["speech_mean"] == pytest.approx(0.5) and st["frac_speech_over_text"] == pytest.approx(2 / 3)
    assert st["speech_gt_text"] == st["frac_speech_over_text"]  # the older name, kept for earlier JSON readers
    assert weight_stats([]) == {"n": 0}


def session_events(confidence: list[str | None]) -> tuple[list[Any], list[tuple[float, float]], list[dict[str, Any]]]:
    """Four EmoDB clips, one utterance each, predicted anger, anger, joy, (no emotion event)."""
    clips = [parse_emodb_row(emodb_row(*r), Path("wav")) for r in
             (EMODB_ROWS[0], EMODB_ROWS[7], EMODB_ROWS[1], EMODB_ROWS[4])]  # anger, anger, boredom, happiness
    spans = [(1.2, 3.2), (4.4, 6.4), (7.6, 9.6), (10.8, 12.8)]
    events: list[dict[str, Any]] = []
    for uid, ((s, e), label, conf) in enumerate(zip(spans, ["anger", "anger", "joy", None], [*confidence, None])):
        events.append({"type": "utterance.ended", "utterance_id": uid, "start_s": s + 0.1, "end_s": e - 0.1})
        events.append({"type": "transcript", "utterance_id": uid, "text": "hallo"})
        if label is None:
            events.append({"type": "error", "code": "internal", "message": "x"})
            continue
        ev = {"type": "emotion", "utterance_id": uid, "label": label, "scores": {label: 0.6},
              "modality_weights": {"speech": 0.9, "text": 0.1}, "latency_ms": 12.0}
        if conf is not None:
            ev["confidence"] = conf
        events.append(ev)
    return clips, spans, events


def test_confidence_share_and_accuracy_on_the_ok_clips() -> None:
    clips, spans, events = session_events(["ok", "low", "low"])
    records, _, errors = score_session(clips, spans, events)
    assert errors == 1
    assert [r["confidence"] for r in records] == ["ok", "low", "low", None]
    assert [(r["speaker"], r["sentence"], r["true"], r["pred"]) for r in records] == [
        ("03", "a01", "anger", "anger"), ("08", "b02", "anger", "anger"), ("03", "a01", "neutral", "joy"),
        ("03", "a01", "joy", NONE)]
    st = confidence_stats(records)
    assert (st["n"], st["n_low"], st["n_ok"], st["unrated_events"]) == (3, 2, 1, 0)  # the clip without an event is unrated
    assert st["low_share"] == pytest.approx(2 / 3)
    assert st["acc_ok"] == pytest.approx(100.0) and st["acc_low"] == pytest.approx(50.0)


def test_confidence_is_null_when_events_lack_the_field() -> None:
    clips, spans, events = session_events([None, None, None])
    records, _, _ = score_session(clips, spans, events)
    assert all(r["confidence"] is None for r in records)
    st = confidence_stats(records)
    assert st["low_share"] is None and st["acc_ok"] is None and st["acc_low"] is None
    assert (st["n"], st["unrated_events"]) == (0, 3)
    assert confidence_stats([]) == {"n": 0, "n_low": 0, "n_ok": 0, "low_share": None, "acc_ok": None, "acc_low": None,
                                    "unrated_events": 0, "familiar_known": 0, "unfamiliar_share": None,
                                    "acc_familiar": None, "acc_unfamiliar": None}


def test_familiar_voice_share_and_accuracy_on_each_side() -> None:
    records = [{"pred": p, "true": t, "confidence": "ok", "familiar_voice": f}
               for p, t, f in (("anger", "anger", True), ("joy", "anger", True), ("anger", "neutral", False), ("sadness", "sadness", None))]
    st = confidence_stats(records)
    assert st["familiar_known"] == 3 and st["unfamiliar_share"] == pytest.approx(1 / 3)
    assert st["acc_familiar"] == pytest.approx(50.0) and st["acc_unfamiliar"] == pytest.approx(0.0)
