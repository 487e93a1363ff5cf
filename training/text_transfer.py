"""Which stage-1 text encoder transfers: fine-tuning variants compared on MELD seasons it never saw.

Stage 3 keeps the text encoder fixed and trains its own layers on the encoder's pooled output, so an
encoder is judged here the same way: a linear probe (logistic regression, C chosen on the dev part)
trained on its fixed features of MELD train, scored on MELD seasons left out of every training step
(`--split seasons:8+9` in training.text_finetune: train and dev of seasons 1-7 train and choose, the
train + dev utterances of seasons 8 and 9 judge). Candidates:

  frozen          the packaged encoder as it is
  RUN@K           a fine-tuning run's encoder after epoch K (fewer epochs; partial freezing is a run
                  trained with --train-layers)
  RUN@K~A         weight averaging with the pre-trained encoder: A * fine-tuned + (1 - A) * frozen
  RUN@K+frozen    (fine-tuned model's own head, averaged in probability with the frozen probe: a
                  reference; it costs two encoder passes per utterance when serving)

The choice is the best held-out-season WF1; MELD's official test is scored for the report only.

  python -m training.text_transfer --meld ../shared/data/meld \
      --run full=runs/text_s89_full --run top3=runs/text_s89_top3 --out training/reports/text_transfer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.config import MELD_LABELS, PACKAGED_ENCODER
from model.text_encoder import TextEncoder
from training.datasets import load_meld, split_corpus
from training.metrics import classification_report
from training.text_finetune import previous_texts

PARTS = ("train", "val", "held", "test")  # held: the left-out seasons; test: MELD official test


def _layers(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.model.state_dict().items() if not k.startswith("embeddings.") and v.is_floating_point()}


def interpolate(pre: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """alpha * tuned + (1 - alpha) * pre, for every fine-tuned tensor (alpha 1: the fine-tuned encoder)."""
    return {k: (alpha * tuned[k].float() + (1 - alpha) * pre[k].float()) for k in tuned}


@torch.inference_mode()
def features(encoder: TextEncoder, texts: list[str], contexts: list[list[str]], batch_size: int = 64) -> np.ndarray:
    """Pooled encoder output of every utterance (with its past context), in length order for speed."""
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + sum(map(len, contexts[i])))
    out = np.zeros((len(texts), encoder.hidden_size), np.float32)
    for s in range(0, len(order), batch_size):
        ids = order[s : s + batch_size]
        out[ids] = encoder([texts[i] for i in ids], contexts=[contexts[i] for i in ids]).float().numpy()
    return out


def probe(x: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], cs=(0.1, 1.0, 10.0)) -> tuple[dict, np.ndarray]:
    """Logistic regression on train, C chosen on val (WF1); reports on every part, and test probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[parts["train"]])
    z = scaler.transform(x)
    best = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=3000).fit(z[parts["train"]], y[parts["train"]])
        wf1 = classification_report(y[parts["val"]], clf.predict(z[parts["val"]]), MELD_LABELS)["wf1"]
        if best is None or wf1 > best[0]:
            best = (wf1, c, clf)
    _, c, clf = best
    proba = np.zeros((len(y), len(MELD_LABELS)), np.float32)
    proba[:, clf.classes_] = clf.predict_proba(z)
    rep = {"C": c}
    for k in ("val", "held", "test"):
        rep[k] = _scores(y[parts[k]], proba[parts[k]].argmax(1))
    return rep, proba


