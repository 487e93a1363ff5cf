"""Training and evaluation loops.

Every example is built like `EmotionModel.predict` builds a live request: the window is the target
utterance and up to context_window-1 earlier utterances of its dialogue, plus (with probability
`lookahead_prob`, as in a revision) the next one; `target` is the target's index in the window.
Missing modalities are masked through `present`, so their fusion weight is exactly 0.

Frozen-encoder mode (default) looks sentence vectors up in a table computed once (training.cache);
fine-tuning mode runs the encoder on each batch's texts. The speech CNN is trained on log-mels
(with SpecAugment) or, with `freeze_speech`, replaced by its cached embeddings.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import EmotionModel, MELD_LABELS, ModelConfig, load_checkpoint, resolve_device, save_checkpoint
from model import features
from model.checkpoint import read_checkpoint
from training import cache, distributed
from training.config import TrainConfig
from training.datasets import TO_MELD, Corpus, fingerprint, load_spec, split_corpus
from training.epochs import KeepBest, step
from training.metrics import classification_report, format_report


# ---- the feature table: every utterance of every corpus in one indexable place -----------------
@dataclass
class Table:
    """All utterances of the corpora in a run, with their cached features, indexed globally."""

    corpora: list[Corpus]
    offsets: list[int]  # global index of each corpus's first utterance
    labels: np.ndarray  # (N,) model label id, -1 when the label has no model class
    texts: list[str]
    has_text: np.ndarray  # (N,) bool
    has_audio: np.ndarray  # (N,) bool
    dialogue: list[np.ndarray]  # per utterance: global indices of its dialogue, in order
    position: np.ndarray  # (N,) position of the utterance in its dialogue
    text_vecs: torch.Tensor | None  # (N + 1, D), last row zeros; None in fine-tuning mode
    mels: list[np.ndarray | None]
    speech_vecs: torch.Tensor | None = None  # (N, S) when the speech CNN is frozen

    def __len__(self) -> int:
        return len(self.texts)


def label_map(corpus: Corpus, model_labels: Sequence[str]) -> dict[str, int]:
    """Native label -> model class id: identity when the model speaks the corpus's labels, else via
    the documented mapping onto MELD's labels."""
    if set(corpus.labels) <= set(model_labels):
        return {lab: model_labels.index(lab) for lab in corpus.labels}
    if tuple(model_labels) == MELD_LABELS or set(TO_MELD[corpus.kind].values()) <= set(model_labels):
        return {lab: model_labels.index(m) for lab, m in TO_MELD[corpus.kind].items()}
    raise ValueError(f"model labels {list(model_labels)} cannot score {corpus.kind} labels {list(corpus.labels)}")


def build_table(corpora: list[Corpus], model: EmotionModel, cache_dir: str, finetune: bool,
                needed: Sequence[int] | None = None) -> Table:
    """`needed`: global indices of the targets a run uses; only their dialogues' texts are encoded
    (the rest keep zero vectors, never read). None = encode everything."""
    offsets, labels, texts, has_audio, dialogue, position, mels = [], [], [], [], [], [], []
    n = 0
    for c in corpora:
        offsets.append(n)
        lm = label_map(c, model.config.labels)
        labels += [lm.get(u.label, -1) for u in c.utterances]
        texts += [u.text for u in c.utterances]
        dlg_of: list[np.ndarray | None] = [None] * len(c)
        pos = np.zeros(len(c), np.int64)
        for members in c.dialogues.values():
            arr = np.asarray(members, np.int64) + n
            for p, i in enumerate(members):
                dlg_of[i] = arr
                pos[i] = p
        dialogue += dlg_of
        position.append(pos)
        c_mels = cache.log_mels(c, cache_dir)
        mels += c_mels
        has_audio += [m is not None for m in c_mels]
        n += len(c)
    text_vecs = None
    if not finetune:
        enc_texts = texts
        if needed is not None:
            keep = np.zeros(len(texts), bool)
            for i in needed:
                keep[dialogue[i]] = True
            enc_texts = [t if k else "" for t, k in zip(texts, keep)]
        contexts = None
        if model.config.text_context:  # the encoder reads each utterance with its earlier ones
            k = model.config.text_context
            contexts = [[texts[j] for j in reversed(dialogue[i][max(0, p - k) : p].tolist())]
                        for i, p in enumerate(np.concatenate(position).tolist())]
        vecs = cache.text_vectors(model.text_encoder, enc_texts, cache_dir, contexts=contexts)
        text_vecs = torch.cat([vecs, torch.zeros(1, vecs.shape[1])])
    return Table(
        corpora=corpora, offsets=offsets, labels=np.asarray(labels, np.int64), texts=texts,
        has_text=np.array([bool(t) for t in texts]), has_audio=np.asarray(has_audio, bool),
        dialogue=dialogue, position=np.concatenate(position) if position else np.zeros(0, np.int64),
        text_vecs=text_vecs, mels=mels,
    )


