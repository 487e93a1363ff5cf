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
    assert DEFAULT_CHECKPOINT.stat().st_size <= 50 * 2**20
    blob = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    cfg, state = blob["config"], blob["state_dict"]
    # the fine-tuned encoder's layers travel in fp16; its word embeddings come from the packaged model
    assert not cfg["freeze_encoder"] and cfg["encoder_layers_only"] and cfg["text_context"] == 3
    assert not any(k.startswith("text_encoder.model.embeddings.") for k in state)
    layers = [v for k, v in state.items() if k.startswith("text_encoder.model.encoder.layer.") and v.is_floating_point()]
    assert layers and all(v.dtype == torch.float16 for v in layers)
    assert 0.2 < cfg["temperature"] < 5.0 and cfg["temperature"] != 1.0  # fitted on validation
    if cfg["whisper_dim"]:
        assert cfg["whisper_model"] == "tiny.en" and any(k.startswith("whisper_proj.") for k in state)
    meta = blob["metadata"]
    assert meta["history"] and meta["speech_mode"] in ("cnn", "both") and "meld-test" in meta["scores"]


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
    recipe = json.loads((REPORTS / "recipe_report.json").read_text())
    assert recipe["split"] == "ship"
    for name, metric in (("meld-test", "wf1"), ("ravdess-heldout-sentence-clean-both", "wa")):
        rep = recipe["test"][name]
        assert {"acc", "f1", "wa", "wf1", "per_class", "speech_weight"} <= set(rep)
        assert f"**{rep[metric]:.1f}**" in card, name
    speech = json.loads((REPORTS / "speech_report.json").read_text())
    assert speech["choice"] in ("cnn", "both") and speech["split"] == "ship"
    for mode in ("cnn", "whisper", "both"):
        assert f"{speech['test'][f'ravdess-seen-sentence/{mode}/clean']['native']['wa']:.1f}" in card, mode
    # the held-out-corpus rows of the card are the committed reports' numbers
    for split, test_set in (("to-emodb", "emodb-heldout-corpus"), ("to-ravdess", "ravdess-heldout-corpus")):
        rep = json.loads((REPORTS / f"speech_report_{split}.json").read_text())
        for mode in ("cnn", "whisper", "both"):
            assert f"{rep['test'][f'{test_set}/{mode}/clean']['meld']['wf1']:.1f}" in card, (split, mode)
        for floor in ("svm-mfcc", "lr-whisper"):
            assert f"{rep['floors'][f'test/{test_set}/{floor}/clean']['meld']['wf1']:.1f}" in card, (split, floor)
    text = json.loads((REPORTS / "text_finetune.json").read_text())
    assert f"{text['test']['wf1']:.1f}" in card
    for png in ("confusion_meld-test.png", "confusion_ravdess-heldout-sentence-clean-both.png", "test_confusion_meld.png",
                "reliability_meld-test.png", "transfer.png"):
        assert (REPORTS / png).is_file(), png
