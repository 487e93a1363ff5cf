"""The CPU training recipe (training/recipe.sh) end to end on tiny data: stage 1 fine-tunes the tiny
test encoder (tests/conftest.py) on a MELD subset with past context (and can be taken back out of a
checkpoint), stage 2 trains the speech branch on the shipped split of a fake RAVDESS of tones (3
actors: train / val / test) + a fake EmoDB (4 speakers) with the packaged Whisper tiny.en, stage 3
trains the dialogue GRU + fusion on both (EmoDB transcripts decoded by the packaged Whisper) and
calibrates; the checkpoint then serves and evaluates (`python -m training evaluate`, whose encoder
reads earlier utterances)."""

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


def _fake_emodb(root: Path) -> Path:
    """Speakers 03 (train), 12 (validation), 11 and 13 (test): one ~1 s tone clip per emotion, 22.05 kHz
    WAV as released, listed in labels.csv."""
    from training.datasets import EMODB_CODES

    sr = 22_050
    t = np.arange(sr) / sr
    (root / "wav").mkdir(parents=True)
    rows = []
    for spk in ("03", "11", "12", "13"):
        for k, (code, emo) in enumerate(EMODB_CODES.items()):
            rng = np.random.default_rng(int(spk) * 10 + k)
            x = 0.2 * np.sin(2 * np.pi * (150.0 + 40.0 * k) * t) + 0.01 * rng.standard_normal(t.size)
            name = f"{spk}a0{k % 2 + 1}{code}a.wav"
            sf.write(root / "wav" / name, x.astype(np.float32), sr)
            rows.append(f"{name},{spk},a0{k % 2 + 1},{emo},{code}")
    (root / "labels.csv").write_text("file,speaker,text_id,emotion,emotion_code\n" + "\n".join(rows) + "\n")
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
def emodb(work) -> Path:
    return _fake_emodb(work / "emodb")


ACTORS = ["--train-actors", "1", "--val-actors", "2", "--test-actors", "3"]