@torch.inference_mode()
def cache_speech_vectors(model: EmotionModel, table: Table, batch_size: int = 64) -> None:
    """Embed every clip once with the (frozen, eval-mode) speech branch; a branch that also reads
    pooled Whisper states gets them from the packaged Whisper, as the service computes them."""
    idx = [i for i in range(len(table)) if table.has_audio[i]]
    out = torch.zeros(len(table), model.config.speech_dim)
    model.speech.eval()
    whisper = None
    if model.config.whisper_dim:
        from training.speech_cache import WhisperStates

        whisper = WhisperStates()
        clips = [u for c in table.corpora for u in c.utterances]
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        states = None
        if whisper is not None:
            states = [whisper([cache._load_clip(clips[i])])[0] for i in chunk]
        out[chunk] = model.embed_speech([table.mels[i] for i in chunk], whisper=states).float().cpu()
    table.speech_vecs = out


# ---- examples and batches ------------------------------------------------------------------
@dataclass
class Examples:
    """Parallel arrays, one entry per example."""

    target: np.ndarray  # global utterance index (its label is the example's label)
    speech: np.ndarray  # global index of the clip giving the speech modality, -1 = none
    text_on: np.ndarray  # bool: text modality present
    lookahead: np.ndarray  # bool: window includes the next utterance
    label: np.ndarray  # model class id

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, idx: np.ndarray) -> "Examples":
        return Examples(self.target[idx], self.speech[idx], self.text_on[idx], self.lookahead[idx], self.label[idx])


def eval_examples(table: Table, targets: Sequence[int], mode: str = "auto") -> Examples:
    """Live-style examples: no future context, every available modality (or only `mode`'s)."""
    t = np.asarray(targets, np.int64)
    text_on = table.has_text[t] & (mode != "speech")
    speech = np.where(table.has_audio[t] & (mode != "text"), t, -1)
    keep = (text_on | (speech >= 0)) & (table.labels[t] >= 0)
    t, speech, text_on = t[keep], speech[keep], text_on[keep]
    return Examples(t, speech, text_on, np.zeros(len(t), bool), table.labels[t])


