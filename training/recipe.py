"""Stage 3 of the recipe: the dialogue Bi-GRU, the fusion and the classifier on top of the
fine-tuned text encoder (stage 1, training.text_finetune) and the speech branch (stage 2,
training.speech_branch), then temperature calibration, evaluation and the checkpoint.

Both encoders stay fixed here, so their outputs are computed once. The fusion must listen to the
voice *because of the voice*, not because it recognises a corpus's sentence: every speech example
comes with many different transcripts, and each label follows the modality that carries the emotion.
Each epoch mixes:
- MELD training utterances as text, in serving-shaped windows (target + up to 7 earlier, the next
  one with p = 0.3 as in a revision); half of them also get a training clip's voice: an emotional
  text a voice of its own class or a neutral voice (labelled by the words), a neutral text any
  voice (labelled by the voice: thousands of different sentences that say nothing);
- acted training clips of the split (training.acted; clean or live-like versions): voice alone
  (an empty transcript), voice + its transcript after 0-3 earlier ones of the same speaker (a
  RAVDESS statement; EmoDB's German as the packaged Whisper hears it), voice + a neutral MELD
  sentence (all labelled by the voice), and the transcript alone (labelled neutral: all the words say).
The epoch is chosen on MELD dev WF1 and the split's acted validation sets (for the shipped split: a
sentence no training clip says, and an unseen EmoDB speaker); the temperature on the same
validation sets. Test sets are scored once, at the end.

  python -m training.recipe --meld ../shared/data/meld --ravdess ../shared/data/ravdess --emodb ../shared/data/emodb \\
      --split ship --text runs/text/encoder.pt --speech runs/speech/speech.pt --out runs/recipe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import EmotionModel, MELD_LABELS, ModelConfig, save_checkpoint
from model.text_encoder import TextEncoder
from training import acted, familiar
from training.calibration import calibration_report, fit_temperature, reliability_plot, softmax
from training.datasets import load_meld
from training.epochs import KeepBest, module_state, step
from training.metrics import classification_report, format_report
from training.report import plot_confusion, plot_curves
from training.text_finetune import previous_texts

PACKAGED_WHISPER = "tiny.en"


def build_model(text_blob: dict, speech_blob: dict) -> EmotionModel:
    """The full model with stage 1's encoder layers and stage 2's speech branch loaded."""
    mode = speech_blob["mode"]
    # the encoder stage 1 fine-tuned (not necessarily the packaged one), with its own hidden size
    text_encoder = TextEncoder(text_blob["encoder"], int(text_blob["max_tokens"]), frozen=False)
    cfg = ModelConfig(
        encoder=text_blob["encoder"], encoder_dim=text_encoder.hidden_size,
        max_text_tokens=int(text_blob["max_tokens"]), text_context=int(text_blob["context"]),
        freeze_encoder=False, encoder_layers_only=True,
        whisper_dim=int(speech_blob["whisper_dim"]) if mode == "both" else 0,
        whisper_model=PACKAGED_WHISPER if mode == "both" else "",
    )
    model = EmotionModel(cfg, text_encoder=text_encoder)
    missing, unexpected = model.text_encoder.model.load_state_dict({k: v.float() for k, v in text_blob["layers"].items()}, strict=False)
    if unexpected or any(not k.startswith("embeddings.") for k in missing):
        raise ValueError(f"text encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    missing, unexpected = model.load_state_dict(speech_blob["state"], strict=False)
    if unexpected:
        raise ValueError(f"speech weights do not fit: {unexpected[:3]}")
    return model.eval()


@dataclass
class Batch:
    ctx: torch.Tensor  # (B, W, D)
    lengths: torch.Tensor  # (B,)
    target: torch.Tensor  # (B,)
    speech: torch.Tensor  # (B, S)
    present: torch.Tensor  # (B, 2) bool
    label: torch.Tensor  # (B,)


def transcripts(data: acted.Acted, cache_dir: str | Path) -> list[str]:
    """What the service's Whisper hears in each acted clip (trimmed as the segmenter cuts it):
    RAVDESS clips are given their statement (Whisper writes it back word for word); EmoDB's German
    is decoded once by the packaged tiny.en, as live, and cached. Unknown words are what a new
    sentence looks like to the text branch."""
    import json as _json

    from training.augment import trim_silence

    out = [acted.STATEMENTS[int(s)] if src == "ravdess" else "" for src, s in zip(data.source, data.sentence)]
    emo = data.where("emodb")
    if not emo:
        return out
    path = Path(cache_dir) / "transcripts" / "emodb.json"
    known = _json.loads(path.read_text()) if path.is_file() else {}
    todo = [i for i in emo if data.corpus.utterances[i].uid not in known]
    if todo:
        from model.features import load_audio
        from training.speech_cache import WhisperStates

        asr = WhisperStates()  # the packaged tiny.en, decoded as the service decodes
        for s in tqdm(range(0, len(todo), 4), desc="transcribe EmoDB", unit="batch", leave=False):
            ids = todo[s : s + 4]
            for i, text in zip(ids, asr.transcribe([trim_silence(load_audio(data.corpus.utterances[i].audio)) for i in ids])):
                known[data.corpus.utterances[i].uid] = text
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_json.dumps(known, indent=0, sort_keys=True))
    for i in emo:
        out[i] = known[data.corpus.utterances[i].uid]
    return out


class Data:
    """Cached vectors and the example generators (tuples of indices into them).

    Examples are (kind, index, speech row or -1, lookahead) where kind is "meld" (a MELD utterance
    in its dialogue window, index into MELD), "acted-meldtext" (a neutral MELD utterance, index
    into MELD, as the transcript of the acted voice in the speech row) or "acted-speech" /
    "acted-text" / "acted-both" (index = speech row: the clip's voice, its transcript in a short
    pseudo-dialogue of the same speaker, or both). Labels are chosen in `batch`."""

    def __init__(self, model: EmotionModel, meld_dir: str, acted_data: acted.Acted, parts: dict, cache_dir: str, text_key: str,
                 max_meld: int = 0, seed: int = 0, augment: int = 2) -> None:
        cfg = model.config
        self.meld = load_meld(meld_dir)
        texts = [u.text for u in self.meld.utterances]
        ctx = previous_texts(self.meld, cfg.text_context)
        path = Path(cache_dir) / "recipe" / f"meld-{text_key}.npy"
        if path.is_file():
            vecs = np.load(path)
        else:
            vecs = np.zeros((len(texts), cfg.encoder_dim), np.float32)
            wanted = range(len(texts)) if not max_meld else {j for k in ("train", "dev", "test") for j in
                                                             [i for i, u in enumerate(self.meld.utterances) if u.part == k][:max_meld + 8]}
            order = sorted(wanted, key=lambda i: -(len(texts[i]) + sum(map(len, ctx[i]))))
            with torch.inference_mode():
                for s in tqdm(range(0, len(order), 64), desc="encode MELD", unit="batch", leave=False):
                    ids = order[s : s + 64]
                    vecs[ids] = model.text_encoder([texts[i] for i in ids], contexts=[ctx[i] for i in ids]).numpy()
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, vecs)
        self.meld_vecs = torch.from_numpy(vecs)  # (N, D); empty texts are zero rows
        self.meld_label = np.array([MELD_LABELS.index(u.label) for u in self.meld.utterances])
        self.meld_part = {k: np.array([i for i, u in enumerate(self.meld.utterances) if u.part == k and u.text]) for k in ("train", "dev", "test")}
        if max_meld:  # smoke runs: the first utterances of each part only
            self.meld_part = {k: v[:max_meld] for k, v in self.meld_part.items()}
        self.meld_dialogue: list[np.ndarray] = [np.zeros(0, np.int64)] * len(texts)
        self.meld_pos = np.zeros(len(texts), np.int64)
        for members in self.meld.dialogues.values():
            arr = np.asarray(members)
            for p, i in enumerate(members):
                self.meld_dialogue[i], self.meld_pos[i] = arr, p
        neutral = MELD_LABELS.index("neutral")
        self.meld_neutral = {k: v[self.meld_label[v] == neutral] for k, v in self.meld_part.items()}

        self.acted, self.parts = acted_data, parts
        self.feats = acted.features(acted_data, cache_dir, n_aug=augment, seed=seed)
        whisper = [self.feats.whisper[r] for r in range(len(self.feats.mels))]
        self.speech_vecs = model.embed_speech(self.feats.mels, whisper=whisper).cpu()  # (M, S), eval mode
        self.label = acted_data.y_meld
        # each clip's transcript, after 0-3 earlier transcripts of the same speaker (one seeded draw):
        # the pseudo-dialogue a session of that speaker would have
        self.transcripts = transcripts(acted_data, cache_dir)
        rng = np.random.default_rng(seed + 11)
        by_speaker: dict[tuple[str, str], list[int]] = {}
        for i, (src, spk) in enumerate(zip(acted_data.source, acted_data.speaker)):
            by_speaker.setdefault((src, spk), []).append(i)
        self.earlier: list[list[int]] = []
        for i, (src, spk) in enumerate(zip(acted_data.source, acted_data.speaker)):
            pool = [j for j in by_speaker[(src, spk)] if j != i]
            self.earlier.append([int(j) for j in rng.choice(pool, size=min(len(pool), int(rng.integers(0, 4))), replace=False)])
        t = self.transcripts
        with torch.inference_mode():
            alone = model.text_encoder(t)
            in_ctx = torch.cat([model.text_encoder(t[s : s + 64], contexts=[[t[j] for j in self.earlier[i]] for i in range(s, min(len(t), s + 64))])
                                for s in range(0, len(t), 64)])
        self.text_alone, self.text_in_ctx = alone, in_ctx  # (N, D) each
        self.dim, self.speech_dim = cfg.encoder_dim, cfg.speech_dim
        self.before, self.after = cfg.context_window - 1, cfg.lookahead

    # ---- example lists ----
    def train_rows(self) -> np.ndarray:
        return self.feats.rows(acted.flat(self.parts["train"]))

    def meld_examples(self, part: str, rng: np.random.Generator | None, pair_frac: float = 0.5) -> list[tuple]:
        """MELD utterances as text; with `rng`, a share of them also gets a training clip's voice:
        an emotional text a voice of its class or a neutral one (the words carry the label), a
        neutral text any voice (the voice carries it)."""
        out = []
        rows_by_label: dict[int, np.ndarray] = {}
        by_label = np.zeros(0, np.int64)
        if rng is not None:
            rows = self.train_rows()
            lab = self.label[self.feats.clip[rows]]
            rows_by_label = {c: rows[lab == c] for c in np.unique(lab)}
            by_label = np.concatenate(list(rows_by_label.values()))  # every training row, grouped by class
        neutral = MELD_LABELS.index("neutral")
        for i in self.meld_part[part]:
            row, la = -1, False
            if rng is not None:
                la = rng.random() < 0.3
                if rng.random() < pair_frac:
                    c = int(self.meld_label[i])
                    if c == neutral:
                        row = int(rng.choice(by_label))
                    else:
                        pool = rows_by_label.get(c) if rng.random() < 0.5 else rows_by_label.get(neutral)
                        row = int(rng.choice(pool)) if pool is not None and len(pool) else -1
            out.append(("meld", int(i), row, la))
        return out

    def acted_examples(self, clips: list[int], rng: np.random.Generator | None, variants: str = "all",
                       modes: tuple[str, ...] = ("speech", "both")) -> list[tuple]:
        """Acted clips, one example per (clip, mode): with `rng` one random version of each clip
        per mode, else every version of `variants`. Mode "meldtext": the voice with a neutral MELD
        sentence as its transcript (training: a train one; evaluation: a test one, fixed by seed)."""
        rows = self.feats.rows(clips, variants)
        if rng is not None:
            by_clip: dict[int, list[int]] = {}
            for r in rows:
                by_clip.setdefault(int(self.feats.clip[r]), []).append(int(r))
            return [self._acted(m, int(rng.choice(v)), rng, "train") for v in by_clip.values() for m in modes]
        fixed = np.random.default_rng(0)
        return [self._acted(m, int(r), fixed, "test") for m in modes for r in rows]

    def _acted(self, mode: str, row: int, rng: np.random.Generator, meld_part: str) -> tuple:
        if mode == "meldtext":
            pool = self.meld_neutral[meld_part] if len(self.meld_neutral[meld_part]) else self.meld_neutral["train"]
            return ("acted-meldtext", int(rng.choice(pool)), row, False)
        return ("acted-" + mode, row, row, False)

    def batch(self, ex: list[tuple], rng: np.random.Generator | None) -> Batch:
        windows, targets, speech, present, labels = [], [], [], [], []
        neutral = MELD_LABELS.index("neutral")
        for kind, i, row, la in ex:
            if kind in ("meld", "acted-meldtext"):
                d, p = self.meld_dialogue[i], int(self.meld_pos[i])
                lo, hi = max(0, p - self.before), min(len(d) - 1, p + (self.after if la else 0))
                windows.append([self.meld_vecs[j] for j in d[lo : hi + 1]])
                targets.append(p - lo)
                if kind == "meld":
                    # a voice paired with a neutral text carries the label; else the words do
                    voiced = row >= 0 and self.meld_label[i] == neutral
                    labels.append(self.label[self.feats.clip[row]] if voiced else self.meld_label[i])
                else:
                    labels.append(self.label[self.feats.clip[row]])
                present.append([row >= 0, True])
            else:
                clip = int(self.feats.clip[i])
                # a transcript without its voice says nothing about the acted emotion: trained as
                # neutral (scored against the voice's label, which text alone cannot know)
                text_only = kind == "acted-text" and rng is not None
                labels.append(neutral if text_only else self.label[clip])
                if kind == "acted-speech":
                    windows.append([torch.zeros(self.dim)])
                    targets.append(0)
                    present.append([True, False])
                else:  # its transcript after the earlier ones of its pseudo-dialogue
                    earlier = self.earlier[clip]
                    windows.append([self.text_alone[j] for j in reversed(earlier)] + [self.text_in_ctx[clip]])
                    targets.append(len(earlier))
                    present.append([kind == "acted-both", True])
            speech.append(self.speech_vecs[row] if row >= 0 and present[-1][0] else torch.zeros(self.speech_dim))
        W = max(len(w) for w in windows)
        ctx = torch.zeros(len(ex), W, self.dim)
        for b, w in enumerate(windows):
            ctx[b, : len(w)] = torch.stack(w)
        return Batch(ctx, torch.tensor([len(w) for w in windows]), torch.tensor(targets), torch.stack(speech),
                     torch.tensor(present), torch.tensor(np.asarray(labels), dtype=torch.long))


def run(model: EmotionModel, data: Data, ex: list[tuple], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (E, C), modality weights (E, 2), labels (E,)) in eval mode, no calibration."""
    model.eval()
    logits, weights, labels = [], [], []
    with torch.inference_mode():
        for s in range(0, len(ex), batch_size):
            b = data.batch(ex[s : s + batch_size], None)
            out = model.forward_features(b.speech, b.ctx, b.lengths, b.target, b.present)
            logits.append(out.logits.numpy())
            weights.append(out.weights.numpy())
            labels.append(b.label.numpy())
    return np.concatenate(logits), np.concatenate(weights), np.concatenate(labels)