@pytest.fixture(scope="module")
def stage1(work, tiny_encoder_dir) -> Path:
    from training import text_finetune

    out = work / "text"
    rc = text_finetune.main(["--meld", str(MELD_DIR), "--encoder", str(tiny_encoder_dir), "--max-train", "48", "--epochs", "1",
                             "--max-tokens", "32", "--context", "2", "--out", str(out), "--threads", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stage2(work, ravdess, emodb) -> Path:
    from training import speech_branch

    out = work / "speech"
    rc = speech_branch.main(["--ravdess", str(ravdess), "--emodb", str(emodb), "--split", "ship", "--out", str(out),
                             "--cache-dir", str(work / "cache"), "--epochs", "1", "--patience", "1", "--vector-epochs", "2",
                             "--threads", "1", "--augment", "1", *ACTORS])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stage3(work, ravdess, emodb, stage1, stage2) -> Path:
    from training import recipe

    out = work / "recipe"
    rc = recipe.main(["--meld", str(MELD_DIR), "--ravdess", str(ravdess), "--emodb", str(emodb), "--split", "ship",
                      "--text", str(stage1 / "encoder.pt"), "--speech", str(stage2 / "speech.pt"), "--out", str(out),
                      "--cache-dir", str(work / "cache"), "--epochs", "1", "--max-meld", "24", "--threads", "1", "--augment", "1",
                      *ACTORS])
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
    assert "sentiment_head" not in blob and "dev_sentiment" not in rep  # single-task unless asked


def test_sentiment_ablations_read_a_stage1_encoder(stage1, tiny_checkpoint, work):
    from tests.test_sentiment import _small_meld
    from training import sentiment_ablations

    report = work / "ablations.json"
    rc = sentiment_ablations.main(["--meld", str(_small_meld(work / "meld_small")), "--checkpoint", str(tiny_checkpoint), "--families", "lr",
                                   "--stage1", str(stage1 / "encoder.pt"), "--report", str(report),
                                   "--cache-dir", str(work / "cache"), "--threads", "1"])
    assert rc == 0
    fit = json.loads(report.read_text())["logistic_regression"][f"stage-1 encoder {stage1 / 'encoder.pt'}"]
    assert 0 <= fit["dev_wf1"] <= 100 and fit["dev_wf1"] == max(fit["by_C"].values())


def test_stage1_multitask_learns_sentiment_beside_emotion(work, tiny_encoder_dir):
    from model.config import SENTIMENT_LABELS
    from training import text_finetune

    out = work / "text_multitask"
    rc = text_finetune.main(["--meld", str(MELD_DIR), "--encoder", str(tiny_encoder_dir), "--max-train", "48", "--epochs", "1",
                             "--max-tokens", "32", "--context", "2", "--out", str(out), "--threads", "1", "--sentiment-weight", "1"])
    assert rc == 0
    blob = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)
    assert blob["sentiment_head"]["weight"].shape[0] == len(SENTIMENT_LABELS) and blob["head"]["weight"].shape[0] == 7
    rep = json.loads((out / "text_finetune.json").read_text())
    assert rep["dev_sentiment"]["n"] == 48 and rep["dev_sentiment"]["labels"] == list(SENTIMENT_LABELS)
    assert 0 <= rep["history"][0]["dev_sentiment_wf1"] <= 100


SIZES_40 = {"train": 40, "val": 40, "held": 40, "test": 40}


def test_text_transfer_compares_epochs_partial_freezing_and_averaging(work, tiny_encoder_dir):
    from model.text_encoder import TextEncoder
    from training import text_finetune, text_transfer

    enc = TextEncoder(str(tiny_encoder_dir), 32, frozen=False)
    assert text_finetune.frozen_prefixes(enc, 0) == ("embeddings.",)
    assert text_finetune.frozen_prefixes(enc, 1) == ("embeddings.", "encoder.layer.0.")
    run = work / "text_top1"
    rc = text_finetune.main(["--meld", str(MELD_DIR), "--encoder", str(tiny_encoder_dir), "--split", "seasons:8+9", "--max-train", "48",
                             "--epochs", "2", "--max-tokens", "32", "--train-layers", "1", "--save-epochs", "--out", str(run), "--threads", "1"])
    assert rc == 0
    pre = text_transfer._layers(enc)
    e1 = torch.load(run / "epoch1.pt", map_location="cpu", weights_only=True)
    for k, v in e1["layers"].items():  # partial freezing: the lower layer kept its pre-trained values
        if k.startswith("encoder.layer.0."):
            assert torch.equal(v, pre[k].half()), k
    assert any(not torch.equal(v, pre[k].half()) for k, v in e1["layers"].items() if k.startswith("encoder.layer.1."))
    mid = text_transfer.interpolate(pre, e1["layers"], 0.5)
    k = next(k for k in e1["layers"] if k.startswith("encoder.layer.1."))
    assert torch.allclose(mid[k], (pre[k] + e1["layers"][k].float()) / 2)
    out = work / "transfer.json"
    rc = text_transfer.main(["--meld", str(MELD_DIR), "--encoder", str(tiny_encoder_dir), "--run", f"top1={run}", "--limit", "40",
                             "--cache", str(work / "tt_cache"), "--out", str(out), "--threads", "1"])
    assert rc == 0
    rep = json.loads(out.read_text())
    history = json.loads((run / "history.json").read_text())
    kept = max(history, key=lambda h: h["dev_wf1"])["epoch"]  # averaging and the own head: the dev-kept epoch
    assert set(rep["results"]) == {"frozen", "top1@1", "top1@2", f"top1@{kept}~0.5", f"top1@{kept}+frozen"}
    assert rep["results"][f"top1@{kept}"]["dev_kept"] and "own_head" in rep["results"][f"top1@{kept}"]
    probed = {k: v["probe"] for k, v in rep["results"].items() if "probe" in v}
    assert rep["choice"] == max(probed, key=lambda c: probed[c]["held"]["wf1"])
    assert rep["sizes"] == SIZES_40
    assert out.with_suffix(".png").is_file()


def test_stage2_speech_branch_report_and_weights(stage2):
    from training.acted import SPEECH_LABELS

    blob = torch.load(stage2 / "speech.pt", map_location="cpu", weights_only=True)
    assert blob["mode"] in ("cnn", "both") and blob["whisper_dim"] == 768  # mean + std of tiny.en's 384
    assert blob["state"] and all(k.startswith(("speech.", "whisper_proj.", "speech_mix.")) for k in blob["state"])
    assert any(k.startswith("speech.") for k in blob["state"])
    assert (blob["mode"] == "both") == any(k.startswith("whisper_proj.") for k in blob["state"])
    assert tuple(blob["labels"]) == SPEECH_LABELS and blob["head"]["weight"].shape[0] == 9 and blob["split"] == "ship"
    rep = json.loads((stage2 / "speech_report.json").read_text())
    assert rep["choice"] == blob["mode"] and "validation WA" in rep["chosen_by"]
    # statement 01 of actor 1 + EmoDB speaker 03 train; statement 02 of actor 2 + speaker 12 validate
    assert rep["sets"] == {"train": {"ravdess": 8, "emodb": 7}, "val": {"ravdess": 8, "emodb": 7},
                           "test": {"ravdess-heldout-sentence": 8, "ravdess-seen-sentence": 8, "emodb-heldout-speakers": 14}}
    for part, names in (("val", ("ravdess", "emodb")), ("test", ("ravdess-heldout-sentence", "emodb-heldout-speakers"))):
        for name in names:
            for m in ("cnn", "whisper", "both"):
                for v in ("clean", "aug"):
                    r = rep[part][f"{name}/{m}/{v}"]
                    assert {"native", "meld"} <= set(r) and 0 <= r["meld"]["wa"] <= 100
            for floor in ("svm-mfcc", "lr-whisper"):
                assert 0 <= rep["floors"][f"{part}/{name}/{floor}/clean"]["meld"]["wf1"] <= 100
    # RAVDESS-only sets are scored in RAVDESS's eight classes, mixed ones in the union set
    assert len(rep["test"]["ravdess-heldout-sentence/cnn/clean"]["native"]["labels"]) == 8
    assert len(rep["test"]["emodb-heldout-speakers/cnn/clean"]["native"]["labels"]) == 9
    assert rep["test"]["ravdess-heldout-sentence/cnn/clean"]["native"]["n"] == 8  # one clean version per test clip
    assert rep["test"]["ravdess-heldout-sentence/cnn/aug"]["native"]["n"] == 8  # --augment 1: one live-like each
    assert [h["stage"] for h in rep["history"]] == ["cnn", "whisper", "whisper", "both", "both"]
    assert (stage2 / "test_confusion_meld.png").is_file()


def test_stage2_chooses_the_speech_input_by_held_out_corpus_reports(stage2, tmp_path):
    from training.speech_branch import choose_mode

    def fake(cnn: float, both: float) -> Path:
        rep = {"test": {f"emodb-heldout-corpus/{m}/clean": {"meld": {"wf1": v}} for m, v in (("cnn", cnn), ("both", both))}}
        path = tmp_path / f"r{cnn}-{both}.json"
        path.write_text(json.dumps(rep))
        return path

    assert choose_mode({}, {}, [str(fake(40.0, 30.0)), str(fake(20.0, 25.0))])[0] == "cnn"  # means 30 vs 27.5
    assert choose_mode({}, {}, [str(fake(20.0, 30.0))])[0] == "both"


def test_stage1_can_be_taken_back_out_of_a_checkpoint(stage1, stage3, tmp_path):
    from training.text_finetune import extract

    path = extract(stage3 / "model.pt", tmp_path)
    got = torch.load(path, map_location="cpu", weights_only=True)
    want = torch.load(stage1 / "encoder.pt", map_location="cpu", weights_only=True)
    assert (got["encoder"], got["max_tokens"], got["context"]) == (want["encoder"], want["max_tokens"], want["context"])
    assert set(got["layers"]) == set(want["layers"])
    for k, v in want["layers"].items():
        assert torch.equal(got["layers"][k], v), k


def test_stage3_report_and_calibrated_checkpoint(stage1, stage2, stage3, tiny_encoder_dir):
    rep = json.loads((stage3 / "recipe_report.json").read_text())
    assert [h["epoch"] for h in rep["history"]] == [1]
    acted_sets = {"val": ("ravdess", "emodb"), "test": ("ravdess-heldout-sentence", "ravdess-seen-sentence", "emodb-heldout-speakers")}
    for key, part_m in (("val", "dev"), ("test", "test")):
        names = {f"meld-{part_m}"} | {f"{n}-{v}-{m}" for n in acted_sets[key] for v in ("clean", "aug") for m in ("speech", "text", "both", "meldtext")}
        assert names <= set(rep[key]), key
        for name in names:
            r = rep[key][name]
            assert {"acc", "wa", "wf1"} <= set(r) and 0 <= r["wf1"] <= 100, name
            sw = r["speech_weight"]
            assert 0 <= sw["p10"] <= sw["median"] <= sw["p90"] <= 1 and 0 <= sw["mean"] <= 1, name
    assert rep["test"]["meld-test"]["n"] == 24 and rep["test"]["ravdess-heldout-sentence-clean-both"]["n"] == 8
    assert rep["test"]["emodb-heldout-speakers-aug-meldtext"]["n"] == 14  # 14 clips, --augment 1
    assert rep["test"]["meld-test"]["speech_weight"]["mean"] == pytest.approx(0.0, abs=1e-6)  # MELD text alone: no voice, no weight
    assert rep["test"]["ravdess-heldout-sentence-clean-speech"]["speech_weight"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert rep["test"]["emodb-heldout-speakers-clean-text"]["speech_weight"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert "pairs-meld-test-acted-test" in rep["test"]
    cal = rep["calibration"]
    assert cal["temperature"] > 0 and "meld-test" in cal and "ravdess-heldout-sentence-clean-both" in cal
    # EmoDB's clips were transcribed once by the packaged Whisper, as the service would hear them
    transcripts = json.loads((stage3.parent / "cache" / "transcripts" / "emodb.json").read_text())
    assert len(transcripts) == 28 and all(isinstance(t, str) for t in transcripts.values())
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
    if cfg.whisper_dim:  # the check for unfamiliar voices, fitted on the split (training.familiar)
        fam = rep["familiar"]
        assert cfg.familiar_max_distance == pytest.approx(fam["max_distance"], abs=1e-3) and fam["max_distance"] > 0
        assert model.metadata["familiar"] == fam and 0 <= fam["unfamiliar_share"]["val/ravdess/clean"] <= 1
        assert model.familiar_mean.shape == (768,) and model.familiar_whiten.shape == (768, 768)
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
    assert pred.familiar_voice is (None if not cfg.whisper_dim else bool(with_ctx.speech_distance <= cfg.familiar_max_distance))
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
