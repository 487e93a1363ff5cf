"""Stage 2 of the recipe: the speech branch on English acted speech (RAVDESS), actor-disjoint.

Test actors 21-24 are fixed and never used for a choice; validation actors 17-20 choose epochs and
the speech input (CNN, pooled Whisper states, or both); training actors 1-16.
"""

from __future__ import annotations

from typing import Sequence

from training.datasets import Corpus
from training.speech_cache import SpeechFeatures, build

TEST_ACTORS = tuple(range(21, 25))
VAL_ACTORS = tuple(range(17, 21))


def ravdess_parts(corpus: Corpus, test: Sequence[int] = TEST_ACTORS, val: Sequence[int] = VAL_ACTORS) -> dict[str, list[int]]:
    """Actor-disjoint train/val/test clip indices of a RAVDESS corpus."""
    actor = [int(u.speaker.removeprefix("actor")) for u in corpus.utterances]
    return {
        "train": [i for i, a in enumerate(actor) if a not in test and a not in val],
        "val": [i for i, a in enumerate(actor) if a in val],
        "test": [i for i, a in enumerate(actor) if a in test],
    }


def actor_range(spec: str) -> tuple[int, ...]:
    """'21-24' or '3' or '1,5-6' -> actor numbers."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return tuple(out)


def features_for(corpus: Corpus, parts: dict[str, list[int]], cache_dir: str, n_aug_train: int = 2,
                 n_aug_eval: int = 1, seed: int = 0) -> SpeechFeatures:
    """Clean + augmented versions of every clip (training clips get more); babble from training clips."""
    clips = parts["train"] + parts["val"] + parts["test"]
    n_aug = {i: n_aug_train for i in parts["train"]} | {i: n_aug_eval for i in parts["val"] + parts["test"]}
    return build(corpus, clips, n_aug, cache_dir, seed=seed, babble_clips=parts["train"])


# ---- training --------------------------------------------------------------------------------
import argparse  # noqa: E402  (the CLI below; the helpers above are imported by the recipe)
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import features  # noqa: E402
from model.audio_encoder import SpeechCNN  # noqa: E402
from model.config import MELD_LABELS  # noqa: E402
from training.datasets import TO_MELD, load_ravdess  # noqa: E402
from training.metrics import classification_report, format_report  # noqa: E402
from training.report import plot_confusion, plot_curves  # noqa: E402


class SpeechHead(nn.Module):
    """The speech branch as EmotionModel holds it (speech / whisper_proj / speech_mix, same names
    and shapes, so its weights load straight into the full model) plus a classifier for stage 2."""

    def __init__(self, mode: str, n_classes: int, speech_dim: int = 256, whisper_dim: int = 768, dropout: float = 0.3) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("cnn", "both"):
            self.speech = SpeechCNN(features.N_MELS, speech_dim, 4, dropout)
        if mode in ("whisper", "both"):
            self.whisper_proj = nn.Sequential(nn.LayerNorm(whisper_dim), nn.Linear(whisper_dim, speech_dim), nn.ReLU(), nn.Dropout(dropout))
        if mode == "both":
            self.speech_mix = nn.Sequential(nn.Linear(2 * speech_dim, speech_dim), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(speech_dim, n_classes)

    def vector(self, cnn_vec: torch.Tensor | None, whisper: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "cnn":
            return cnn_vec
        w = self.whisper_proj(whisper)
        if self.mode == "whisper":
            return w
        return self.speech_mix(torch.cat([cnn_vec, w], dim=-1))


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimiser step on `loss`; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def spec_augment(mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two frequency masks (<= 8 bins) and two time masks (<= 10 % of frames), set to the mean (0)."""
    mel = mel.copy()
    n_mels, t = mel.shape
    for _ in range(2):
        w = int(rng.integers(0, 9))
        f0 = int(rng.integers(0, n_mels - w + 1))
        mel[f0 : f0 + w] = 0.0
        w = int(rng.integers(0, max(1, t // 10) + 1))
        t0 = int(rng.integers(0, t - w + 1))
        mel[:, t0 : t0 + w] = 0.0
    return mel


def _batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    rows = rows[rng.permutation(len(rows))]
    out = []
    for s in range(0, len(rows), batch_size * 20):
        chunk = rows[s : s + batch_size * 20]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [out[k] for k in rng.permutation(len(out))]


@torch.inference_mode()
def cnn_vectors(cnn: SpeechCNN, mels: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    cnn.eval()
    out = torch.zeros(len(mels), cnn.fc.out_features)
    order = np.argsort([m.shape[1] for m in mels], kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        mel, lengths = features.pad_batch([mels[i] for i in idx])
        out[idx] = cnn(torch.from_numpy(mel), torch.from_numpy(lengths)).float()
    return out


def _scores(logits: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict:
    """8-class report, and the 7-MELD-label report of the same predictions (calm -> neutral, ...)."""
    pred = logits.argmax(1)
    rep = classification_report(y, pred, labels)
    to = [MELD_LABELS.index(TO_MELD["ravdess"][lab]) for lab in labels]
    rep7 = classification_report([to[t] for t in y], [to[p] for p in pred], MELD_LABELS)
    return {"native": rep, "meld": rep7}


def train_cnn(feats: SpeechFeatures, y: np.ndarray, parts: dict[str, list[int]], labels: Sequence[str], epochs: int,
              patience: int, seed: int, log: list[dict], init: str = "", lr: float = 1e-3) -> tuple[SpeechHead, int]:
    """CNN + head on log-mels: one random version of each training clip per epoch, SpecAugment;
    the epoch with the best validation WA (all validation versions) is kept."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = SpeechHead("cnn", len(labels))
    if init:  # start from another checkpoint's speech CNN (e.g. the EmoDB-trained one): its filters transfer
        from model.checkpoint import read_checkpoint

        state = {k.removeprefix("speech."): v for k, v in read_checkpoint(init)["state_dict"].items() if k.startswith("speech.")}
        model.speech.load_state_dict(state)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    lengths = np.array([m.shape[1] for m in feats.mels])
    versions: dict[int, np.ndarray] = {i: feats.rows([i]) for i in parts["train"]}
    val_rows = feats.rows(parts["val"])
    best, best_state, best_epoch, bad = -1.0, None, 0, 0
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        rows = np.array([rng.choice(versions[i]) for i in parts["train"]])
        losses = []
        for b in tqdm(_batches(rows, lengths, 32, rng), desc=f"cnn epoch {epoch}", unit="batch", leave=False):
            mel, lens = features.pad_batch([spec_augment(feats.mels[r], rng) for r in b])
            logits = model.head(model.speech(torch.from_numpy(mel), torch.from_numpy(lens)))
            loss = F.cross_entropy(logits, torch.from_numpy(y[feats.clip[b]]), label_smoothing=0.1)
            losses.append(_step(opt, loss))
        model.eval()
        with torch.inference_mode():
            val_logits = model.head(cnn_vectors(model.speech, [feats.mels[r] for r in val_rows])).numpy()
        wa = classification_report(y[feats.clip[val_rows]], val_logits.argmax(1), labels)["wa"]
        log.append({"stage": "cnn", "epoch": epoch, "train_loss": float(np.mean(losses)), "val_wa": wa, "seconds": time.time() - t0})
        print(f"cnn epoch {epoch}: loss {np.mean(losses):.3f} val WA {wa:.1f} ({time.time() - t0:.0f} s)", flush=True)
        if wa > best:
            best, best_epoch, bad = wa, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval(), best_epoch


def train_on_vectors(mode: str, cnn_vec: torch.Tensor | None, whisper: torch.Tensor, feats: SpeechFeatures, y: np.ndarray,
                     parts: dict[str, list[int]], labels: Sequence[str], cnn: SpeechCNN | None, epochs: int, seed: int,
                     log: list[dict], cnn_dropout: float = 0.3, cnn_drop_all: float = 0.0) -> SpeechHead:
    """Whisper-only, or CNN (frozen, cached) + Whisper: the layers after the cached inputs, on every
    training version; the best validation WA is kept. In 'both', Whisper states are dropped for 10 %
    of examples, so the branch still works when an ASR model gives no usable states. The frozen CNN
    fits its training actors far better than new ones, so its vectors get dropout (`cnn_dropout`)
    and are dropped whole for a share of examples (`cnn_drop_all`): the mix must not lean on them."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SpeechHead(mode, len(labels))
    if cnn is not None and mode == "both":
        model.speech.load_state_dict(cnn.state_dict())
    params = [p for n, p in model.named_parameters() if not n.startswith("speech.")]
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    tr, va = feats.rows(parts["train"]), feats.rows(parts["val"])
    yt = torch.from_numpy(y[feats.clip])
    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for b in np.array_split(tr[rng.permutation(len(tr))], max(1, len(tr) // 32)):
            w = whisper[b]
            c = None
            if mode == "both":
                c = F.dropout(cnn_vec[b], cnn_dropout, training=True)
                c = c * (torch.rand(len(b), 1) >= cnn_drop_all).float()
                w = w * (torch.rand(len(b), 1) > 0.1).float()
            v = model.vector(c, w) if mode == "whisper" else _mix_masked(model, c, w)
            loss = F.cross_entropy(model.head(v), yt[b], label_smoothing=0.1)
            losses.append(_step(opt, loss))
        model.eval()
        with torch.inference_mode():
            logits = model.head(_mix_masked(model, cnn_vec[va], whisper[va]) if mode == "both" else model.vector(None, whisper[va]))
        wa = classification_report(y[feats.clip[va]], logits.argmax(1).numpy(), labels)["wa"]
        log.append({"stage": mode, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_wa": wa})
        if wa > best:
            best, best_state = wa, {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    print(f"{mode}: best val WA {best:.1f}", flush=True)
    return model.eval()


def _mix_masked(model: SpeechHead, cnn_vec: torch.Tensor, whisper: torch.Tensor) -> torch.Tensor:
    """As EmotionModel.speech_vector: rows whose states are all zero get a zero Whisper projection."""
    has = (whisper.abs().sum(-1) > 0).float()[:, None]
    return model.speech_mix(torch.cat([cnn_vec, model.whisper_proj(whisper) * has], dim=-1))


def evaluate_heads(heads: dict[str, SpeechHead], cnn_vec: torch.Tensor, whisper: torch.Tensor, feats: SpeechFeatures,
                   y: np.ndarray, clips: list[int], labels: Sequence[str]) -> dict:
    """Scores of each speech input on the clean and the live-like versions of `clips`."""
    out = {}
    for mode, m in heads.items():
        for variants in ("clean", "aug"):
            rows = feats.rows(clips, variants)
            with torch.inference_mode():
                if mode == "cnn":
                    v = cnn_vec[rows]
                elif mode == "whisper":
                    v = m.vector(None, whisper[rows])
                else:
                    v = _mix_masked(m, cnn_vec[rows], whisper[rows])
                logits = m.head(v).numpy()
            out[f"{mode}/{variants}"] = _scores(logits, y[feats.clip[rows]], labels)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ravdess", required=True)
    p.add_argument("--out", default="runs/speech")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--vector-epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-cnn", default="", help="checkpoint whose speech CNN initialises this one")
    p.add_argument("--cnn-from", default="", help="a previous run folder of this stage: reuse its trained CNN (and its "
                   "CNN scores and history) instead of training it again; only the vector heads are trained")
    p.add_argument("--cnn-dropout", type=float, default=0.5, help="dropout on the frozen CNN's vectors in 'both'")
    p.add_argument("--cnn-drop-all", type=float, default=0.5, help="share of 'both' examples whose CNN vector is dropped whole")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-actors", default="17-20")
    p.add_argument("--test-actors", default="21-24")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    corpus = load_ravdess(a.ravdess)
    labels = list(corpus.labels)
    y = np.array([labels.index(u.label) for u in corpus.utterances])
    parts = ravdess_parts(corpus, actor_range(a.test_actors), actor_range(a.val_actors))
    feats = features_for(corpus, parts, a.cache_dir, seed=a.seed)
    log: list[dict] = []
    prev: dict = {}
    if a.cnn_from:
        prev = json.loads((Path(a.cnn_from) / "speech_report.json").read_text())
        blob = torch.load(Path(a.cnn_from) / "speech.pt", map_location="cpu", weights_only=True)
        cnn_head = SpeechHead("cnn", len(labels))
        cnn_head.speech.load_state_dict({k.removeprefix("speech."): v for k, v in blob["state"].items() if k.startswith("speech.")})
        if "cnn_head" in blob:
            cnn_head.head.load_state_dict(blob["cnn_head"])
        cnn_head.eval()
        cnn_epoch, t_cnn = prev["cnn_best_epoch"], prev["cnn_minutes"] * 60
        log += [h for h in prev["history"] if h["stage"] == "cnn"]
    else:
        cnn_head, cnn_epoch = train_cnn(feats, y, parts, labels, a.epochs, a.patience, a.seed, log, a.init_cnn, a.lr)
        t_cnn = time.time() - t_start
    cnn_vec = cnn_vectors(cnn_head.speech, feats.mels)
    whisper = torch.from_numpy(feats.whisper)
    heads = {"cnn": cnn_head,
             "whisper": train_on_vectors("whisper", None, whisper, feats, y, parts, labels, None, a.vector_epochs, a.seed, log),
             "both": train_on_vectors("both", cnn_vec, whisper, feats, y, parts, labels, cnn_head.speech, a.vector_epochs, a.seed, log,
                                      a.cnn_dropout, a.cnn_drop_all)}
    val = evaluate_heads(heads, cnn_vec, whisper, feats, y, parts["val"], labels)
    test = evaluate_heads(heads, cnn_vec, whisper, feats, y, parts["test"], labels)
    if prev and "cnn_head" not in blob:  # an older run folder kept no CNN head: take its CNN scores as they were
        for part, res in (("val", val), ("test", test)):
            res |= {k: v for k, v in prev[part].items() if k.startswith("cnn/")}
    # the speech input is chosen on validation actors only (mean WA over clean and live-like versions);
    # the paper's CNN stays the speech branch, so the choice is CNN alone or CNN + Whisper states
    choice = max(("cnn", "both"), key=lambda m: val[f"{m}/clean"]["native"]["wa"] + val[f"{m}/aug"]["native"]["wa"])
    for key, rep in test.items():
        print(format_report(rep["native"], f"test actors {a.test_actors}, {key}, 8 classes"), flush=True)
    rep = test[f"{choice}/clean"]
    plot_confusion(rep["native"]["confusion"], labels, out / "test_confusion_8.png", f"RAVDESS test actors {a.test_actors}, speech only ({choice}), 8 classes")
    plot_confusion(rep["meld"]["confusion"], MELD_LABELS, out / "test_confusion_meld.png", f"RAVDESS test actors {a.test_actors}, speech only ({choice}), MELD labels")
    plot_curves([{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_wa": h["val_wa"]} for h in log if h["stage"] == "cnn"],
                out / "cnn_curves.png", "speech CNN on RAVDESS actors 1-16 (val 17-20)")
    chosen = heads[choice]
    state = {k: v for k, v in chosen.state_dict().items() if not k.startswith("head.")}
    torch.save({"mode": choice, "state": state, "head": chosen.head.state_dict(), "cnn_head": cnn_head.head.state_dict(), "labels": labels,
                "whisper_model": "", "whisper_dim": int(whisper.shape[1])}, out / "speech.pt")
    report = {"choice": choice, "cnn_init": a.init_cnn or prev.get("cnn_init", "random"), "cnn_lr": a.lr,
              "cnn_from": a.cnn_from, "cnn_dropout": a.cnn_dropout, "cnn_drop_all": a.cnn_drop_all, "chosen_on": "validation actors 17-20, mean of clean and live-like WA",
              "cnn_best_epoch": cnn_epoch, "cnn_minutes": t_cnn / 60, "total_minutes": (time.time() - t_start) / 60,
              "split": {"val": f"actors {a.val_actors}", "test": f"actors {a.test_actors}", "train": "the other actors"},
              "n": {k: len(v) for k, v in parts.items()}, "val": val, "test": test, "history": log}
    (out / "speech_report.json").write_text(json.dumps(report, indent=1))
    print(f"chosen on validation: {choice}; total {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
