"""What else was tried for the sentiment head (training.sentiment), scored on MELD dev only.

The shipped head is logistic regression on the checkpoint's sentence vectors. This script measures
the alternatives against it on the same dev set: more inputs (the Bi-GRU's dialogue vector, the
model's own text-only emotion log-probabilities, the packaged encoder's vector before fine-tuning),
an MLP head instead of a linear one, a wider regularisation grid, a learning curve (the shipped
rule fitted on parts of MELD train: does more data help, e.g. refitting on train + dev?), and, with
--stage1, the vectors of other stage-1 encoders (training.text_finetune's encoder.pt, e.g. one
trained multi-task with --sentiment-weight). MELD test is never scored here, so nothing in it can
be chosen on test.

  python -m training.sentiment_ablations --meld ../shared/data/meld --checkpoint model/checkpoints/default.pt \
      [--stage1 runs/text_multitask/encoder.pt]

Writes training/reports/sentiment_ablations.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import load_checkpoint
from model.config import SENTIMENT_LABELS
from training.metrics import classification_report
from training.sentiment import dialogue_vectors, live_windows, meld_inputs
from training.text_finetune import previous_texts
from training.text_transfer import features

C_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2)
FAMILIES = ("lr", "mlp", "curve", "untuned")


def dev_wf1(y: np.ndarray, pred: np.ndarray) -> float:
    return round(classification_report(y, pred, SENTIMENT_LABELS)["wf1"], 2)


@torch.inference_mode()
def text_emotion(model, corpus, vecs: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The model's emotion log-probabilities from the words alone (speech absent, as on MELD),
    each utterance read live with up to context_window - 1 earlier ones."""
    model.eval()
    cfg = model.config
    out = np.zeros((len(vecs), len(cfg.labels)), np.float32)
    for idx, ctx, lengths in live_windows(corpus, vecs, cfg.context_window):
        present = torch.tensor([[False, True]] * len(idx))
        o = model.forward_features(torch.zeros(len(idx), cfg.speech_dim), ctx, lengths, lengths - 1, present)
        out[idx] = torch.log_softmax(o.logits.float(), dim=-1).numpy()
    return out


