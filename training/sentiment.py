"""Sentiment per utterance: a linear head on the checkpoint's own sentence vectors, fitted on MELD.

Call analytics (Contact Lens, AssemblyAI, Deepgram) give every utterance a sentiment. MELD labels
each utterance positive / neutral / negative besides its emotion. Stage 3 keeps the text encoder
fixed, so the sentence vector it caches per utterance (the words read with their 3 earlier
utterances) is the input here too: logistic regression on MELD train, regularisation and class
weighting chosen on MELD dev (weighted F1), as is the input: the sentence vector alone or with the
Bi-GRU's dialogue vector (the window of 8 utterances the emotion head reads); MELD test scored once for the report. The head is folded
into one nn.Linear (the standardisation included) and written into the checkpoint with
`sentiment_labels` in its config; serving then puts `sentiment` and `sentiment_score` on every
emotion event (model.emotion_model.EmotionModel.predict). An utterance without words gets its
sentiment from the emotion scores instead (model.emotion_model.sentiment_from_emotion).

  python -m training.sentiment --meld ../shared/data/meld --checkpoint model/checkpoints/default.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import SENTIMENT_LABELS
from training.datasets import load_meld
from training.metrics import classification_report, format_report
from training.text_finetune import previous_texts
from training.text_transfer import features


def encoder_key(model: torch.nn.Module) -> str:
    """A hash of the text encoder's weights: the sentence-vector cache is valid while they are unchanged."""
    h = hashlib.sha1()
    for k, v in sorted(model.text_encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:12]


def sentence_vectors(model, texts: list[str], contexts: list[list[str]], cache: Path | None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The vectors serving caches per utterance (EmotionModel.encode_utterances), zero rows for empty texts."""
    if cache is not None and cache.is_file():
        return np.load(cache)
    vecs = np.zeros((len(texts), model.config.encoder_dim), np.float32)
    n, rows = model.config.text_context, [i for i, t in enumerate(texts) if t]
    if rows:
        vecs[rows] = features(model.text_encoder, [texts[i] for i in rows], [contexts[i][:n] for i in rows])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vecs)
    return vecs


def live_windows(corpus, vecs: np.ndarray, window: int, batch: int = 256):  # type: ignore[no-untyped-def]
    """Every utterance's window as served live (itself and up to window - 1 earlier utterances of its
    dialogue, no lookahead), in batches: (utterance indices, (B, window, D) zero-padded vectors, lengths)."""
    rows = [(i, members[max(0, p - window + 1) : p + 1]) for members in corpus.dialogues.values() for p, i in enumerate(members)]
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        ctx = torch.zeros(len(chunk), window, vecs.shape[1])
        for b, (_, win) in enumerate(chunk):
            ctx[b, : len(win)] = torch.from_numpy(vecs[win])
        yield [i for i, _ in chunk], ctx, torch.tensor([len(win) for _, win in chunk])


@torch.inference_mode()
def dialogue_vectors(model, corpus, vecs: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The Bi-GRU's vector at each utterance, read live: the target and up to context_window - 1
    earlier utterances of its dialogue (EmotionModel.predict with no lookahead)."""
    model.eval()
    out = np.zeros((len(vecs), model.config.text_dim), np.float32)
    for idx, ctx, lengths in live_windows(corpus, vecs, model.config.context_window):
        out[idx] = model.dialogue(ctx, lengths, lengths - 1).float().numpy()
    return out


# inverse L2 strengths tried; 1e-4 and 3e-4 were added when 1e-3, then the grid's smallest, won on dev
C_GRID = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)


def meld_inputs(model, meld: str | Path, cache_dir: str | Path):  # type: ignore[no-untyped-def]
    """MELD read for the sentiment head: (corpus, sentiment label indices, the model's sentence
    vector of every utterance, cached under cache_dir/sentiment)."""
    corpus = load_meld(meld)
    texts = [u.text for u in corpus.utterances]
    y = np.array([SENTIMENT_LABELS.index(u.sentiment) for u in corpus.utterances])
    x = sentence_vectors(model, texts, previous_texts(corpus, model.config.text_context),
                         Path(cache_dir) / "sentiment" / f"meld-{encoder_key(model)}.npy")
    return corpus, y, x


