"""Stage 2 of the recipe: the speech branch on acted speech (RAVDESS + EmoDB, training.acted).

Every choice is made on a split that holds out what live use changes (training.acted.split): the
sentence (RAVDESS statement 01 trains, statement 02 validates and tests) and, for the choice of the
speech input, the corpus. One run trains, on one split, the paper's CNN on log-mels, a head on the
pooled Whisper states alone, and the two mixed; scores them on the split's validation and test sets
(clean and live-like versions); and fits the floors every speech model must beat on that same split:
an RBF SVM on MFCC + deltas + log-mel statistics, and a logistic regression on the pooled Whisper
states. Labels: the union set training.acted.SPEECH_LABELS (RAVDESS's eight + boredom); scores in
RAVDESS's eight classes where a test set is RAVDESS only, and in MELD's labels everywhere.

    python -m training.speech_branch --ravdess D/ravdess --emodb D/emodb --split to-emodb --out runs/speech_to-emodb
    python -m training.speech_branch --ravdess D/ravdess --emodb D/emodb --split ship --out runs/speech

The speech input kept (CNN alone or CNN + Whisper) is the one with the higher validation WA of the
run (clean and live-like). `--choose-by REPORTS` picks by the mean held-out-corpus *test* WF1 of
other runs instead: an analysis tool, not what the recipe does, since it chooses on test sets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model import features
from model.audio_encoder import SpeechCNN
from model.config import MELD_LABELS
from training import acted
from training.epochs import KeepBest, module_state, step
from training.metrics import classification_report, format_report
from training.report import plot_confusion, plot_curves
from training.speech_cache import SpeechFeatures


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


def _scores(logits: np.ndarray, clips: np.ndarray, data: acted.Acted) -> dict:
    """Scores of union-label logits on `clips`: "native" in RAVDESS's eight classes when every clip
    is RAVDESS (the other logits are left out), else in the union set; "meld" on MELD's labels."""
    labels = acted.SPEECH_LABELS
    if (data.source[clips] == "ravdess").all():
        labels = acted.RAVDESS_LABELS
        logits = logits[:, : len(labels)]
    pred = logits.argmax(1)
    to = [MELD_LABELS.index(acted.TO_MELD_LABEL[lab]) for lab in labels]
    return {"native": classification_report(data.y[clips], pred, labels),
            "meld": classification_report(data.y_meld[clips], [to[p] for p in pred], MELD_LABELS)}


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
    keep = KeepBest(patience, snapshot=lambda: module_state(model))
    for epoch in keep.epochs(epochs):
        t0 = time.time()
        model.train()
        rows = np.array([rng.choice(versions[i]) for i in parts["train"]])
        losses = []
        for b in tqdm(_batches(rows, lengths, 32, rng), desc=f"cnn epoch {epoch}", unit="batch", leave=False):
            mel, lens = features.pad_batch([spec_augment(feats.mels[r], rng) for r in b])
            logits = model.head(model.speech(torch.from_numpy(mel), torch.from_numpy(lens)))
            loss = F.cross_entropy(logits, torch.from_numpy(y[feats.clip[b]]), label_smoothing=0.1)
            losses.append(step(opt, loss))
        model.eval()
        with torch.inference_mode():
            val_logits = model.head(cnn_vectors(model.speech, [feats.mels[r] for r in val_rows])).numpy()
        wa = classification_report(y[feats.clip[val_rows]], val_logits.argmax(1), labels)["wa"]
        log.append({"stage": "cnn", "epoch": epoch, "train_loss": float(np.mean(losses)), "val_wa": wa, "seconds": time.time() - t0})
        print(f"cnn epoch {epoch}: loss {np.mean(losses):.3f} val WA {wa:.1f} ({time.time() - t0:.0f} s)", flush=True)
        keep.update(epoch, wa)
    model.load_state_dict(keep.state)
    return model.eval(), keep.epoch


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
    keep = KeepBest(snapshot=lambda: module_state(model))
    for epoch in keep.epochs(epochs):
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
            losses.append(step(opt, loss))
        model.eval()
        with torch.inference_mode():
            logits = model.head(_mix_masked(model, cnn_vec[va], whisper[va]) if mode == "both" else model.vector(None, whisper[va]))
        wa = classification_report(y[feats.clip[va]], logits.argmax(1).numpy(), labels)["wa"]
        log.append({"stage": mode, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_wa": wa})
        keep.update(epoch, wa)
    model.load_state_dict(keep.state)
    print(f"{mode}: best val WA {keep.best:.1f}", flush=True)
    return model.eval()


def _mix_masked(model: SpeechHead, cnn_vec: torch.Tensor, whisper: torch.Tensor) -> torch.Tensor:
    """As EmotionModel.speech_vector: rows whose states are all zero get a zero Whisper projection."""
    has = (whisper.abs().sum(-1) > 0).float()[:, None]
    return model.speech_mix(torch.cat([cnn_vec, model.whisper_proj(whisper) * has], dim=-1))


def head_logits(mode: str, m: SpeechHead, cnn_vec: torch.Tensor, whisper: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        if mode == "cnn":
            v = cnn_vec[rows]
        elif mode == "whisper":
            v = m.vector(None, whisper[rows])
        else:
            v = _mix_masked(m, cnn_vec[rows], whisper[rows])
        return m.head(v).numpy()


def evaluate_heads(heads: dict[str, SpeechHead], cnn_vec: torch.Tensor, whisper: torch.Tensor, feats: SpeechFeatures,
                   data: acted.Acted, sets: dict[str, list[int]]) -> dict:
    """Scores of each speech input on the clean and the live-like versions of each named clip set."""
    out: dict = {}
    for name, clips in sets.items():
        for mode, m in heads.items():
            for variants in ("clean", "aug"):
                rows = feats.rows(clips, variants)
                out[f"{name}/{mode}/{variants}"] = _scores(head_logits(mode, m, cnn_vec, whisper, rows), feats.clip[rows], data)
    return out


# ---- floors: what any speech model must beat on the same split ---------------------------------
def mfcc_stats(mel: np.ndarray) -> np.ndarray:
    """MFCC (20) + deltas + log-mel, mean and std over time, from a cached (normalised dB) log-mel."""
    import librosa

    mfcc = librosa.feature.mfcc(S=mel, n_mfcc=20)
    d = librosa.feature.delta(mfcc, width=min(9, mfcc.shape[1] - (1 - mfcc.shape[1] % 2)))
    return np.concatenate([x for m in (mfcc, d, mel) for x in (m.mean(1), m.std(1))])


def floors(feats: SpeechFeatures, data: acted.Acted, parts: dict, seed: int = 0) -> dict:
    """An RBF SVM on MFCC statistics and a logistic regression on pooled Whisper states, trained on
    the clean versions of the training clips with fixed settings (nothing tuned), scored like the
    heads on every validation and test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    tr = feats.rows(acted.flat(parts["train"]), "clean")
    mf = {}

    def mfcc_rows(rows: np.ndarray) -> np.ndarray:
        for r in rows:
            if r not in mf:
                mf[r] = mfcc_stats(feats.mels[r])
        return np.stack([mf[r] for r in rows])

    models = {"svm-mfcc": (make_pipeline(StandardScaler(), SVC(C=10.0, gamma="scale", random_state=seed)), mfcc_rows),
              "lr-whisper": (make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)), lambda r: feats.whisper[r])}
    out: dict = {}
    classes = np.arange(len(acted.SPEECH_LABELS))
    for name, (clf, fx) in models.items():
        clf.fit(fx(tr), data.y[feats.clip[tr]])
        for part in ("val", "test"):
            for set_name, clips in parts[part].items():
                for variants in ("clean", "aug"):
                    rows = feats.rows(clips, variants)
                    logits = np.full((len(rows), len(classes)), -1e9)  # classes absent from training: never chosen
                    logits[:, clf.classes_] = clf.decision_function(fx(rows))
                    out[f"{part}/{set_name}/{name}/{variants}"] = _scores(logits, feats.clip[rows], data)
    return out


def choose_mode(val: dict, parts: dict, choose_by: Sequence[str]) -> tuple[str, str]:
    """CNN alone or CNN + Whisper: by the mean held-out-corpus test WF1 of other runs' reports, else
    by this run's validation WA (clean and live-like)."""
    if choose_by:
        score = {m: 0.0 for m in ("cnn", "both")}
        for path in choose_by:
            rep = json.loads(Path(path).read_text())
            for m in score:
                keys = [k for k in rep["test"] if k.endswith(f"/{m}/clean") and "heldout-corpus" in k]
                score[m] += sum(rep["test"][k]["meld"]["wf1"] for k in keys) / len(keys) / len(choose_by)
        return max(score, key=score.get), f"mean held-out-corpus test WF1 (MELD labels) of {', '.join(choose_by)}: " + \
            ", ".join(f"{m} {v:.1f}" for m, v in score.items())
    score = {m: np.mean([val[f"{n}/{m}/{v}"]["native"]["wa"] for n in parts["val"] for v in ("clean", "aug")]) for m in ("cnn", "both")}
    return max(score, key=score.get), "validation WA, mean of clean and live-like: " + ", ".join(f"{m} {v:.1f}" for m, v in score.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ravdess", required=True)
    p.add_argument("--emodb", default="", help="EmoDB folder (needed by every split but sentence01/sentence02)")
    p.add_argument("--split", default="ship", choices=acted.SPLITS)
    p.add_argument("--out", default="runs/speech")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--vector-epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", type=int, default=2, help="live-like versions of each clip (default 2; the recipe's stage 3 must match)")
    p.add_argument("--init-cnn", default="", help="checkpoint whose speech CNN initialises this one (default: random)")
    p.add_argument("--no-cnn", action="store_true", help="Whisper-state head and floors only (no CNN is trained)")
    p.add_argument("--choose-by", default="", help="comma-separated speech_report.json files of held-out-corpus runs")
    p.add_argument("--cnn-dropout", type=float, default=0.5, help="dropout on the frozen CNN's vectors in 'both'")
    p.add_argument("--cnn-drop-all", type=float, default=0.5, help="share of 'both' examples whose CNN vector is dropped whole")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-actors", default="1-16")
    p.add_argument("--val-actors", default="17-20")
    p.add_argument("--test-actors", default="21-24")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    data = acted.load(a.ravdess, a.emodb or None)
    parts = acted.split(data, a.split, acted.actor_list(a.train_actors), acted.actor_list(a.val_actors), acted.actor_list(a.test_actors))
    feats = acted.features(data, a.cache_dir, n_aug=a.augment, seed=a.seed)
    labels = list(acted.SPEECH_LABELS)
    flat = {k: acted.flat(v) for k, v in parts.items()}
    log: list[dict] = []
    whisper = torch.from_numpy(feats.whisper)
    heads: dict[str, SpeechHead] = {}
    cnn_epoch, t_cnn, cnn_vec = 0, 0.0, torch.zeros(len(feats.mels), 256)
    if not a.no_cnn:
        cnn_head, cnn_epoch = train_cnn(feats, data.y, flat, labels, a.epochs, a.patience, a.seed, log, a.init_cnn, a.lr)
        t_cnn = time.time() - t_start
        cnn_vec = cnn_vectors(cnn_head.speech, feats.mels)
        heads["cnn"] = cnn_head
    heads["whisper"] = train_on_vectors("whisper", None, whisper, feats, data.y, flat, labels, None, a.vector_epochs, a.seed, log)
    if not a.no_cnn:
        heads["both"] = train_on_vectors("both", cnn_vec, whisper, feats, data.y, flat, labels, cnn_head.speech, a.vector_epochs,
                                         a.seed, log, a.cnn_dropout, a.cnn_drop_all)
    val = evaluate_heads(heads, cnn_vec, whisper, feats, data, parts["val"])
    test = evaluate_heads(heads, cnn_vec, whisper, feats, data, parts["test"])
    floor = floors(feats, data, parts, a.seed)
    report: dict = {"split": a.split, "sets": {part: {k: len(v) for k, v in sets.items()} for part, sets in parts.items()},
                    "labels": labels, "cnn_init": a.init_cnn or "random", "cnn_lr": a.lr, "cnn_dropout": a.cnn_dropout,
                    "cnn_drop_all": a.cnn_drop_all, "cnn_best_epoch": cnn_epoch, "cnn_minutes": t_cnn / 60,
                    "val": val, "test": test, "floors": floor, "history": log}
    for key, rep in test.items():
        if key.endswith("/clean"):
            print(format_report(rep["meld"], f"{a.split} test {key}, MELD labels"), flush=True)
    for key, rep in floor.items():
        if key.startswith("test/") and key.endswith("/clean"):
            print(f"floor {key}: MELD WA {rep['meld']['wa']:.1f} WF1 {rep['meld']['wf1']:.1f}", flush=True)
    if not a.no_cnn:
        choice, why = choose_mode(val, parts, [c for c in a.choose_by.split(",") if c])
        chosen = heads[choice]
        first = next(iter(parts["test"]))
        rep = test[f"{first}/{choice}/clean"]
        title = f"{a.split}: {first}, speech only ({choice})"
        plot_confusion(rep["native"]["confusion"], rep["native"]["labels"], out / "test_confusion_native.png", title)
        plot_confusion(rep["meld"]["confusion"], MELD_LABELS, out / "test_confusion_meld.png", title + ", MELD labels")
        plot_curves([{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_wa": h["val_wa"]} for h in log if h["stage"] == "cnn"],
                    out / "cnn_curves.png", f"speech CNN, split {a.split}")
        state = {k: v for k, v in chosen.state_dict().items() if not k.startswith("head.")}
        torch.save({"mode": choice, "state": state, "head": chosen.head.state_dict(), "cnn_head": cnn_head.head.state_dict(),
                    "labels": labels, "split": a.split, "whisper_model": "", "whisper_dim": int(whisper.shape[1])}, out / "speech.pt")
        report |= {"choice": choice, "chosen_by": why}
        print(f"speech input: {choice} ({why})", flush=True)
    report["total_minutes"] = (time.time() - t_start) / 60
    (out / "speech_report.json").write_text(json.dumps(report, indent=1))
    print(f"split {a.split}: {report['total_minutes']:.1f} min", flush=True)
    return 0





if __name__ == "__main__":
    raise SystemExit(main())