def _scores(y: np.ndarray, pred: np.ndarray) -> dict:
    r = classification_report(y, pred, MELD_LABELS)
    return {"wf1": round(r["wf1"], 2), "wa": round(r["wa"], 2), "acc": round(r["acc"], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meld", required=True)
    p.add_argument("--run", action="append", default=[], help="NAME=DIR of a text_finetune run made with --save-epochs on the seasons split")
    p.add_argument("--seasons", default="8+9", help="the left-out seasons the runs were trained without")
    p.add_argument("--alphas", default="0.5", help="weight-averaging factors to try on each run's dev-kept epoch")
    p.add_argument("--encoder", default=PACKAGED_ENCODER)
    p.add_argument("--cache", default="cache/text_transfer")
    p.add_argument("--out", default="training/reports/text_transfer.json")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help=">0: the first N utterances of each part (smoke tests)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    corpus = load_meld(a.meld)
    texts = [u.text for u in corpus.utterances]
    contexts = previous_texts(corpus, 3)
    y = np.array([MELD_LABELS.index(u.label) for u in corpus.utterances])
    split = split_corpus(corpus, f"seasons:{a.seasons}")
    keep = [i for i, u in enumerate(corpus.utterances) if u.text]
    test = [i for i, u in enumerate(corpus.utterances) if u.part == "test"]
    parts_full = {"train": split["train"], "val": split["val"], "held": split["test"], "test": test}
    # rows with text only, indexed into `keep`
    pos = {i: k for k, i in enumerate(keep)}
    if a.limit:
        parts_full = {k: v[: a.limit] for k, v in parts_full.items()}
        keep = sorted({i for v in parts_full.values() for i in v if corpus.utterances[i].text})
        pos = {i: k for k, i in enumerate(keep)}
    parts = {k: np.array([pos[i] for i in v if i in pos]) for k, v in parts_full.items()}
    texts_k, ctx_k, y_k = [texts[i] for i in keep], [contexts[i] for i in keep], y[keep]

    max_tokens = 128
    encoder = TextEncoder(a.encoder, max_tokens, frozen=False)
    pre = _layers(encoder)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)

    def feats(name: str, layers: dict[str, torch.Tensor], source: str = a.encoder) -> np.ndarray:
        key = hashlib.sha1(f"{source}|{a.limit}|{len(keep)}".encode()).hexdigest()[:10]
        path = cache / f"{name.replace('@', '_e').replace('~', '_a')}_{key}.npy"
        if path.is_file():
            return np.load(path)
        encoder.model.load_state_dict({k: v.float() for k, v in layers.items()}, strict=False)
        t = time.time()
        x = features(encoder, texts_k, ctx_k)
        print(f"  {name}: features in {time.time() - t:.0f} s", flush=True)
        np.save(path, x)
        return x

    results: dict[str, dict] = {}
    frozen_rep, frozen_p = probe(feats("frozen", pre), y_k, parts)
    results["frozen"] = {"probe": frozen_rep}
    print(f"frozen: held WF1 {frozen_rep['held']['wf1']:.2f}  test {frozen_rep['test']['wf1']:.2f}", flush=True)
    for spec in a.run:
        name, run_dir = spec.split("=", 1)
        run_dir = Path(run_dir)
        history = json.loads((run_dir / "history.json").read_text())
        kept = max(history, key=lambda h: h["dev_wf1"])["epoch"]
        for h in history:
            blob = torch.load(run_dir / f"epoch{h['epoch']}.pt", map_location="cpu", weights_only=False)
            cand = f"{name}@{h['epoch']}"
            rep, _ = probe(feats(cand, blob["layers"], str(run_dir.resolve())), y_k, parts)
            entry = {"probe": rep, "epoch": h["epoch"], "dev_kept": h["epoch"] == kept, "run": str(run_dir)}
            if h["epoch"] == kept:  # the run's own head, alone and averaged with the frozen probe
                encoder.model.load_state_dict({k: v.float() for k, v in blob["layers"].items()}, strict=False)
                head = torch.nn.Linear(encoder.hidden_size, len(MELD_LABELS))
                head.load_state_dict(blob["head"])
                x = torch.from_numpy(feats(cand, blob["layers"], str(run_dir.resolve())))
                with torch.inference_mode():
                    own = torch.softmax(head(x), -1).numpy()
                entry["own_head"] = {k: _scores(y_k[parts[k]], own[parts[k]].argmax(1)) for k in ("val", "held", "test")}
                mix = (own + frozen_p) / 2
                results[f"{cand}+frozen"] = {"output_average": {k: _scores(y_k[parts[k]], mix[parts[k]].argmax(1)) for k in ("val", "held", "test")}}
                for alpha in (float(s) for s in a.alphas.split(",")):
                    c2 = f"{cand}~{alpha:g}"
                    r2, _ = probe(feats(c2, interpolate(pre, blob["layers"], alpha), str(run_dir.resolve())), y_k, parts)
                    results[c2] = {"probe": r2, "epoch": h["epoch"], "alpha": alpha, "run": str(run_dir)}
                    print(f"{c2}: held WF1 {r2['held']['wf1']:.2f}  test {r2['test']['wf1']:.2f}", flush=True)
            results[cand] = entry
            print(f"{cand}: held WF1 {rep['held']['wf1']:.2f}  test {rep['test']['wf1']:.2f}", flush=True)

    probed = {k: v["probe"] for k, v in results.items() if "probe" in v}
    choice = max(probed, key=lambda k: probed[k]["held"]["wf1"])
    report = {
        "seasons_held_out": a.seasons, "sizes": {k: int(len(v)) for k, v in parts.items()},
        "rule": "linear probe on fixed features (stage 3 keeps the encoder fixed); choice = best held-out-season WF1; MELD test reported only",
        "choice": choice, "results": results, "minutes": round((time.time() - t0) / 60, 1),
        "machine": f"{torch.get_num_threads()} torch threads, cpu",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _plot(report, out.with_suffix(".png"))
    print(f"choice: {choice}  (held WF1 {probed[choice]['held']['wf1']:.2f}, MELD test {probed[choice]['test']['wf1']:.2f})")
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v["probe"]) for k, v in report["results"].items() if "probe" in v]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ys = np.arange(len(rows))
    ax.barh(ys - 0.2, [r["held"]["wf1"] for _, r in rows], 0.4, label=f"seasons {report['seasons_held_out']} (chooses)")
    ax.barh(ys + 0.2, [r["test"]["wf1"] for _, r in rows], 0.4, label="MELD test (report)")
    ax.set_yticks(ys, [k + ("  <- choice" if k == report["choice"] else "") for k, _ in rows])
    ax.set_xlabel("WF1 of a linear probe on the fixed encoder")
    lo = min(min(r["held"]["wf1"], r["test"]["wf1"]) for _, r in rows)
    ax.set_xlim(max(0, lo - 5), None)
    ax.legend(loc="lower right")
    ax.set_title("Stage-1 text encoder: what transfers to unseen MELD seasons")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
