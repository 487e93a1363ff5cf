"""The CPU training recipe (training/recipe.sh) end to end on tiny data: stage 1 fine-tunes the tiny
test encoder (tests/conftest.py) on a MELD subset with past context, stage 2 trains the speech branch
on a fake RAVDESS of tones (3 actors: train / val / test) with the packaged Whisper tiny.en, stage 3
trains the dialogue GRU + fusion on both and calibrates; the checkpoint then serves and evaluates
(`python -m training evaluate`, whose encoder reads earlier utterances)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model import MELD_LABELS, load_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MELD_DIR = ROOT.parent / "shared" / "data" / "meld"
SR = 16_000
CTX = "\x1e"  # training/cache.py joins a text and its context with this in the text-vector cache


def _fake_ravdess(root: Path) -> Path:
    """Actors 1-3, 8 emotions x 2 statements each: ~1 s FLAC tones + noise, pitch set by the emotion."""
    t = np.arange(SR) / SR
    env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.05)  # 50 ms fades, no clicks
    for actor in (1, 2, 3):
        folder = root / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emo in range(1, 9):
            for stmt in (1, 2):
                rng = np.random.default_rng(100 * actor + 10 * emo + stmt)
                f0 = 110.0 + 45.0 * emo + 5.0 * actor
                x = 0.25 * env * (np.sin(2 * np.pi * f0 * t) + 0.4 * np.sin(2 * np.pi * 2 * f0 * t))
                x += 0.01 * rng.standard_normal(t.size)
                sf.write(folder / f"03-01-{emo:02d}-02-{stmt:02d}-01-{actor:02d}.flac", x.astype(np.float32), SR)
    return root


def _small_meld(root: Path, rows_per_part: int = 40) -> Path:
    """The first rows of each official MELD part (a small evaluation set)."""
    from training.datasets import read_text_file

    root.mkdir(parents=True)
    for part in ("train", "dev", "test"):
        rows = list(csv.DictReader(read_text_file(MELD_DIR / f"{part}_sent_emo.csv").splitlines()))[:rows_per_part]
        with open(root / f"{part}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipe")


@pytest.fixture(scope="module")
def ravdess(work) -> Path:
    return _fake_ravdess(work / "ravdess")


@pytest.fixture(scope="module")
def stage1(work, tiny_encoder_dir) -> Path:
    from training import text_finetune

    out = work / "text"
    rc = text_finetune.main(["--meld", str(MELD_DIR), "--encoder", str(tiny_encoder_dir), "--max-train", "48", "--epochs", "1",
                             "--max-tokens", "32", "--context", "2", "--out", str(out), "--threads", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stage2(work, ravdess) -> Path:
    from training import speech_branch

    out = work / "speech"
    rc = speech_branch.main(["--ravdess", str(ravdess), "--out", str(out), "--cache-dir", str(work / "cache"), "--epochs", "1",
                             "--patience", "1", "--vector-epochs", "2", "--val-actors", "2", "--test-actors", "3", "--threads", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stage3(work, ravdess, stage1, stage2) -> Path:
    from training import recipe

    out = work / "recipe"
    rc = recipe.main(["--meld", str(MELD_DIR), "--ravdess", str(ravdess), "--text", str(stage1 / "encoder.pt"),
                      "--speech", str(stage2 / "speech.pt"), "--out", str(out), "--cache-dir", str(work / "cache"),
                      "--epochs", "1", "--max-meld", "24", "--val-actors", "2", "--test-actors", "3", "--threads", "1"])
    assert rc == 0
    return out


def test_stage1_text_finetune_stores_fp16_layers_without_embeddings(stage1, tiny_encoder_dir):
    blob = torch.load(stage1 / "encoder.pt", map_location="cpu", weights_only=True)
    assert blob["encoder"] == str(tiny_encoder_dir) and blob["context"] == 2 and blob["max_tokens"] == 32
    layers = blob["layers"]
    assert any(k.startswith("encoder.layer.") for k in layers)
    assert all(v.dtype == torch.float16 for v in layers.values())
    assert not [k for k in layers if k.startswith("embeddings.")]
    assert [h["epoch"] for h in blob["history"]] == [1]
    rep = json.loads((stage1 / "text_finetune.json").read_text())
    for part in ("dev", "test"):
        assert rep[part]["n"] == 48 and {"acc", "wa", "wf1", "per_class"} <= set(rep[part]), part
    assert rep["config"]["context"] == 2


def test_stage2_speech_branch_report_and_weights(stage2):
    blob = torch.load(stage2 / "speech.pt", map_location="cpu", weights_only=True)
    assert blob["mode"] in ("cnn", "both") and blob["whisper_dim"] == 768  # mean + std of tiny.en's 384
    assert blob["state"] and all(k.startswith(("speech.", "whisper_proj.", "speech_mix.")) for k in blob["state"])
    assert any(k.startswith("speech.") for k in blob["state"])
    assert (blob["mode"] == "both") == any(k.startswith("whisper_proj.") for k in blob["state"])
    assert len(blob["labels"]) == 8 and blob["head"]["weight"].shape[0] == 8
    rep = json.loads((stage2 / "speech_report.json").read_text())
    assert rep["choice"] == blob["mode"] and rep["n"] == {"train": 16, "val": 16, "test": 16}
    keys = {f"{m}/{v}" for m in ("cnn", "whisper", "both") for v in ("clean", "aug")}
    for part in ("val", "test"):
        assert set(rep[part]) == keys, part
        for key in keys:
            assert {"native", "meld"} <= set(rep[part][key]) and 0 <= rep[part][key]["native"]["wa"] <= 100
    assert rep["test"]["cnn/clean"]["native"]["n"] == 16  # one clean version per test clip
    assert [h["stage"] for h in rep["history"]] == ["cnn", "whisper", "whisper", "both", "both"]
    assert (stage2 / "test_confusion_8.png").is_file()


def test_stage3_report_and_calibrated_checkpoint(stage1, stage2, stage3, tiny_encoder_dir):
    rep = json.loads((stage3 / "recipe_report.json").read_text())
    assert [h["epoch"] for h in rep["history"]] == [1]
    for key, part_m, part_r in (("val", "dev", "val"), ("test", "test", "test")):
        names = {f"meld-{part_m}"} | {f"ravdess-{part_r}-{v}-{m}" for v in ("clean", "aug") for m in ("speech", "text", "both")}
        assert names <= set(rep[key]), key
        for name in names:
            r = rep[key][name]
            assert {"acc", "wa", "wf1"} <= set(r) and 0 <= r["wf1"] <= 100, name
            sw = r["speech_weight"]
            assert 0 <= sw["p10"] <= sw["median"] <= sw["p90"] <= 1 and 0 <= sw["mean"] <= 1, name
    assert rep["test"]["meld-test"]["n"] == 24 and rep["test"]["ravdess-test-clean-both"]["n"] == 16
    assert rep["test"]["meld-test"]["speech_weight"]["mean"] == pytest.approx(0.0, abs=1e-6)  # MELD text alone: no voice, no weight
    assert rep["test"]["ravdess-test-clean-speech"]["speech_weight"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert "pairs-meld-test-ravdess-test" in rep["test"]
    cal = rep["calibration"]
    assert cal["temperature"] > 0 and "meld-test" in cal and "ravdess-test-clean-both" in cal
    for name in ("confusion_meld-test.png", "reliability_meld-test.png", "curves.png"):
        assert (stage3 / name).is_file(), name

    model = load_checkpoint(stage3 / "model.pt", device="cpu")
    cfg = model.config
    assert cfg.encoder == str(tiny_encoder_dir) and cfg.encoder_dim == 32  # stage 1's encoder, not the packaged one
    assert cfg.text_context == 2 and cfg.max_text_tokens == 32 and cfg.encoder_layers_only
    assert cfg.temperature == pytest.approx(cal["temperature"]) and cfg.temperature > 0
    speech = torch.load(stage2 / "speech.pt", map_location="cpu", weights_only=True)
    assert model.metadata["speech_mode"] == speech["mode"]
    assert cfg.whisper_dim == (768 if speech["mode"] == "both" else 0)
    # the fine-tuned layers of stage 1 and the speech branch of stage 2 are the ones served
    layers = torch.load(stage1 / "encoder.pt", map_location="cpu", weights_only=True)["layers"]
    enc = model.text_encoder.model.state_dict()
    for k, v in layers.items():
        assert torch.equal(enc[k], v.float()), k
    own = model.state_dict()
    for k, v in speech["state"].items():
        if v.is_floating_point():
            assert torch.equal(own[k], v), k

    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    audio = (0.2 * np.sin(2 * np.pi * 250 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    states = rng.standard_normal(cfg.whisper_dim).astype(np.float32) if cfg.whisper_dim else None
    with_ctx = model.encode_utterances(["hello there"], [audio], whisper=[states], contexts=[["earlier"]])[0]
    no_ctx = model.encode_utterances(["hello there"], [audio], whisper=[states])[0]
    assert with_ctx.text_vec is not None and with_ctx.speech_vec is not None
    assert not torch.allclose(with_ctx.text_vec, no_ctx.text_vec)  # the encoder reads the earlier utterance
    d = model.new_dialogue()
    d.append(with_ctx)
    pred = model.predict([(d, 0)])[0]
    assert set(pred.scores) == set(MELD_LABELS) and pred.label in MELD_LABELS
    assert sum(pred.scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred.modality_weights["speech"] + pred.modality_weights["text"] == pytest.approx(1.0, abs=1e-5)


def test_cli_evaluate_recipe_checkpoint_with_context(stage3, work):
    from training.__main__ import main
    from training.datasets import load_meld

    meld = _small_meld(work / "meld-small")
    cache = work / "eval-cache"
    js = work / "eval" / "meld_test.json"
    rc = main(["evaluate", "--checkpoint", str(stage3 / "model.pt"), "--data", f"meld:{meld}", "--split", "official:test",
               "--json", str(js), "--cache-dir", str(cache), "--device", "cpu", "--threads", "1"])
    assert rc == 0
    rep = json.loads(js.read_text())
    test = [u for u in load_meld(meld).utterances if u.part == "test"]
    assert rep["n"] == len(test) == 40 and {"acc", "wa", "wf1", "per_class"} <= set(rep)
    assert rep["modalities"]["text"] == 40 and rep["modalities"]["speech"] == 0
    assert js.with_suffix(".png").is_file() and (js.parent / "meld_test_curves.png").is_file()
    # the vectors were computed with up to 2 earlier utterances of the dialogue (most recent first)
    (npz,) = (cache / "text").glob("*.npz")
    with np.load(npz, allow_pickle=False) as z:
        keys = set(z["texts"].tolist())
    first = [u for u in test if u.dialogue == test[0].dialogue]
    assert len(first) >= 3
    assert CTX.join([first[2].text, first[1].text, first[0].text]) in keys
    assert first[0].text in keys  # the first utterance has no context
