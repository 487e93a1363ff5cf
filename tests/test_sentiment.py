"""Sentiment per utterance: the model's head (training.sentiment), `sentiment` / `sentiment_score` on
emotion events, the per-speaker trend in call summaries, and the terminal views."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
from pathlib import Path

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model import EmotionModel, load_checkpoint
from model.config import SENTIMENT_LABELS
from streamer import protocol as P
from streamer.calls.summary import CallSummary, sentiment_trend
from streamer.infer.transcriber import Transcript

from tests.stream_util import StubAsr, check_session_events, load, served

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class WordsAsr(StubAsr):
    """Fixed words for every utterance: these tests are about the fields, not about Whisper."""

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        return [Transcript("thanks, that is great", 0.0, -0.1) for _ in audios]


def _stream(model: EmotionModel) -> list[dict]:
    from streamer.client import stream_audio

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(model, WordsAsr()) as app:
            return await stream_audio(app.url, load("jfk.flac"), realtime=False)

    res = asyncio.run(scenario())
    check_session_events(res.events)
    return res.events


def test_emotion_events_carry_sentiment_and_the_summary_its_trend(tiny_config) -> None:
    torch.manual_seed(0)
    model = EmotionModel(dataclasses.replace(tiny_config, sentiment_labels=SENTIMENT_LABELS)).eval()
    events = _stream(model)
    emotions = [e for e in events if e["type"] in (P.EMOTION, P.EMOTION_REVISED)]
    assert len(emotions) >= 3 and all(e["sentiment"] in SENTIMENT_LABELS for e in emotions)
    (summary,) = [e for e in events if e["type"] == P.CALL_SUMMARY]
    (side,) = summary["speakers"].values()
    scores = [t["sentiment_score"] for t in side["timeline"]]
    assert side["sentiment"]["mean"] == pytest.approx(np.mean(scores), abs=1e-3)
    assert sum(side["sentiment"]["distribution"].values()) == pytest.approx(1.0, abs=1e-3)
    # a checkpoint without the head: no sentiment anywhere (an older model, protocol v1 unchanged)
    torch.manual_seed(0)
    plain = _stream(EmotionModel(tiny_config).eval())
    assert not [e for e in plain if "sentiment" in e]
    (summary,) = [e for e in plain if e["type"] == P.CALL_SUMMARY]
    assert all("sentiment" not in s for s in summary["speakers"].values())


def test_sentiment_trend_over_a_call() -> None:
    entries = [{"sentiment": s, "sentiment_score": v} for s, v in
               [("negative", -0.8), ("negative", -0.6), ("neutral", 0.0), ("neutral", 0.1), ("positive", 0.5), ("positive", 0.7)]]
    t = sentiment_trend(entries)
    assert t == {"distribution": {"negative": 0.3333, "neutral": 0.3333, "positive": 0.3333}, "mean": -0.0167,
                 "start": -0.7, "end": 0.6, "trend": 1.3}
    assert sentiment_trend([{"label": "joy"}]) is None
    cs = CallSummary("s")  # a revision replaces the live entry's sentiment too
    base = {"session_id": "s", "utterance_id": 0, "label": "joy", "scores": {"joy": 1.0}}
    cs.add({**base, "type": P.EMOTION, "sentiment": "negative", "sentiment_score": -0.5})
    cs.add({**base, "type": P.EMOTION_REVISED, "sentiment": "positive", "sentiment_score": 0.4})
    assert cs.to_dict()["speakers"]["speaker"]["sentiment"]["mean"] == 0.4


def test_terminal_views_show_sentiment() -> None:
    from clients.client import Event
    from clients.render import Renderer
    from streamer.client import format_event

    ev = {"type": P.EMOTION, "session_id": "s", "seq": 3, "utterance_id": 0, "label": "anger", "confidence": "ok",
          "scores": {"anger": 0.7, "neutral": 0.3}, "modality_weights": {"speech": 0.6, "text": 0.4}, "latency_ms": 400.0,
          "sentiment": "negative", "sentiment_score": -0.62}
    assert "sentiment negative -0.62" in (format_event(ev) or "")
    assert "negative -0.62" in Renderer(colour=False).render(Event.from_json(json.dumps(ev)))[0]
    old = {k: v for k, v in ev.items() if not k.startswith("sentiment")}
    assert "sentiment" not in (format_event(old) or "")
    assert "negative" not in Renderer(colour=False).render(Event.from_json(json.dumps(old)))[0]


def _small_meld(root: Path, rows: int = 90) -> Path:
    from training.datasets import read_text_file

    root.mkdir(parents=True)
    for part in ("train", "dev", "test"):
        lines = list(csv.DictReader(read_text_file(SHARED / "meld" / f"{part}_sent_emo.csv").splitlines()))[:rows]
        with open(root / f"{part}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(lines[0]))
            w.writeheader()
            w.writerows(lines)
    return root


def test_training_fits_the_head_into_the_checkpoint(tiny_checkpoint, tmp_path) -> None:
    from training import sentiment

    out, report = tmp_path / "with_sentiment.pt", tmp_path / "sentiment.json"
    rc = sentiment.main(["--meld", str(_small_meld(tmp_path / "meld")), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--report", str(report), "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["chosen"]["input"] in ("sentence", "sentence+dialogue") and rep["test"]["n"] == 90
    best = max(t["dev_wf1"] for t in rep["chosen"]["tried"])
    assert rep["dev"]["wf1"] == pytest.approx(best, abs=0.01)  # the kept head is the one chosen on dev
    model = load_checkpoint(out, device="cpu")
    assert model.config.sentiment_labels == SENTIMENT_LABELS and model.metadata["sentiment"]["wf1"] == rep["test"]["wf1"]
    assert load_checkpoint(tiny_checkpoint, device="cpu").config.sentiment_labels == ()  # --out: the input is untouched
    # the folded head reproduces the probe's predictions: the dev score recomputed from the checkpoint
    from training.datasets import load_meld
    from training.metrics import classification_report
    from training.text_finetune import previous_texts

    corpus = load_meld(tmp_path / "meld")
    dev = [i for i, u in enumerate(corpus.utterances) if u.part == "dev" and u.text]
    x = sentiment.sentence_vectors(model, [u.text for u in corpus.utterances], previous_texts(corpus, model.config.text_context), None)
    if model.config.sentiment_dialogue:
        x = np.concatenate([x, sentiment.dialogue_vectors(model, corpus, x)], axis=1)
    with torch.inference_mode():
        pred = model.sentiment_head(torch.from_numpy(x[dev])).argmax(1).numpy()
    y = [SENTIMENT_LABELS.index(corpus.utterances[i].sentiment) for i in dev]
    assert classification_report(y, pred, SENTIMENT_LABELS)["wf1"] == pytest.approx(rep["dev"]["wf1"], abs=0.01)


def test_ablations_score_every_variant_on_dev_only(tiny_checkpoint, tmp_path) -> None:
    from training import sentiment_ablations as abl

    report = tmp_path / "ablations.json"
    rc = abl.main(["--meld", str(_small_meld(tmp_path / "meld")), "--checkpoint", str(tiny_checkpoint), "--report", str(report),
                   "--cache-dir", str(tmp_path / "cache"), "--families", "lr,mlp,curve,untuned", "--mlp-epochs", "3",
                   "--threads", "1"])
    assert rc == 0
    rep = json.loads(report.read_text())
    def keys(o):  # type: ignore[no-untyped-def]
        return set(o) | {k for v in o.values() for k in keys(v)} if isinstance(o, dict) else \
            {k for v in o for k in keys(v)} if isinstance(o, list) else set()

    assert "test" not in keys(rep) and set(rep["sizes"]) == {"train", "dev"}  # MELD test is never scored
    shipped = rep["shipped_rule"]
    assert list(shipped["by_C"]) == [str(c) for c in abl.C_GRID] and shipped["dev_wf1"] == max(shipped["by_C"].values())
    assert set(rep["logistic_regression"]) == {"sentence+dialogue", "sentence+text emotion", "untuned encoder", "sentence+untuned encoder"}
    assert len(rep["mlp"]) == 8 and all(len(m["history"]) == 3 and m["dev_wf1"] == max(m["history"]) for m in rep["mlp"])
    full = rep["learning_curve"][-1]
    assert full["fraction"] == 1.0 and full["mean"] == shipped["dev_wf1"]  # the whole of train is the shipped fit
    scores = [v["dev_wf1"] for v in rep["logistic_regression"].values()] + [m["dev_wf1"] for m in rep["mlp"]]
    best = rep["best_alternative"]
    assert best["dev_wf1"] == max(scores) and best["margin_over_shipped"] == pytest.approx(max(scores) - shipped["dev_wf1"], abs=0.01)
    with pytest.raises(SystemExit):
        abl.main(["--meld", str(tmp_path / "meld"), "--families", "lr,bogus"])