def encoder_vectors(enc, texts: list[str], contexts: list[list[str]]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each utterance's sentence vector from the TextEncoder `enc` (zeros for an empty transcript)."""
    rows = [i for i, t in enumerate(texts) if t]
    out = np.zeros((len(texts), enc.hidden_size), np.float32)
    out[rows] = features(enc, [texts[i] for i in rows], [contexts[i] for i in rows])
    return out


def stage1_vectors(path: Path, corpus) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Sentence vectors (with the encoder's own past context) from a stage-1 encoder.pt."""
    from model.text_encoder import TextEncoder

    blob = torch.load(path, map_location="cpu", weights_only=True)
    enc = TextEncoder(blob["encoder"], blob["max_tokens"])
    unexpected = enc.model.load_state_dict({k: v.float() for k, v in blob["layers"].items()}, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: layers that {blob['encoder']} does not have: {unexpected[:3]}")
    return encoder_vectors(enc, [u.text for u in corpus.utterances], previous_texts(corpus, blob["context"]))


def lr_grid(x: np.ndarray, y: np.ndarray, train: np.ndarray, dev: np.ndarray) -> dict:
    """Logistic regression on standardised x for every C: dev WF1 each, and the best."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit(x[train]).transform(x)
    by_c = {str(c): dev_wf1(y[dev], LogisticRegression(C=c, max_iter=3000).fit(z[train], y[train]).predict(z[dev]))
            for c in C_GRID}
    best = max(by_c, key=by_c.__getitem__)
    return {"dev_wf1": by_c[best], "C": float(best), "by_C": by_c}


def mlp(x: np.ndarray, y: np.ndarray, train: np.ndarray, dev: np.ndarray, hidden: int, weight_decay: float,
        epochs: int, seed: int = 0) -> dict:
    """One hidden layer (GELU, dropout 0.2 in / 0.5 hidden), AdamW lr 1e-3, batch 64: dev WF1 after every epoch."""
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    z = torch.tensor(StandardScaler().fit(x[train]).transform(x), dtype=torch.float32)
    yt = torch.from_numpy(y)
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(z.shape[1], hidden), nn.GELU(), nn.Dropout(0.5), nn.Linear(hidden, len(SENTIMENT_LABELS)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=weight_decay)
    history = []
    for _ in range(epochs):
        net.train()
        order = torch.from_numpy(train[rng.permutation(len(train))])
        for s in range(0, len(order), 64):
            b = order[s : s + 64]
            loss = nn.functional.cross_entropy(net(z[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            history.append(dev_wf1(y[dev], net(z[dev]).argmax(1).numpy()))
    best = int(np.argmax(history))
    return {"dev_wf1": history[best], "epoch": best + 1, "hidden": hidden, "weight_decay": weight_decay, "history": history}


def learning_curve(x: np.ndarray, y: np.ndarray, train: np.ndarray, dev: np.ndarray, c: float,
                   fractions: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0), repeats: int = 3) -> list[dict]:
    """The shipped rule (C fixed) fitted on random parts of train: mean dev WF1 per fraction."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = []
    for frac in fractions:
        scores = []
        for seed in range(repeats if frac < 1 else 1):
            sub = np.random.default_rng(seed).permutation(train)[: max(2, int(frac * len(train)))]
            sc = StandardScaler().fit(x[sub])
            clf = LogisticRegression(C=c, max_iter=3000).fit(sc.transform(x[sub]), y[sub])
            scores.append(dev_wf1(y[dev], clf.predict(sc.transform(x[dev]))))
        out.append({"fraction": frac, "n": int(max(2, int(frac * len(train)))), "dev_wf1": scores,
                    "mean": round(float(np.mean(scores)), 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meld", required=True)
    p.add_argument("--checkpoint", default="model/checkpoints/default.pt")
    p.add_argument("--encoder", default=None, help="where the checkpoint's encoder is found (a local copy)")
    p.add_argument("--report", default="training/reports/sentiment_ablations.json")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"any of {', '.join(FAMILIES)}")
    p.add_argument("--mlp-epochs", type=int, default=30)
    p.add_argument("--stage1", action="append", default=[], help="a stage-1 encoder.pt whose vectors are tried too (repeatable)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    families = [f for f in a.families.split(",") if f]
    if not families or set(families) - set(FAMILIES):
        p.error(f"--families: any of {', '.join(FAMILIES)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    model = load_checkpoint(a.checkpoint, device="cpu", encoder=a.encoder)
    corpus, y, x = meld_inputs(model, a.meld, a.cache_dir)
    texts = [u.text for u in corpus.utterances]
    train, dev = (np.array([i for i, u in enumerate(corpus.utterances) if u.part == k and u.text]) for k in ("train", "dev"))
    emo = text_emotion(model, corpus, x)
    inputs = {"sentence": x, "sentence+dialogue": np.concatenate([x, dialogue_vectors(model, corpus, x)], axis=1),
              "sentence+text emotion": np.concatenate([x, emo], axis=1)}
    report: dict = {"rule": "every variant fitted on MELD train and scored on MELD dev (weighted F1); MELD test is never scored here",
                    "checkpoint": str(a.checkpoint), "sizes": {"train": int(len(train)), "dev": int(len(dev))}}
    shipped = lr_grid(x, y, train, dev)
    report["shipped_rule"] = {"input": "sentence", **shipped}
    if "untuned" in families:
        from model.text_encoder import TextEncoder

        untuned = TextEncoder(model.config.encoder if a.encoder is None else a.encoder, model.config.max_text_tokens)
        u = encoder_vectors(untuned, texts, [[] for _ in texts])
        inputs["untuned encoder"] = u
        inputs["sentence+untuned encoder"] = np.concatenate([x, u], axis=1)
    for path in a.stage1:
        inputs[f"stage-1 encoder {path}"] = stage1_vectors(Path(path), corpus)
    if "lr" in families or "untuned" in families or a.stage1:
        report["logistic_regression"] = {name: lr_grid(v, y, train, dev) for name, v in inputs.items() if name != "sentence"}
    if "mlp" in families:
        report["mlp"] = [{"input": name, **mlp(inputs[name], y, train, dev, h, wd, a.mlp_epochs)}
                         for name in ("sentence", "sentence+text emotion") for h in (128, 512) for wd in (1e-2, 1e-1)]
    if "curve" in families:
        report["learning_curve"] = learning_curve(x, y, train, dev, shipped["C"])
    others = [(f"logistic regression on {k}", v["dev_wf1"]) for k, v in report.get("logistic_regression", {}).items()]
    others += [(f"MLP {m['hidden']} (wd {m['weight_decay']}) on {m['input']}", m["dev_wf1"]) for m in report.get("mlp", [])]
    if others:
        name, best = max(others, key=lambda t: t[1])
        report["best_alternative"] = {"variant": name, "dev_wf1": best, "margin_over_shipped": round(best - shipped["dev_wf1"], 2)}
    report["minutes"] = round((time.time() - t0) / 60, 1)
    Path(a.report).parent.mkdir(parents=True, exist_ok=True)
    Path(a.report).write_text(json.dumps(report, indent=1))
    print(f"shipped rule: dev WF1 {shipped['dev_wf1']} (C {shipped['C']})")
    for k, v in others:
        print(f"  {k}: dev WF1 {v}")
    for r in report.get("learning_curve", []):
        print(f"  shipped rule on {r['fraction']:.0%} of train: dev WF1 {r['mean']}")
    print(f"wrote {a.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