def train_examples(table: Table, targets: Sequence[int], pool: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> Examples:
    """One epoch's examples: serving-matched windows, modality dropout, and (when `pool` holds acted
    clips) class-matched pairing of text-only utterances with clips plus speech-only clips."""
    t = np.asarray(targets, np.int64)
    t = t[table.labels[t] >= 0]
    n = len(t)
    label = table.labels[t]
    text_on = table.has_text[t].copy()
    speech = np.where(table.has_audio[t], t, -1)
    lookahead = rng.random(n) < cfg.lookahead_prob
    both = text_on & (speech >= 0)
    # real multimodal utterances: drop one modality now and then so each branch stands alone
    r = rng.random(n)
    text_on[both & (r < 0.15)] = False
    speech[both & (r >= 0.15) & (r < 0.30)] = -1
    if len(pool):
        pool_labels = table.labels[pool]
        by_label = {c: pool[pool_labels == c] for c in np.unique(pool_labels)}
        pair = text_on & (speech < 0) & (rng.random(n) >= cfg.p_text_only)
        matched = rng.random(n) < cfg.pair_match
        for k in np.flatnonzero(pair):
            cands = by_label.get(label[k]) if matched[k] else None
            speech[k] = rng.choice(cands if cands is not None and len(cands) else pool)
        m = int(round(cfg.speech_only_frac * n))
        if m:
            clips = rng.choice(pool, size=m, replace=True)
            t = np.concatenate([t, clips])
            speech = np.concatenate([speech, clips])
            text_on = np.concatenate([text_on, np.zeros(m, bool)])  # speech-only
            lookahead = np.concatenate([lookahead, np.zeros(m, bool)])
            label = np.concatenate([label, table.labels[clips]])
    keep = text_on | (speech >= 0)
    return Examples(t[keep], speech[keep], text_on[keep], lookahead[keep], label[keep])


def _specaugment(mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop (80-100 % of the frames) + 2 frequency and 2 time masks (filled with 0 = the
    utterance mean after normalisation)."""
    m = mel.copy()
    T = m.shape[1]
    keep = int(T * rng.uniform(0.8, 1.0))
    if keep >= features.MIN_FRAMES and keep < T:
        s = int(rng.integers(0, T - keep + 1))
        m = m[:, s : s + keep]
        T = keep
    for _ in range(2):
        w = int(rng.integers(0, 9))
        f0 = int(rng.integers(0, m.shape[0] - w + 1))
        m[f0 : f0 + w] = 0.0
        w = int(rng.integers(0, max(1, T // 10) + 1))
        t0 = int(rng.integers(0, T - w + 1))
        m[:, t0 : t0 + w] = 0.0
    return m


def forward_examples(model: EmotionModel, table: Table, ex: Examples, train: bool, cfg: TrainConfig | None,
                     rng: np.random.Generator | None = None):
    """Build one batch's tensors exactly as serving does and run the model -> ModelOutput."""
    mc, dev = model.config, model.device
    before, after = mc.context_window - 1, mc.lookahead
    windows, targets = [], []
    for t, on, la in zip(ex.target, ex.text_on, ex.lookahead):
        if not on:  # text masked: a one-step window of zeros (the GRU output is never used)
            windows.append([-1])
            targets.append(0)
            continue
        d, p = table.dialogue[t], int(table.position[t])
        lo, hi = max(0, p - before), min(len(d) - 1, p + (after if la else 0))
        windows.append(d[lo : hi + 1].tolist())
        targets.append(p - lo)
    W = max(len(w) for w in windows)
    idx = np.full((len(windows), W), -1, np.int64)
    for b, w in enumerate(windows):
        idx[b, : len(w)] = w
    if table.text_vecs is not None:
        ctx = table.text_vecs[torch.from_numpy(idx)].to(dev)  # (B, W, D); -1 -> the zero row
        if train and cfg is not None and cfg.vector_dropout > 0:
            ctx = F.dropout(ctx, cfg.vector_dropout, training=True)
    else:  # fine-tuning: encode this batch's distinct texts with gradients
        uniq = sorted({i for i in idx.reshape(-1).tolist() if i >= 0})
        vecs = model.text_encoder([table.texts[i] for i in uniq])  # (U, D)
        vecs = torch.cat([vecs, torch.zeros(1, vecs.shape[1], device=vecs.device, dtype=vecs.dtype)])
        pos = {g: k for k, g in enumerate(uniq)}
        gather = torch.tensor([[pos.get(i, len(uniq)) for i in row] for row in idx.tolist()], device=vecs.device)
        ctx = vecs[gather]  # (B, W, D)
    lengths = torch.tensor([len(w) for w in windows])
    target = torch.tensor(targets, device=dev)
    present = torch.tensor(np.stack([ex.speech >= 0, ex.text_on], axis=1), device=dev)
    if table.speech_vecs is not None:
        sv = table.speech_vecs[torch.from_numpy(np.maximum(ex.speech, 0))].to(dev)  # (B, S)
        sv = sv * torch.from_numpy(ex.speech >= 0)[:, None].to(dev, sv.dtype)
        if train and cfg is not None:
            sv = F.dropout(sv, cfg.dropout, training=True)  # the dropout the frozen CNN would apply
    else:  # the CNN runs only on rows that have speech; masked rows get zeros (weight 0 in fusion)
        sv = torch.zeros(len(ex), mc.speech_dim, device=dev)
        rows = np.flatnonzero(ex.speech >= 0)
        if len(rows):
            mels = []
            for s in ex.speech[rows]:
                if train and cfg is not None and cfg.specaugment and rng is not None:
                    mels.append(_specaugment(table.mels[s], rng))
                else:
                    mels.append(table.mels[s])
            mel, mel_len = features.pad_batch(mels)
            emb = model.speech(torch.from_numpy(mel).to(dev), torch.from_numpy(mel_len).to(dev))  # (R, S)
            sv = sv.to(emb.dtype).index_copy(0, torch.from_numpy(rows).to(dev), emb)
    return model.forward_features(sv, ctx, lengths, target, present)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, batch_size):
        yield order[s : s + batch_size]


@torch.inference_mode()
def predict(model: EmotionModel, table: Table, ex: Examples, batch_size: int = 128, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (predicted class ids, probabilities (E, C))."""
    model.eval()
    probs = []
    amp = model.device.type == "cuda"
    for b in tqdm(list(_batches(len(ex), batch_size, None)), desc="evaluate", unit="batch", disable=not progress, leave=False):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = forward_examples(model, table, ex.subset(b), train=False, cfg=None)
        probs.append(out.probs.float().cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, model.config.num_labels))
    return p.argmax(1), p


def evaluate(model: EmotionModel, table: Table, targets: Sequence[int], mode: str = "auto", progress: bool = False) -> dict:
    ex = eval_examples(table, targets, mode)
    pred, _ = predict(model, table, ex, progress=progress)
    rep = classification_report(ex.label.tolist(), pred.tolist(), model.config.labels)
    rep["modalities"] = {"text": int(ex.text_on.sum()), "speech": int((ex.speech >= 0).sum()), "n": len(ex)}
    return rep


# ---- training ------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, corpus: Corpus) -> EmotionModel:
    """ModelConfig from the run config (packaged encoder unless told otherwise) and the label set."""
    kw: dict = {"dropout": cfg.dropout, "freeze_encoder": not cfg.finetune}
    if cfg.encoder:
        kw["encoder"] = cfg.encoder
    if cfg.encoder_dim:
        kw["encoder_dim"] = cfg.encoder_dim
    kw["labels"] = corpus.labels if cfg.labels == "native" else MELD_LABELS
    model = EmotionModel(ModelConfig(**kw))
    if cfg.init:
        blob = read_checkpoint(cfg.init)
        own = model.state_dict()
        take = {k: v for k, v in blob["state_dict"].items()
                if k in own and own[k].shape == v.shape and (cfg.init_parts == "all" or k.startswith("speech."))}
        if not take:
            raise ValueError(f"{cfg.init}: no weights usable for init_parts={cfg.init_parts!r}")
        model.load_state_dict(take, strict=False)
    return model


class Trainer:
    """Owns one run: data, model, optimiser, history; writes checkpoints and reports to cfg.out."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        _seed_all(cfg.seed)
        self.device = distributed.setup(resolve_device(cfg.device))  # under torchrun: this rank's device
        # under torchrun rank 0 extracts audio / builds caches while the other ranks wait (distributed.py)
        self.corpus = distributed.main_first(load_spec, cfg.data, audio_cache=Path(cfg.cache_dir) / "audio")
        self.splits = split_corpus(self.corpus, cfg.split, cfg.seed)
        self.acted = [load_spec(s) for s in cfg.acted]
        self.model = build_model(cfg, self.corpus)
        rng = np.random.default_rng(cfg.seed)
        self.train_targets = np.asarray(self.splits["train"], np.int64)
        if cfg.max_train:
            self.train_targets = np.sort(rng.permutation(self.train_targets)[: cfg.max_train])
        self.val_targets = np.asarray(self.splits["val"][: cfg.max_eval or None], np.int64)
        self.test_targets = np.asarray(self.splits["test"][: cfg.max_eval or None], np.int64)
        needed = None
        if cfg.max_train or cfg.max_eval:  # subsets (smoke tests): encode only what they read
            n_acted = sum(len(c) for c in self.acted)
            needed = [*self.train_targets, *self.val_targets, *self.test_targets,
                      *range(len(self.corpus), len(self.corpus) + n_acted)]
        self.table = distributed.main_first(build_table, [self.corpus, *self.acted], self.model, cfg.cache_dir,
                                            cfg.finetune, needed, rerun=True)
        pool, self.acted_val = [], []
        for c, off in zip(self.acted, self.table.offsets[1:]):
            sp = split_corpus(c, cfg.acted_split, cfg.seed)
            pool += [off + i for i in sp["train"]]
            self.acted_val += [off + i for i in sp["val"]]
        self.pool = np.asarray(pool, np.int64)
        self.pool = self.pool[self.table.labels[self.pool] >= 0] if len(self.pool) else self.pool
        self.model.to(self.device)
        if cfg.freeze_speech:
            self.model.speech.requires_grad_(False)
            cache_speech_vectors(self.model, self.table)
        self.optimizer = self._optimizer()
        self.train_forward = distributed.wrap_forward(self.model, forward_examples)  # DDP under torchrun
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (1.0 + cfg.lr_decay * step))
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.loss_weight = self._class_weights()
        self.history: list[dict] = []
        self.epoch = 0
        self.keep = KeepBest(cfg.patience)  # early stopping on validation WF1 (best.pt is the snapshot)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.train_seconds = 0.0

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        enc = [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith("text_encoder.")]
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("text_encoder.")]
        groups = [{"params": rest, "lr": cfg.lr}]
        if enc:
            groups.append({"params": enc, "lr": cfg.encoder_lr})
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _class_weights(self) -> torch.Tensor | None:
        if self.cfg.class_weight == "none":
            return None
        counts = np.bincount(self.table.labels[self.train_targets], minlength=self.model.config.num_labels).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        if self.cfg.class_weight == "sqrt":
            w = np.sqrt(w)
        w = w / w[counts > 0].mean()
        return torch.tensor(w, dtype=torch.float32, device=self.device)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.freeze_speech:
            self.model.speech.eval()  # frozen BatchNorm statistics

    @property
    def best(self) -> float:
        """The best validation WF1 so far (-inf before the first epoch)."""
        return self.keep.best

    @property
    def bad_epochs(self) -> int:
        """Epochs in a row without a better validation WF1."""
        return self.keep.bad

    # -- persistence --
    def metadata(self, val: dict | None = None) -> dict:
        return {
            "train_config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "val": {k: val[k] for k in ("acc", "f1", "wa", "wf1")} if val else None,
            "best_val_wf1": None if self.best == -math.inf else self.best,
            "data": {"spec": self.cfg.data, "split": self.cfg.split, "fingerprint": fingerprint(self.corpus),
                     "train_examples": int(len(self.train_targets)), "acted": list(self.cfg.acted)},
            "train_seconds": round(self.train_seconds, 1),
            "torch": str(torch.__version__),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save_state(self) -> None:
        if not distributed.is_main():  # rank 0 writes; every rank holds the same weights and state
            return
        save_checkpoint(self.model, self.out / "last.pt", metadata=self.metadata())
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "best": self.best,
            "bad_epochs": self.bad_epochs, "history": json.dumps(self.history),
            "rng": json.dumps(self.rng.bit_generator.state), "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.out / "last.state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / "last.state.pt")

    def resume(self) -> None:
        """Continue from out/last.pt + out/last.state.pt (weights, optimiser, schedule, history)."""
        blob = read_checkpoint(self.out / "last.pt")
        self.model.load_state_dict(blob["state_dict"], strict=False)
        state = torch.load(self.out / "last.state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.keep.best, self.keep.bad = int(state["epoch"]), float(state["best"]), int(state["bad_epochs"])
        self.history = json.loads(state["history"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.train_seconds = float(state["train_seconds"])
        torch.set_rng_state(state["torch_rng"])
        if self.cfg.freeze_speech:
            cache_speech_vectors(self.model, self.table)

    # -- one epoch --
    def train_epoch(self) -> float:
        cfg = self.cfg
        self._set_train_mode()
        ex = train_examples(self.table, self.train_targets, self.pool, cfg, self.rng)
        aug_rng = distributed.epoch_rng(self.rng, cfg.seed, self.epoch)  # self.rng alone; per rank under DDP
        total, count = 0.0, 0
        batches = distributed.agreed(list(_batches(len(ex), cfg.batch_size, self.rng)), ex.target, ex.speech,
                                     ex.text_on, ex.lookahead)
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch",
                   disable=not cfg.progress or not distributed.is_main(), leave=False)
        for b in bar:
            share = distributed.BatchShare(b, ex.label, self.loss_weight)  # all of b alone; this rank's slice under DDP
            batch = ex.subset(share.rows)
            y = torch.from_numpy(batch.label).to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                out = self.train_forward(self.model, self.table, batch, train=True, cfg=cfg, rng=aug_rng)
                loss = share.loss(out.logits.float(), y, label_smoothing=cfg.label_smoothing)
            step(self.optimizer, loss, clip=cfg.grad_clip, scheduler=self.scheduler, scaler=self.scaler)
            total += float(loss.detach()) * len(b)
            count += len(b)
            bar.set_postfix(loss=f"{total / count:.3f}")
        return distributed.mean_over_ranks(total) / max(count, 1)

    def validate(self) -> dict:
        """Validation report. Under DDP rank 0 scores the whole set and broadcasts the report, so
        every rank takes the same early-stopping decision."""
        return distributed.from_main(self._validate)

    def _validate(self) -> dict:
        rep = evaluate(self.model, self.table, self.val_targets)
        ex = eval_examples(self.table, self.val_targets)
        with torch.inference_mode():
            self.model.eval()
            losses = []
            for b in _batches(len(ex), 256, None):
                out = forward_examples(self.model, self.table, ex.subset(b), train=False, cfg=None)
                losses.append(float(F.cross_entropy(out.logits.float(), torch.from_numpy(ex.label[b]).to(self.device), reduction="sum")))
        rep["loss"] = sum(losses) / max(len(ex), 1)
        if self.acted_val:
            rep["acted_wa"] = evaluate(self.model, self.table, self.acted_val, mode="speech")["wa"]
        return rep

    def fit(self) -> dict:
        """Train until `epochs` or `patience` epochs without a better validation WF1. Ctrl-C saves
        last.pt (and the state to resume) before it stops. Returns the final report dict."""
        cfg = self.cfg
        if distributed.is_main():
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        interrupted = False
        prev = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves like Ctrl-C
        except ValueError:  # not the main thread: leave SIGTERM alone
            prev = None
        try:
            for _ in self.keep.epochs(cfg.epochs, first=self.epoch + 1):
                t0 = time.perf_counter()
                loss = self.train_epoch()
                self.epoch += 1
                val = self.validate()
                improved = self.keep.update(self.epoch, val["wf1"])
                if improved and distributed.is_main():
                    save_checkpoint(self.model, self.out / "best.pt", metadata=self.metadata(val))
                self.train_seconds += time.perf_counter() - t0
                row = {"epoch": self.epoch, "train_loss": loss, "val_loss": val["loss"], "val_acc": val["acc"],
                       "val_f1": val["f1"], "val_wa": val["wa"], "val_wf1": val["wf1"],
                       "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.train_seconds, 1)}
                if "acted_wa" in val:
                    row["val_acted_wa"] = val["acted_wa"]
                self.history.append(row)
                self.save_state()
                if not distributed.is_main():
                    continue
                (self.out / "history.json").write_text(json.dumps(self.history, indent=2))
                extra = f" acted WA {val['acted_wa']:.1f}" if "acted_wa" in val else ""  # logged even with --no-progress
                tqdm.write(f"epoch {self.epoch:3d} loss {loss:.4f} val loss {val['loss']:.4f} WF1 {val['wf1']:.2f} "
                           f"WA {val['wa']:.2f}{extra}{' *' if improved else ''} ({self.train_seconds:.0f}s)")
        except KeyboardInterrupt:
            interrupted = True
            self.save_state()
            if distributed.is_main():
                tqdm.write(f"interrupted: saved {self.out / 'last.pt'} (resume with --resume)")
        finally:
            if prev is not None:
                signal.signal(signal.SIGTERM, prev)
        summary = self.finish()
        summary["interrupted"] = interrupted
        return summary

    def finish(self) -> dict:
        """Reports for the best checkpoint: history.json, curves.png, val/test JSON + confusion PNGs."""
        from training.report import plot_confusion, plot_curves

        if not distributed.is_main():  # rank 0 writes the reports; the others only trained
            return {"train_config": self.cfg.to_dict(), "epochs": self.epoch, "best_val_wf1": self.best}
        (self.out / "history.json").write_text(json.dumps(self.history, indent=2))
        if self.history:
            plot_curves(self.history, self.out / "curves.png", title=f"{self.cfg.data.split(':')[0]} {self.cfg.split}")
        best_path = self.out / "best.pt"
        if best_path.is_file():
            # a frozen CNN is the same in best.pt, so the cached speech embeddings stay valid; a frozen
            # text encoder is shared, a fine-tuned one is loaded from best.pt
            shared = self.model.text_encoder if self.model.config.freeze_encoder else None
            best = load_checkpoint(best_path, device=self.device, text_encoder=shared)
            # same weights, metadata completed with the whole run's history (evaluate plots it)
            save_checkpoint(best, best_path, metadata={**best.metadata, "history": self.history})
        else:
            best = self.model
        summary: dict = {"train_config": self.cfg.to_dict(), "epochs": self.epoch, "best_val_wf1": self.best,
                         "train_seconds": round(self.train_seconds, 1)}
        for part, targets in (("val", self.val_targets), ("test", self.test_targets)):
            if len(targets) == 0:
                continue
            rep = evaluate(best, self.table, targets)
            summary[part] = rep
            (self.out / f"{part}.json").write_text(json.dumps(rep, indent=2))
            plot_confusion(rep["confusion"], rep["labels"], self.out / f"{part}_confusion.png",
                           title=f"{self.cfg.split} {part}: WF1 {rep['wf1']:.1f} WA {rep['wa']:.1f}")
            tqdm.write(format_report(rep, f"[{part}] best checkpoint"))
        (self.out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in ("val", "test")}
                                                          | {k: {m: summary[k][m] for m in ("acc", "f1", "wa", "wf1")}
                                                             for k in ("val", "test") if k in summary}, indent=2))
        return summary
