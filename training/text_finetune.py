"""Stage 1 of the recipe: fine-tune the sentence encoder on MELD text with past context.

Each MELD utterance is encoded as the pair (utterance, its earlier utterances, most recent first),
exactly as `TextEncoder.tokenize` builds it when serving, mean-pooled, and classified by a linear
head. Word embeddings stay frozen (they are the bulk of the weights and are read from the packaged
encoder); the transformer layers are trained. The best epoch on MELD dev (WF1) is kept.
`--sentiment-weight W` makes it multi-task: a second linear head on the same vector learns MELD's
sentiment labels, its loss weighted by W (the epoch is still chosen on emotion). With the packaged
MiniLM (W 1, 3 epochs) a linear sentiment head on its vectors scored MELD dev WF1 68.8 against 69.0
for the shipped encoder (MODEL_CARD.md, "What did not reach 70"), so the recipe trains on emotion
alone; `python -m training.sentiment_ablations --stage1 OUT/encoder.pt` scores such an encoder.

  python -m training.text_finetune --meld ../shared/data/meld --out runs/text --epochs 3

Writes out/encoder.pt ({"config", "layers": fine-tuned encoder weights in fp16, "history"}) and
out/text_finetune.json. Test scores are computed once, for the kept epoch, and never used for a choice.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.config import MELD_LABELS, PACKAGED_ENCODER, SENTIMENT_LABELS
from model.text_encoder import TextEncoder
from training.datasets import Corpus, load_meld, split_corpus
from training.epochs import KeepBest, module_state, step
from training.metrics import classification_report, format_report

FROZEN_PREFIXES = ("embeddings.",)  # encoder parameters that keep their pre-trained values


def frozen_prefixes(encoder: TextEncoder, train_layers: int = 0) -> tuple[str, ...]:
    """FROZEN_PREFIXES, plus the lower transformer layers when only the top `train_layers` train."""
    n = encoder.model.config.num_hidden_layers
    if train_layers <= 0 or train_layers >= n:
        return FROZEN_PREFIXES
    return FROZEN_PREFIXES + tuple(f"encoder.layer.{k}." for k in range(n - train_layers))


def previous_texts(corpus: Corpus, n: int) -> list[list[str]]:
    """For each utterance: up to `n` earlier utterances of its dialogue, most recent first."""
    out: list[list[str]] = [[] for _ in corpus.utterances]
    for members in corpus.dialogues.values():
        for p, i in enumerate(members):
            out[i] = [corpus.utterances[j].text for j in reversed(members[max(0, p - n) : p])]
    return out


def trainable_state(encoder: TextEncoder, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The fine-tuned part of the encoder (everything but FROZEN_PREFIXES), as stored."""
    return {k: v.detach().cpu().to(dtype) for k, v in encoder.model.state_dict().items()
            if not k.startswith(FROZEN_PREFIXES) and v.is_floating_point()}


class Classifier(nn.Module):
    """The encoder's pooled vector -> emotion logits; with `sentiment`, also MELD sentiment logits
    from a second head on the same vector (multi-task: --sentiment-weight)."""

    def __init__(self, encoder: TextEncoder, num_labels: int, dropout: float = 0.1, sentiment: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, num_labels)
        self.sentiment = nn.Linear(encoder.hidden_size, len(SENTIMENT_LABELS)) if sentiment else None

    def forward(self, tok) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.both(tok)[0]  # (B, C)

    def both(self, tok) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[no-untyped-def]
        v = self.dropout(self.encoder.pool(tok))
        return self.head(v), None if self.sentiment is None else self.sentiment(v)


