"""The bundled default checkpoint: size budget, what it stores, how it was trained, and that it
behaves like an emotion model on obvious sentences (range checks, not exact scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import DEFAULT_CHECKPOINT, MELD_LABELS, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "training" / "reports"


def test_default_checkpoint_budget_and_contents():
    assert DEFAULT_CHECKPOINT.is_file()
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 2**20
    blob = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    assert not any(k.startswith("text_encoder.") for k in blob["state_dict"])  # frozen encoder referenced
    meta = blob["metadata"]
    cfg = meta["train_config"]
    assert cfg["split"] == "official" and cfg["freeze_speech"] and cfg["acted"] and cfg["lookahead_prob"] > 0
    assert meta["val"]["wf1"] > 50 and meta["history"]


@pytest.mark.slow
def test_default_checkpoint_predicts_sensibly():
    model = load_checkpoint(device="cpu")
    assert model.config.labels == MELD_LABELS
    cases = {"I hate you! Get out of my apartment right now!": "anger",
             "Oh my God, this is the best day of my life, I love it!": "joy",
             "Okay, I'll see you tomorrow at noon.": "neutral"}
    for text, expected in cases.items():
        d = model.new_dialogue()
        for u in model.encode_utterances([text], [None]):
            d.append(u)
        pred = model.predict([(d, 0)])[0]
        assert pred.label == expected, (text, pred.scores)
        assert pred.modality_weights == {"speech": 0.0, "text": 1.0}


def test_committed_reports_match_the_model_card():
    card = (ROOT / "MODEL_CARD.md").read_text()
    for name in ("meld_official_test", "meld_paper_test", "meld_paper_dialogues_test", "emodb_7class_heldout"):
        rep = json.loads((REPORTS / f"{name}.json").read_text())
        assert {"acc", "f1", "wa", "wf1", "per_class"} <= set(rep)
        assert (REPORTS / f"{name}.png").is_file()
        assert f"**{rep['wf1' if name.startswith('meld') else 'wa']:.1f}**" in card, name