def _report(logits: np.ndarray, weights: np.ndarray, labels: np.ndarray, present: str) -> dict:
    rep = classification_report(labels, logits.argmax(1), MELD_LABELS)
    sw = weights[:, 0]
    rep["speech_weight"] = {"mean": float(sw.mean()), "median": float(np.median(sw)),
                            "p10": float(np.percentile(sw, 10)), "p90": float(np.percentile(sw, 90)),
                            "frac_speech_over_text": float((sw > 0.5).mean()), "modalities": present}
    return rep


ACTED_MODES = ("speech", "text", "both", "meldtext")


def eval_sets(data: Data, part_meld: str, part: str) -> dict[str, list[tuple]]:
    """MELD text of `part_meld`; every acted set of the split's `part` (val/test), clean and
    live-like, as voice alone, transcript alone, voice + its transcript, voice + a neutral MELD sentence."""
    sets = {f"meld-{part_meld}": data.meld_examples(part_meld, None)}
    for name, clips in data.parts[part].items():
        for variants in ("clean", "aug"):
            for m in ACTED_MODES:
                sets[f"{name}-{variants}-{m}"] = data.acted_examples(clips, None, variants, modes=(m,))
    return sets


def val_score(data: Data, model: EmotionModel, val_sets: dict[str, list[tuple]]) -> tuple[float, dict]:
    """The early-stopping score: the mean of MELD dev WF1 and the acted validation sets' mean WA
    (voice + its transcript, every version)."""
    scores = {}
    for name, vex in val_sets.items():
        lg, _, lb = run(model, data, vex)
        rep = classification_report(lb, lg.argmax(1), MELD_LABELS)
        scores[name] = rep["wf1"] if name.startswith("meld") else rep["wa"]
    acted_wa = float(np.mean([v for k, v in scores.items() if not k.startswith("meld")]))
    return (scores["meld-dev"] + acted_wa) / 2, scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meld", required=True)
    p.add_argument("--ravdess", required=True)
    p.add_argument("--emodb", default="", help="EmoDB folder (every split but sentence01/sentence02 uses it)")
    p.add_argument("--split", default="ship", choices=acted.SPLITS, help="the acted speech split (training.acted)")
    p.add_argument("--text", default="runs/text/encoder.pt")
    p.add_argument("--speech", default="runs/speech/speech.pt")
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--checkpoint", default="", help="also write the checkpoint here (e.g. model/checkpoints/default.pt)")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", type=int, default=2, help="live-like versions of each acted clip (default 2, as stage 2)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--train-actors", default="1-16")
    p.add_argument("--val-actors", default="17-20")
    p.add_argument("--test-actors", default="21-24")
    p.add_argument("--max-meld", type=int, default=0, help=">0: that many MELD utterances per part (smoke runs)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    text_blob = torch.load(a.text, map_location="cpu", weights_only=True)
    speech_blob = torch.load(a.speech, map_location="cpu", weights_only=True)
    model = build_model(text_blob, speech_blob)
    text_key = hashlib.sha1(Path(a.text).read_bytes() + str(a.max_meld).encode()).hexdigest()[:12]
    acted_data = acted.load(a.ravdess, a.emodb or None)
    parts = acted.split(acted_data, a.split, acted.actor_list(a.train_actors), acted.actor_list(a.val_actors), acted.actor_list(a.test_actors))
    data = Data(model, a.meld, acted_data, parts, a.cache_dir, text_key, a.max_meld, a.seed, a.augment)
    print(f"features ready ({time.time() - t0:.0f} s)", flush=True)

    params = [q for n, q in model.named_parameters() if n.startswith(("dialogue.", "fusion.", "classifier."))]
    opt = torch.optim.Adam(params, lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 1e-4 * step))  # the paper's decay
    val_sets = {"meld-dev": data.meld_examples("dev", None)} | {
        f"{name}-both": data.acted_examples(clips, None, "all", modes=("both",)) for name, clips in parts["val"].items()}
    train_clips = acted.flat(parts["train"])
    history: list[dict] = []
    keep = KeepBest(a.patience, snapshot=lambda: module_state(model))
    for epoch in keep.epochs(a.epochs):
        te = time.time()
        ex = data.meld_examples("train", rng) + data.acted_examples(train_clips, rng, "all", modes=("speech", "both", "meldtext", "text"))
        order = rng.permutation(len(ex))
        losses = []
        for s in range(0, len(order), a.batch_size):
            model.train()
            model.text_encoder.eval()
            model.speech.eval()
            b = data.batch([ex[k] for k in order[s : s + a.batch_size]], rng)
            sv = F.dropout(b.speech, model.config.dropout, training=True)  # the dropout the frozen branch would apply
            out_ = model.forward_features(sv, b.ctx, b.lengths, b.target, b.present)
            loss = F.cross_entropy(out_.logits, b.label, label_smoothing=0.1)
            losses.append(step(opt, loss, clip=5.0, params=params, scheduler=sched))
        score, scores = val_score(data, model, val_sets)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": scores, "val_score": score, "seconds": time.time() - te})
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}  " + "  ".join(f"{k} {v:.1f}" for k, v in scores.items()) +
              f"  score {score:.2f}  ({time.time() - te:.0f} s)", flush=True)
        keep.update(epoch, score)
    model.load_state_dict(keep.state)
    train_minutes = (time.time() - t0) / 60

    # every validation and test set run once: (logits, modality weights, labels)
    outputs = {key: {name: run(model, data, ex) for name, ex in eval_sets(data, part_m, key).items()}
               for part_m, key in (("dev", "val"), ("test", "test"))}
    # calibration: one temperature fitted on the validation sets, not on acted transcripts without
    # their voice: their labels are the voice's, which text alone cannot know, and fitting to them
    # would flatten every other prediction
    fit = [o for name, o in outputs["val"].items() if not name.endswith("-text")]
    temperature = fit_temperature(np.concatenate([o[0] for o in fit]), np.concatenate([o[2] for o in fit]))
    results: dict = {"split": a.split, "sets": {k: {n: len(v) for n, v in s.items()} for k, s in parts.items()}, "val": {}, "test": {},
                     "calibration": {"temperature": temperature, "fitted_on": f"MELD dev + the {a.split} split's acted validation sets "
                                     "(voice alone, voice + transcript, voice + neutral MELD sentence; clean and live-like)"}}
    for key, sets in outputs.items():
        for name, (lgt, w, lbl) in sets.items():
            results[key][name] = _report(lgt, w, lbl, name.rsplit("-", 1)[-1] if not name.startswith("meld") else "text")
            if key == "test":
                results["calibration"][name] = calibration_report(lgt, lbl, temperature)
                print(format_report(results[key][name], f"{name}  (speech weight mean {results[key][name]['speech_weight']['mean']:.2f})"), flush=True)
    results["test"]["pairs-meld-test-acted-test"] = _pairs_report(model, data, rng)
    first = next(iter(parts["test"]))
    for name, title in (("meld-test", "MELD official test, text + past context"), (f"{first}-clean-both", f"{first}, voice + its transcript"),
                        (f"{first}-clean-meldtext", f"{first}, voice + a neutral MELD sentence")):
        plot_confusion(results["test"][name]["confusion"], MELD_LABELS, out / f"confusion_{name}.png", title)
    for name in ("meld-test", f"{first}-clean-both"):
        lgt, _, lbl = outputs["test"][name]
        reliability_plot(softmax(lgt), lbl, out / f"reliability_{name}.png", f"{name}: T = {temperature:.2f}",
                         probs_after=softmax(lgt, temperature))
    plot_curves([{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_wf1": h["val"]["meld-dev"], "val_wa": h["val_score"]} for h in history],
                out / "curves.png", f"stage 3 ({a.split}): dialogue GRU + fusion (val: MELD dev WF1, score)")

    model.config = ModelConfig.from_dict({**model.config.to_dict(), "temperature": float(temperature)})
    familiar_report = None
    if model.config.whisper_dim:  # which voices are unlike the training clips (training.familiar)
        mean, whiten, limit, familiar_report = familiar.fit_split(data.feats, parts)
        familiar.attach(model, mean, whiten, limit)
        results["familiar"] = familiar_report
    meta = {
        "recipe": "training/recipe.sh", "split": a.split, "history": history, "train_minutes_stage3": train_minutes,
        "stage1": text_blob.get("history"), "speech_mode": speech_blob["mode"], "temperature": temperature,
        "data": {"text": "MELD train (GPL-3.0 upstream)",
                 "speech": f"acted split {a.split}: " + ", ".join(f"{k} {len(v)} clips" for k, v in parts["train"].items()) +
                 " (RAVDESS CC BY-NC-SA 4.0, non-commercial; EmoDB research use)"},
        "scores": {k: {m: v[m] for m in ("acc", "wa", "wf1")} for k, v in results["test"].items()},
        **({"familiar": familiar_report} if familiar_report else {}),
    }
    (out / "recipe_report.json").write_text(json.dumps({"history": history, **results, "minutes": (time.time() - t0) / 60}, indent=1))
    path = save_checkpoint(model, out / "model.pt", meta)
    if a.checkpoint:
        save_checkpoint(model, a.checkpoint, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), T = {temperature:.3f}, {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


def _pairs_report(model: EmotionModel, data: Data, rng: np.random.Generator) -> dict:
    """MELD test utterances paired with an acted test clip of the same class (clean versions)."""
    rows = data.feats.rows(acted.flat(data.parts["test"]), "clean")
    lab = data.label[data.feats.clip[rows]]
    ex = []
    for i in data.meld_part["test"]:
        pool = rows[lab == data.meld_label[i]]
        if len(pool):
            ex.append(("meld", int(i), int(rng.choice(pool)), False))
    lgt, w, lbl = run(model, data, ex)
    return _report(lgt, w, lbl, "both")


if __name__ == "__main__":
    raise SystemExit(main())