def _batches(idx: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (less padding, so a CPU epoch is much shorter)."""
    idx = idx[:]
    rng.shuffle(idx)
    pool = batch_size * 50
    out = []
    for s in range(0, len(idx), pool):
        chunk = sorted(idx[s : s + pool], key=lambda i: lengths[i])
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


@torch.inference_mode()
def predict(model: Classifier, texts: list[str], contexts: list[list[str]], idx: list[int],
            batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(len(idx), C) emotion logits, and the sentiment head's (len(idx), 3) when the classifier has
    one (else None), from one encoder pass."""
    model.eval()
    dev = model.head.weight.device
    order = sorted(range(len(idx)), key=lambda k: len(texts[idx[k]]) + sum(len(c) for c in contexts[idx[k]]))
    emotion = np.zeros((len(idx), model.head.out_features), np.float32)
    sentiment = None if model.sentiment is None else np.zeros((len(idx), model.sentiment.out_features), np.float32)
    for s in range(0, len(order), batch_size):
        ks = order[s : s + batch_size]
        tok = model.encoder.tokenize([texts[idx[k]] for k in ks], [contexts[idx[k]] for k in ks]).to(dev)
        emo, senti = model.both(tok)
        emotion[ks] = emo.float().cpu().numpy()
        if sentiment is not None:
            sentiment[ks] = senti.float().cpu().numpy()  # type: ignore[union-attr]
    return emotion, sentiment


def extract(checkpoint: str | Path, out: str | Path) -> Path:
    """Stage 1's output (encoder.pt) taken back out of a recipe checkpoint, whose fine-tuned layers
    (fp16) are exactly the ones stage 1 stored: later stages can be re-run without fine-tuning
    again (40 CPU minutes). The linear head of stage 1 is not in a checkpoint: stage 3 does not use it."""
    from model.checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt["config"]
    prefix = "text_encoder.model."
    layers = {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not cfg.encoder_layers_only or not layers:
        raise ValueError(f"{checkpoint} holds no fine-tuned encoder layers")
    path = Path(out) / "encoder.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder": cfg.encoder, "max_tokens": cfg.max_text_tokens, "context": cfg.text_context, "layers": layers,
                "history": ckpt["metadata"].get("stage1"), "extracted_from": str(checkpoint)}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meld", help="folder with MELD's {train,dev,test}_sent_emo.csv")
    p.add_argument("--extract", default="", help="write OUT/encoder.pt from this recipe checkpoint's encoder layers instead of training")
    p.add_argument("--out", default="runs/text")
    p.add_argument("--encoder", default=PACKAGED_ENCODER)
    p.add_argument("--split", default="official", help="MELD split: official (dev chooses), paper, paper-dialogues")
    p.add_argument("--context", type=int, default=3, help="earlier utterances in the encoder input")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--train-layers", type=int, default=0, help=">0: train only the top K transformer layers (partial freezing)")
    p.add_argument("--sentiment-weight", type=float, default=0.0,
                   help=">0: multi-task: a second head learns MELD sentiment, its loss weighted by this (the epoch is still chosen on emotion)")
    p.add_argument("--save-epochs", action="store_true", help="also write OUT/epochK.pt after every epoch (for training.text_transfer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-train", type=int, default=0, help=">0: a subset (smoke tests)")
    a = p.parse_args(argv)
    if a.extract:
        print(f"wrote {extract(a.extract, a.out)}", flush=True)
        return 0
    if not a.meld:
        p.error("--meld is required")

    from model.emotion_model import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    dev = resolve_device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_meld(a.meld)
    texts = [u.text for u in corpus.utterances]
    contexts = previous_texts(corpus, a.context)
    y = np.array([MELD_LABELS.index(u.label) for u in corpus.utterances])
    ys = np.array([SENTIMENT_LABELS.index(u.sentiment) for u in corpus.utterances])
    multitask = a.sentiment_weight > 0
    named = split_corpus(corpus, a.split, a.seed)  # {train, val, test}; the validation part chooses the epoch
    parts = {k: [i for i in named[src] if corpus.utterances[i].text] for k, src in (("train", "train"), ("dev", "val"), ("test", "test"))}
    if a.max_train:
        parts = {k: v[: a.max_train] for k, v in parts.items()}

    encoder = TextEncoder(a.encoder, a.max_tokens, frozen=False)
    frozen = frozen_prefixes(encoder, a.train_layers)
    for name, prm in encoder.model.named_parameters():
        prm.requires_grad_(not name.startswith(frozen))
    model = Classifier(encoder, len(MELD_LABELS), sentiment=multitask).to(dev)
    heads = [*model.head.parameters(), *(model.sentiment.parameters() if model.sentiment is not None else [])]
    opt = torch.optim.AdamW([
        {"params": [q for q in encoder.parameters() if q.requires_grad], "lr": a.lr},
        {"params": heads, "lr": a.head_lr},
    ], weight_decay=0.01)
    lengths = [len(texts[i]) + sum(len(c) for c in contexts[i]) for i in range(len(texts))]
    steps_per_epoch = math.ceil(len(parts["train"]) / a.batch_size)
    total = steps_per_epoch * a.epochs
    warm = max(1, int(a.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))

    history, t_start = [], time.time()
    keep = KeepBest(snapshot=lambda: {"encoder": trainable_state(encoder, torch.float32), "head": module_state(model.head, cpu=True),
                                      **({"sentiment_head": module_state(model.sentiment, cpu=True)} if model.sentiment is not None else {})})
    for epoch in keep.epochs(a.epochs):
        model.train()
        t0, losses = time.time(), []
        bar = tqdm(_batches(parts["train"], lengths, a.batch_size, rng), desc=f"epoch {epoch}", unit="batch")
        for b in bar:
            tok = encoder.tokenize([texts[i] for i in b], [contexts[i] for i in b]).to(dev)
            emo, senti = model.both(tok)
            loss = F.cross_entropy(emo, torch.from_numpy(y[b]).to(dev))
            if senti is not None:
                loss = loss + a.sentiment_weight * F.cross_entropy(senti, torch.from_numpy(ys[b]).to(dev))
            losses.append(step(opt, loss, clip=1.0, params=model.parameters(), scheduler=sched))
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        dev_logits, dev_senti = predict(model, texts, contexts, parts["dev"])
        rep = classification_report(y[parts["dev"]], dev_logits.argmax(1), MELD_LABELS)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "dev_wf1": rep["wf1"], "dev_acc": rep["acc"],
                        "dev_wa": rep["wa"], "seconds": time.time() - t0})
        if multitask:
            srep = classification_report(ys[parts["dev"]], dev_senti.argmax(1), SENTIMENT_LABELS)  # type: ignore[union-attr]
            history[-1]["dev_sentiment_wf1"] = srep["wf1"]
            print(f"epoch {epoch}: sentiment dev WF1 {srep['wf1']:.2f}", flush=True)
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}  dev WF1 {rep['wf1']:.2f} acc {rep['acc']:.2f} "
              f"WA {rep['wa']:.2f}  ({time.time() - t0:.0f} s)", flush=True)
        if a.save_epochs:
            torch.save({"encoder": a.encoder, "max_tokens": a.max_tokens, "context": a.context, "layers": trainable_state(encoder),
                        "head": module_state(model.head, cpu=True), "epoch": epoch},
                       out / f"epoch{epoch}.pt")
        keep.update(epoch, rep["wf1"])
        (out / "history.json").write_text(json.dumps(history, indent=1))

    best_state = keep.state
    model.encoder.model.load_state_dict(best_state["encoder"], strict=False)
    model.head.load_state_dict(best_state["head"])
    if model.sentiment is not None:
        model.sentiment.load_state_dict(best_state["sentiment_head"])
    # stored in fp16: score dev again from the fp16 weights, so the reported numbers are the shipped ones
    half = {k: v.half() for k, v in best_state["encoder"].items()}
    model.encoder.model.load_state_dict({k: v.float() for k, v in half.items()}, strict=False)
    result = {"config": vars(a), "history": history, "minutes": (time.time() - t_start) / 60,
              "frozen_prefixes": list(frozen), "machine": f"{torch.get_num_threads()} torch threads, {dev}"}
    for part in ("dev", "test"):
        logits, senti_logits = predict(model, texts, contexts, parts[part])
        rep = classification_report(y[parts[part]], logits.argmax(1), MELD_LABELS)
        result[part] = rep
        print(format_report(rep, f"MELD {a.split} {part} (kept epoch, fp16 weights)"), flush=True)
        if multitask:
            srep = classification_report(ys[parts[part]], senti_logits.argmax(1), SENTIMENT_LABELS)  # type: ignore[union-attr]
            result[f"{part}_sentiment"] = srep
            print(format_report(srep, f"MELD {a.split} {part} sentiment (kept epoch)"), flush=True)
    torch.save({"encoder": a.encoder, "max_tokens": a.max_tokens, "context": a.context, "layers": half,
                "head": best_state["head"], "history": history,
                **({"sentiment_head": best_state["sentiment_head"]} if multitask else {})}, out / "encoder.pt")
    (out / "text_finetune.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