def fit_head(x: np.ndarray, y: np.ndarray, train: np.ndarray, dev: np.ndarray) -> tuple[nn.Linear, dict]:
    """Logistic regression on standardised vectors, C and class weighting chosen on dev WF1, folded
    into one nn.Linear on the raw vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    z = scaler.transform(x)
    tried, best = [], None
    for weight in (None, "balanced"):
        for c in C_GRID:
            clf = LogisticRegression(C=c, class_weight=weight, max_iter=3000).fit(z[train], y[train])
            wf1 = classification_report(y[dev], clf.predict(z[dev]), SENTIMENT_LABELS)["wf1"]
            tried.append({"C": c, "class_weight": weight, "dev_wf1": round(wf1, 2)})
            if best is None or wf1 > best[0]:
                best = (wf1, c, weight, clf)
    _, c, weight, clf = best
    if list(clf.classes_) != list(range(len(SENTIMENT_LABELS))):
        raise ValueError(f"MELD train lacks a sentiment class (have {list(clf.classes_)})")
    w = clf.coef_ / scaler.scale_[None, :]
    b = clf.intercept_ - w @ scaler.mean_
    head = nn.Linear(x.shape[1], len(SENTIMENT_LABELS))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    return head, {"C": c, "class_weight": weight, "tried": tried}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meld", required=True)
    p.add_argument("--checkpoint", default="model/checkpoints/default.pt", help="read, and written back with the head")
    p.add_argument("--out", default="", help="write the checkpoint here instead of over --checkpoint")
    p.add_argument("--report", default="training/reports/sentiment.json")
    p.add_argument("--encoder", default=None, help="where the checkpoint's encoder is found (a local copy)")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    model = load_checkpoint(a.checkpoint, device="cpu", encoder=a.encoder)
    corpus, y, x = meld_inputs(model, a.meld, a.cache_dir)
    parts = {k: np.array([i for i, u in enumerate(corpus.utterances) if u.part == k and u.text]) for k in ("train", "dev", "test")}
    inputs = {"sentence": x, "sentence+dialogue": np.concatenate([x, dialogue_vectors(model, corpus, x)], axis=1)}
    fits = {name: fit_head(v, y, parts["train"], parts["dev"]) for name, v in inputs.items()}
    best = max(fits, key=lambda k: max(t["dev_wf1"] for t in fits[k][1]["tried"]))  # chosen on dev
    head, chosen = fits[best]
    chosen = {**chosen, "input": best, "inputs_dev_wf1": {k: max(t["dev_wf1"] for t in f[1]["tried"]) for k, f in fits.items()}}
    with torch.inference_mode():
        pred = head(torch.from_numpy(inputs[best])).argmax(1).numpy()
    report = {"rule": "logistic regression on the checkpoint's sentence vectors (text + 3 earlier utterances); "
                      "C and class weighting chosen on MELD dev WF1; MELD test scored once",
              "checkpoint": str(a.checkpoint), "chosen": chosen, "sizes": {k: int(len(v)) for k, v in parts.items()}}
    for part in ("dev", "test"):
        rep = classification_report(y[parts[part]], pred[parts[part]], SENTIMENT_LABELS)
        report[part] = rep
        print(format_report(rep, f"MELD {part} sentiment"), flush=True)
    cfg = dataclasses.replace(model.config, sentiment_labels=SENTIMENT_LABELS, sentiment_dialogue=best == "sentence+dialogue")
    model.config = cfg
    model.sentiment_head = head
    meta = dict(getattr(model, "metadata", {}) or {})
    meta["sentiment"] = {k: report["test"][k] for k in ("acc", "wa", "wf1")} | {"chosen": {k: chosen[k] for k in ("C", "class_weight", "input")}}
    out = save_checkpoint(model, a.out or a.checkpoint, metadata=meta)
    report["minutes"] = round((time.time() - t0) / 60, 1)
    Path(a.report).parent.mkdir(parents=True, exist_ok=True)
    Path(a.report).write_text(json.dumps(report, indent=1))
    from training.report import plot_confusion

    plot_confusion(report["test"]["confusion"], SENTIMENT_LABELS, Path(a.report).with_suffix(".png"),
                   f"MELD test sentiment (WF1 {report['test']['wf1']:.1f})")
    print(f"wrote {out} (sentiment head) and {a.report}; MELD test WF1 {report['test']['wf1']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
