"""Training end to end on small subsets with the tiny test encoder (tests/conftest.py): loss goes
down, checkpoints load, windows match serving, pairing/modality mixing, resume, Ctrl-C, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model import MELD_LABELS, load_checkpoint
from training.config import TrainConfig
from training.loop import Trainer, eval_examples, forward_examples, train_examples

ROOT = Path(__file__).resolve().parents[1]
MELD_DIR = ROOT.parent / "shared" / "data" / "meld"


def _acted(tmp_path: Path) -> Path:
    """Tiny CREMA-D-named corpus: 4 actors x 4 emotions, 0.6 s tones whose pitch encodes the emotion."""
    root = tmp_path / "cremad"
    root.mkdir(exist_ok=True)
    sr = 16_000
    t = np.arange(int(0.6 * sr)) / sr
    for actor in (1001, 1002, 1003, 1004):
        for k, emo in enumerate(("ANG", "HAP", "NEU", "SAD")):
            tone = 0.2 * np.sin(2 * np.pi * (150 + 120 * k) * t) + 0.01 * np.random.default_rng(actor + k).standard_normal(t.size)
            sf.write(root / f"{actor}_DFA_{emo}_XX.wav", tone.astype(np.float32), sr)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One feature cache for the module: the tiny encoder's vectors are computed once."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture()
def tiny(tiny_encoder_dir, cache_dir):
    return {"encoder": str(tiny_encoder_dir), "cache_dir": str(cache_dir)}


def _cfg(tmp_path: Path, tiny: dict, **kw) -> TrainConfig:
    base = dict(data=f"meld:{MELD_DIR}", out=str(tmp_path / "run"), split="official", epochs=2, patience=5,
                encoder=tiny["encoder"], encoder_dim=32, max_train=320, max_eval=96,
                cache_dir=tiny["cache_dir"], progress=False, lr=2e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_two_epoch_smoke_train_lowers_loss_and_writes_loadable_checkpoint(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny)
    summary = Trainer(cfg).fit()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    model = load_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert model.config.labels == MELD_LABELS and model.config.encoder == tiny["encoder"]
    assert model.metadata["train_config"]["split"] == "official" and model.metadata["data"]["train_examples"] == 320
    assert [h["epoch"] for h in model.metadata["history"]] == [1, 2]
    for name in ("last.pt", "curves.png", "val.json", "test.json", "test_confusion.png", "summary.json", "train_config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert {"acc", "f1", "wa", "wf1"} <= set(summary["test"])
    # the saved model scores like the one in memory, through the serving API too
    d = model.new_dialogue()
    enc = model.encode_utterances(["Oh my God!", "I can't believe it."], [None, None])
    for u in enc:
        d.append(u)
    pred = model.predict([(d, 1)])[0]
    assert pred.label in MELD_LABELS and pred.modality_weights["speech"] == 0.0


def test_training_windows_match_serving_predict(tmp_path, tiny):
    trainer = Trainer(_cfg(tmp_path, tiny, epochs=1))
    model, table = trainer.model.eval(), trainer.table
    # a dialogue longer than the window, among the targets whose texts the subset run encoded
    dlg = next(table.dialogue[t].tolist() for t in trainer.train_targets if len(table.dialogue[t]) > 10)
    live = model.encode_utterances([table.texts[dlg[-1]]], [None])[0]
    assert torch.allclose(table.text_vecs[dlg[-1]], live.text_vec, atol=3e-3)  # cache (float16) == serving
    from model import EncodedUtterance

    served = model.new_dialogue()
    for i in dlg:  # the serving cache filled with the same vectors: only the window logic differs
        served.append(EncodedUtterance(text_vec=table.text_vecs[i], speech_vec=None))
    last = served.last_index
    assert served.first_index > 0  # the serving cache is bounded: the window really is cut
    # live: the newest utterance, no future context; a revision: the one before, seeing the next
    for pos, lookahead in ((last, False), (last - 1, True)):
        ex = eval_examples(table, [dlg[pos]], mode="text")
        ex.lookahead[:] = lookahead
        with torch.inference_mode():
            ours = forward_examples(model, table, ex, train=False, cfg=None).probs[0]
            wrong = forward_examples(model, table, eval_examples(table, [dlg[pos]], mode="text"),
                                     train=False, cfg=None).probs[0]
        theirs = np.array([model.predict([(served, pos)])[0].scores[lab] for lab in MELD_LABELS])
        assert np.allclose(ours.numpy(), theirs, atol=1e-5)
        if lookahead:  # the test can tell: without the next utterance the revision differs
            assert not np.allclose(wrong.numpy(), theirs, atol=1e-5)


def test_pairing_modality_mix_and_lookahead(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, acted=(f"cremad:{_acted(tmp_path)}",), p_text_only=0.5,
               pair_match=1.0, speech_only_frac=0.25, lookahead_prob=0.3, epochs=1)
    tr = Trainer(cfg)
    ex = train_examples(tr.table, tr.train_targets, tr.pool, cfg, np.random.default_rng(0))
    n = len(tr.train_targets)
    meld = ex.target < tr.table.offsets[1]
    paired = meld & (ex.speech >= 0)
    assert 0.35 < paired.sum() / meld.sum() < 0.65  # half of the text-only utterances get a clip
    assert set(ex.speech[paired]) <= set(tr.pool.tolist())  # only training speakers' clips
    pool_labels = set(tr.table.labels[tr.pool].tolist())
    matchable = paired & np.isin(ex.label, list(pool_labels))
    assert (tr.table.labels[ex.speech[matchable]] == ex.label[matchable]).all()  # class-matched
    speech_only = ~ex.text_on
    assert speech_only.sum() == round(0.25 * n) and (ex.target[speech_only] == ex.speech[speech_only]).all()
    assert 0.2 < ex.lookahead[meld].mean() < 0.4 and not ex.lookahead[speech_only].any()
    assert (ex.text_on | (ex.speech >= 0)).all()
    spk = {tr.table.corpora[1].utterances[i - tr.table.offsets[1]].speaker for i in tr.pool}
    held = {tr.table.corpora[1].utterances[i - tr.table.offsets[1]].speaker for i in tr.acted_val}
    assert spk and spk.isdisjoint(held)
    summary = tr.fit()  # trains the CNN on the paired clips too
    assert summary["epochs"] == 1 and "val_acted_wa" in json.loads((tmp_path / "run" / "history.json").read_text())[0]


def test_speech_stage_native_labels_then_frozen_cnn(tmp_path, tiny):
    acted = _acted(tmp_path)
    cfg = TrainConfig(data=f"cremad:{acted}", out=str(tmp_path / "speech"), split="speakers:1004", labels="native",
                      epochs=2, encoder=tiny["encoder"], encoder_dim=32, cache_dir=tiny["cache_dir"],
                      progress=False, lr=2e-3)
    Trainer(cfg).fit()
    sp = load_checkpoint(tmp_path / "speech" / "best.pt", device="cpu")
    assert set(sp.config.labels) == {"anger", "happy", "neutral", "sad", "disgust", "fear"}
    fused = _cfg(tmp_path, tiny, out=str(tmp_path / "fused"), acted=(f"cremad:{acted}",), epochs=1,
                 init=str(tmp_path / "speech" / "best.pt"), init_parts="speech", freeze_speech=True)
    tr = Trainer(fused)
    assert tr.table.speech_vecs is not None and not any(p.requires_grad for p in tr.model.speech.parameters())
    before = {k: v.clone() for k, v in tr.model.speech.state_dict().items()}
    tr.fit()
    out = load_checkpoint(tmp_path / "fused" / "best.pt", device="cpu")
    for k, v in before.items():
        assert torch.equal(out.speech.state_dict()[k], v), k  # the CNN (and its BatchNorm stats) untouched
        assert torch.equal(sp.speech.state_dict()[k], v), k


def test_resume_and_ctrl_c_save(tmp_path, tiny, monkeypatch):
    cfg = _cfg(tmp_path, tiny, epochs=1, max_train=128)
    Trainer(cfg).fit()
    tr = Trainer(_cfg(tmp_path, tiny, epochs=2, max_train=128))
    tr.resume()
    assert tr.epoch == 1 and len(tr.history) == 1
    calls = {"n": 0}
    real = tr.train_epoch

    def interrupt_second() -> float:
        calls["n"] += 1
        if calls["n"] == 1:
            return real()
        raise KeyboardInterrupt

    tr.cfg = _cfg(tmp_path, tiny, epochs=3, max_train=128)
    monkeypatch.setattr(tr, "train_epoch", interrupt_second)
    summary = tr.fit()
    assert summary["interrupted"] and tr.epoch == 2
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    assert state["epoch"] == 2 and len(json.loads(state["history"])) == 2
    assert load_checkpoint(tmp_path / "run" / "last.pt", device="cpu").metadata["epoch"] == 2


def test_cli_train_and_evaluate(tmp_path, tiny):
    from training.__main__ import main, parse_split

    assert parse_split("official:test") == ("official", "test")
    assert parse_split("speakers:11+13:val") == ("speakers:11+13", "val")
    assert parse_split("paper") == ("paper", "test")
    out = tmp_path / "cli"
    rc = main(["train", "--data", f"meld:{MELD_DIR}", "--out", str(out), "--epochs", "1", "--encoder", tiny["encoder"],
               "--encoder-dim", "32", "--max-train", "64", "--max-eval", "32", "--cache-dir", tiny["cache_dir"],
               "--no-progress", "--class-weight", "sqrt"])
    assert rc == 0 and (out / "best.pt").is_file()
    assert json.loads((out / "train_config.json").read_text())["class_weight"] == "sqrt"
    js = tmp_path / "eval" / "meld_dev.json"
    rc = main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", f"meld:{MELD_DIR}", "--split", "official:val",
               "--json", str(js), "--cache-dir", tiny["cache_dir"]])
    rep = json.loads(js.read_text())
    assert rc == 0 and rep["n"] == 1109 and {"acc", "f1", "wa", "wf1", "per_class"} <= set(rep)
    assert 0 <= rep["wf1"] <= 100 and js.with_suffix(".png").is_file()
    assert (js.parent / "meld_dev_curves.png").is_file()  # learning curves from the checkpoint's metadata
    with pytest.raises(SystemExit):
        main(["train"])  # --data is required


def test_finetune_mode_trains_and_stores_the_encoder(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, epochs=1, max_train=64, max_eval=32, finetune=True, encoder_lr=1e-3)
    tr = Trainer(cfg)
    assert tr.table.text_vecs is None  # texts are encoded per batch, with gradients
    before = {k: v.clone() for k, v in tr.model.text_encoder.state_dict().items()}
    tr.fit()
    after = tr.model.text_encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = load_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert not model.config.freeze_encoder
    stored = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("text_encoder.") for k in stored)
