"""Stage 3 of the recipe: the dialogue Bi-GRU, the fusion and the classifier on top of the
fine-tuned text encoder (stage 1, training.text_finetune) and the English speech branch (stage 2,
training.speech_branch), then temperature calibration, evaluation and the checkpoint.

Both encoders stay fixed here, so their outputs are computed once. Each epoch mixes:
- MELD training utterances, text only, in serving-shaped windows (target + up to 7 earlier, the
  next one with p = 0.3 as in a revision); half of them get a RAVDESS training clip as their voice,
  of the same class with p = 0.7 (else any class), labelled by the text: when the words carry the
  emotion, they decide;
- RAVDESS training clips (actors 1-16; clean or live-like versions) speech only, and with their own
  lexically neutral sentence as text ("Kids are talking by the door"), in short pseudo-dialogues of
  such sentences, labelled by the voice: when the words carry nothing, the voice decides; and the
  sentence alone, labelled neutral (all the words say).
Choices (epoch) are made on MELD dev WF1 and RAVDESS validation actors 17-20; the temperature on
the same validation sets. MELD test and RAVDESS test actors 21-24 are scored once, at the end.

  python -m training.recipe --meld ../shared/data/meld --ravdess ../shared/data/ravdess \\
      --text runs/text/encoder.pt --speech runs/speech/speech.pt --out runs/recipe
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
from training.calibration import calibration_report, fit_temperature, reliability_plot, softmax
from training.datasets import TO_MELD, load_meld, load_ravdess
from training.metrics import classification_report, format_report
from training.report import plot_confusion, plot_curves
from training.speech_branch import actor_range, features_for, ravdess_parts
from training.text_finetune import previous_texts

RAVDESS_STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
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


class Data:
    """Cached vectors and the example generators (index arrays into them)."""

    def __init__(self, model: EmotionModel, meld_dir: str, ravdess_dir: str, cache_dir: str, text_key: str,
                 actors: tuple[tuple[int, ...], tuple[int, ...]] = ((21, 22, 23, 24), (17, 18, 19, 20)), max_meld: int = 0) -> None:
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

        self.rav = load_ravdess(ravdess_dir)
        self.rav_parts = ravdess_parts(self.rav, *actors)
        self.feats = features_for(self.rav, self.rav_parts, cache_dir)
        whisper = [self.feats.whisper[r] for r in range(len(self.feats.mels))]
        self.speech_vecs = model.embed_speech(self.feats.mels, whisper=whisper).cpu()  # (M, S), eval mode
        self.rav_label = np.array([MELD_LABELS.index(TO_MELD["ravdess"][u.label]) for u in self.rav.utterances])
        self.rav_statement = np.array([int(Path(u.audio).stem.split("-")[4]) - 1 for u in self.rav.utterances])
        # sentence vectors of RAVDESS statements after 0-3 earlier statements (pseudo-dialogues)
        self.stmt_vec: dict[tuple[int, ...], torch.Tensor] = {}
        seqs = [(s,) + rest for s in (0, 1) for n in range(4) for rest in _tuples(n)]
        stmts = list(RAVDESS_STATEMENTS.values())
        with torch.inference_mode():
            vs = model.text_encoder([stmts[q[0]] for q in seqs], contexts=[[stmts[k] for k in q[1:]] for q in seqs])
        self.stmt_vec = {q: vs[k] for k, q in enumerate(seqs)}  # key: (this, previous, earlier, ...)
        self.dim, self.speech_dim = cfg.encoder_dim, cfg.speech_dim
        self.before, self.after = cfg.context_window - 1, cfg.lookahead

    # ---- example lists: tuples (kind, index, speech row or -1, lookahead) ----
    def meld_examples(self, part: str, rng: np.random.Generator | None, pair_frac: float = 0.5, match: float = 0.7) -> list[tuple]:
        idx = self.meld_part[part]
        out = []
        rows_by_label: dict[int, np.ndarray] = {}
        if rng is not None:
            train_rows = self.feats.rows(self.rav_parts["train"])
            lab = self.rav_label[self.feats.clip[train_rows]]
            rows_by_label = {c: train_rows[lab == c] for c in np.unique(lab)}
            all_rows = train_rows
        for i in idx:
            row, la = -1, False
            if rng is not None:
                la = rng.random() < 0.3
                if rng.random() < pair_frac:
                    c = self.meld_label[i]
                    pool = rows_by_label.get(c) if rng.random() < match else None
                    row = int(rng.choice(pool if pool is not None and len(pool) else all_rows))
            out.append(("meld", int(i), row, la))
        return out

    def ravdess_examples(self, part: str, rng: np.random.Generator | None, variants: str = "all", modes=("speech", "both")) -> list[tuple]:
        rows = self.feats.rows(self.rav_parts[part], variants)
        if rng is not None:  # one random version of each clip per mode
            by_clip: dict[int, list[int]] = {}
            for r in rows:
                by_clip.setdefault(int(self.feats.clip[r]), []).append(int(r))
            rows = np.array([rng.choice(v) for v in by_clip.values() for _ in modes])
            return [("rav-" + m, int(r), int(r), False) for r, m in zip(rows, list(modes) * (len(rows) // len(modes)))]
        return [("rav-" + m, int(r), int(r), False) for m in modes for r in rows]

    def batch(self, ex: list[tuple], rng: np.random.Generator | None) -> Batch:
        windows, targets, speech, present, labels = [], [], [], [], []
        for kind, i, row, la in ex:
            if kind == "meld":
                d, p = self.meld_dialogue[i], int(self.meld_pos[i])
                lo, hi = max(0, p - self.before), min(len(d) - 1, p + (self.after if la else 0))
                windows.append([self.meld_vecs[j] for j in d[lo : hi + 1]])
                targets.append(p - lo)
                labels.append(self.meld_label[i])
                present.append([row >= 0, True])
            else:
                clip = int(self.feats.clip[i])
                # a lexically neutral sentence without its voice says nothing: trained as neutral
                # (scored against the voice's label, which text alone cannot know)
                text_only = kind == "rav-text" and rng is not None
                labels.append(MELD_LABELS.index("neutral") if text_only else self.rav_label[clip])
                if kind == "rav-speech":
                    windows.append([torch.zeros(self.dim)])
                    targets.append(0)
                    present.append([True, False])
                else:  # its own sentence, after 0-3 earlier neutral sentences (random when training)
                    n = int(rng.integers(0, 4)) if rng is not None else 0
                    seq = (int(self.rav_statement[clip]),) + tuple(int(x) for x in (rng.integers(0, 2, n) if rng is not None else ()))
                    windows.append([self.stmt_vec[seq[k:]] for k in range(len(seq) - 1, -1, -1)])
                    targets.append(len(seq) - 1)
                    present.append([kind == "rav-both", True])
            speech.append(self.speech_vecs[row] if row >= 0 and present[-1][0] else torch.zeros(self.speech_dim))
        W = max(len(w) for w in windows)
        ctx = torch.zeros(len(ex), W, self.dim)
        for b, w in enumerate(windows):
            ctx[b, : len(w)] = torch.stack(w)
        return Batch(ctx, torch.tensor([len(w) for w in windows]), torch.tensor(targets), torch.stack(speech),
                     torch.tensor(present), torch.tensor(np.asarray(labels), dtype=torch.long))


def _tuples(n: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for _ in range(n):
        out = [t + (k,) for t in out for k in (0, 1)]
    return out


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


def eval_sets(data: Data, part_meld: str, part_rav: str) -> dict[str, list[tuple]]:
    sets = {f"meld-{part_meld}": data.meld_examples(part_meld, None)}
    for variants in ("clean", "aug"):
        for m in ("speech", "text", "both"):
            sets[f"ravdess-{part_rav}-{variants}-{m}"] = data.ravdess_examples(part_rav, None, variants, modes=(m,))
    return sets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meld", required=True)
    p.add_argument("--ravdess", required=True)
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
    p.add_argument("--threads", type=int, default=0)
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
    data = Data(model, a.meld, a.ravdess, a.cache_dir, text_key, (actor_range(a.test_actors), actor_range(a.val_actors)), a.max_meld)
    print(f"features ready ({time.time() - t0:.0f} s)", flush=True)

    params = [q for n, q in model.named_parameters() if n.startswith(("dialogue.", "fusion.", "classifier."))]
    opt = torch.optim.Adam(params, lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 1e-4 * step))  # the paper's decay
    val_sets = {"meld-dev": data.meld_examples("dev", None),
                "ravdess-val-both": data.ravdess_examples("val", None, "all", modes=("both",))}
    history, best, best_state, bad = [], -1.0, None, 0
    for epoch in range(1, a.epochs + 1):
        te = time.time()
        ex = data.meld_examples("train", rng) + data.ravdess_examples("train", rng, "all", modes=("speech", "both", "both", "text"))
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
        scores = {}
        for name, vex in val_sets.items():
            lg, _, lb = run(model, data, vex)
            rep = classification_report(lb, lg.argmax(1), MELD_LABELS)
            scores[name] = rep["wf1"] if name.startswith("meld") else rep["wa"]
        score = (scores["meld-dev"] + scores["ravdess-val-both"]) / 2
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_meld_dev_wf1": scores["meld-dev"],
                        "val_ravdess_wa": scores["ravdess-val-both"], "val_score": score, "seconds": time.time() - te})
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}  MELD dev WF1 {scores['meld-dev']:.2f}  "
              f"RAVDESS val WA {scores['ravdess-val-both']:.2f}  ({time.time() - te:.0f} s)", flush=True)
        if score > best:
            best, bad = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= a.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    train_minutes = (time.time() - t0) / 60

    # every validation and test set run once: (logits, modality weights, labels)
    outputs = {key: {name: run(model, data, ex) for name, ex in eval_sets(data, part_m, part_r).items()}
               for part_m, part_r, key in (("dev", "val", "val"), ("test", "test", "test"))}
    # calibration: one temperature fitted on the validation sets (MELD dev, RAVDESS val actors), not on
    # RAVDESS sentences without their voice: their labels are the voice's, which text alone cannot
    # know, and fitting to them would flatten every other prediction
    fit = [o for name, o in outputs["val"].items() if not name.endswith("-text")]
    temperature = fit_temperature(np.concatenate([o[0] for o in fit]), np.concatenate([o[2] for o in fit]))
    results: dict = {"val": {}, "test": {}, "calibration": {"temperature": temperature, "fitted_on": "MELD dev + RAVDESS actors 17-20 (speech-only and voice+sentence sets, clean and live-like)"}}
    for key, sets in outputs.items():
        for name, (lgt, w, lbl) in sets.items():
            results[key][name] = _report(lgt, w, lbl, name.rsplit("-", 1)[-1] if "ravdess" in name else "text")
            if key == "test":
                results["calibration"][name] = calibration_report(lgt, lbl, temperature)
                print(format_report(results[key][name], f"{name}  (speech weight mean {results[key][name]['speech_weight']['mean']:.2f})"), flush=True)
    # class-matched pairs of the test sets: MELD test text with a RAVDESS test-actor clip of the same class
    results["test"]["pairs-meld-test-ravdess-test"] = _pairs_report(model, data, rng)
    for name, title in (("meld-test", "MELD official test, text + past context"), ("ravdess-test-clean-both", "RAVDESS actors 21-24, voice + own neutral sentence"),
                        ("ravdess-test-clean-speech", "RAVDESS actors 21-24, speech only")):
        plot_confusion(results["test"][name]["confusion"], MELD_LABELS, out / f"confusion_{name}.png", title)
    for name in ("meld-test", "ravdess-test-clean-both"):
        lgt, _, lbl = outputs["test"][name]
        reliability_plot(softmax(lgt), lbl, out / f"reliability_{name}.png", f"{name}: T = {temperature:.2f}",
                         probs_after=softmax(lgt, temperature))
    plot_curves([{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_wf1": h["val_meld_dev_wf1"], "val_wa": h["val_ravdess_wa"]} for h in history],
                out / "curves.png", "stage 3: dialogue GRU + fusion (val: MELD dev WF1, RAVDESS 17-20 WA)")

    model.config = ModelConfig.from_dict({**model.config.to_dict(), "temperature": float(temperature)})
    meta = {
        "recipe": "training/recipe.sh", "history": history, "train_minutes_stage3": train_minutes,
        "stage1": text_blob.get("history"), "speech_mode": speech_blob["mode"], "temperature": temperature,
        "data": {"text": "MELD train (GPL-3.0 upstream)", "speech": "RAVDESS actors 1-16 (CC BY-NC-SA 4.0, non-commercial)"},
        "scores": {k: {m: v[m] for m in ("acc", "wa", "wf1")} for k, v in results["test"].items()},
    }
    (out / "recipe_report.json").write_text(json.dumps({"history": history, **results, "minutes": (time.time() - t0) / 60}, indent=1))
    path = save_checkpoint(model, out / "model.pt", meta)
    if a.checkpoint:
        save_checkpoint(model, a.checkpoint, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), T = {temperature:.3f}, {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


def _pairs_report(model: EmotionModel, data: Data, rng: np.random.Generator) -> dict:
    """MELD test utterances paired with a RAVDESS test-actor clip of the same class (clean versions)."""
    rows = data.feats.rows(data.rav_parts["test"], "clean")
    lab = data.rav_label[data.feats.clip[rows]]
    ex = []
    for i in data.meld_part["test"]:
        pool = rows[lab == data.meld_label[i]]
        if len(pool):
            ex.append(("meld", int(i), int(rng.choice(pool)), False))
    lgt, w, lbl = run(model, data, ex)
    return _report(lgt, w, lbl, "both")


if __name__ == "__main__":
    raise SystemExit(main())
