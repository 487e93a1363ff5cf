"""bench/pause_split.py's comparison of the two runs (no service needed: rows built here)."""

from __future__ import annotations

from bench.pause_split import compare, rows


def test_rows_join_the_events_of_each_utterance() -> None:
    events = [{"type": "utterance.ended", "utterance_id": 0, "start_s": 0.0, "end_s": 8.5, "reason": "pause"},
              {"type": "transcript", "utterance_id": 0, "text": " In the world."},
              {"type": "emotion", "utterance_id": 0, "label": "anger", "scores": {"anger": 0.7, "joy": 0.3}, "confidence": "ok"}]
    assert rows(events) == [{"utterance_id": 0, "start_s": 0.0, "end_s": 8.5, "reason": "pause", "text": "In the world.",
                             "label": "anger", "top_score": 0.7, "confidence": "ok"}]


def test_compare_finds_the_turns_the_split_cut_and_scores_words() -> None:
    off = [{"start_s": 0.0, "end_s": 2.0, "reason": "silence", "text": "Hello there.", "label": "joy"},
           {"start_s": 2.5, "end_s": 12.0, "reason": "silence", "text": "in the world if at all", "label": "anger"}]
    on = [off[0],
          {"start_s": 2.5, "end_s": 10.6, "reason": "pause", "text": "in the world.", "label": "anger"},
          {"start_s": 10.6, "end_s": 12.0, "reason": "silence", "text": "If at all.", "label": "joy"}]
    res = compare(on, off, "hello there in the world if at all")
    assert res["utterances"] == {"split_on": 3, "split_off": 2} and res["pause_splits"] == 1
    assert res["split_part_seconds"] == [8.1]
    assert res["word_edits_on_vs_off"] == 0 and res["wer"]["split_on"] == 0.0 == res["wer"]["split_off"]
    turn, = res["turns_cut"]
    assert turn["whole"] is off[1] and [p["reason"] for p in turn["parts"]] == ["pause", "silence"]
    assert (turn["label_whole"], turn["labels_parts"], turn["word_edits"]) == ("anger", ["anger", "joy"], 0)
    assert compare(off, off, None)["turns_cut"] == [] and "wer" not in compare(off, off, None)


def test_write_report_writes_the_json_and_the_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from bench.provenance import write_report

    write_report(tmp_path / "out", "x", {"a": 1}, lambda report, png: png.write_text(str(report["a"])))
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"a": 1}
    assert (tmp_path / "out" / "x.png").read_text() == "1"
