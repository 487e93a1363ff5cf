"""Per-utterance latency of each model stage at batch 1, 8 and 32, for 2 s, 3 s and 10 s of real
speech with a one-sentence transcript. Writes bench/results/model_bench.{json,png}.

Stages: log-mel (librosa, per utterance), speech branch (CNN, plus the projection of pooled Whisper
states when the checkpoint reads them: the states themselves come free with the ASR), text encoder
(the checkpoint's MiniLM, each sentence with its earlier ones as the model reads them), Bi-GRU +
fusion + classifier + sentiment head (the per-prediction part of serving), and the familiar-voice
check (the distance of the pooled states from the training clips; 0 for a checkpoint without it). Every item of a batch is a distinct clip
and sentence, so no cache or branch predictor sees the same input twice. Median of `--repeats` runs.
Target (issue 3): the whole model <= 50 ms per utterance at batch 1 for a 3 s utterance.

    .venv/bin/python bench/model_bench.py [--device auto|cpu|cuda] [--repeats 7] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import DEFAULT_CHECKPOINT, EmotionModel, ModelConfig, features, load_checkpoint, resolve_device  # noqa: E402

SENTENCES = [
    "And so my fellow Americans, ask not what your country can do for you.",
    "Ask what you can do for your country.", "I can't believe you did that again!",
    "Oh my God, that is the best news I have heard all week.", "Could you please just leave me alone for a minute?",
    "We were supposed to meet at the coffee house an hour ago.", "Okay.", "Why would anyone do something like that?",
]


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_bench"))
    args = ap.parse_args()

    dev = resolve_device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if Path(args.checkpoint).is_file():
        model, source = load_checkpoint(args.checkpoint, device=dev), os.path.relpath(args.checkpoint, ROOT)
    else:  # latency does not depend on the weights' values
        model, source = EmotionModel(ModelConfig()).to(dev).eval(), "untrained (no checkpoint found)"
    fixtures = ROOT / "tests" / "fixtures" / "speech"
    recordings = [features.load_audio(str(p)) for p in sorted(fixtures.glob("*.wav")) + [fixtures / "jfk.flac", fixtures / "noisy_pauses.flac"]]
    rng = np.random.default_rng(0)
    dw = model.config.whisper_dim

    rows = []
    for seconds in (2.0, 3.0, 10.0):
        n = int(seconds * features.SAMPLE_RATE)
        for batch in (1, 8, 32):
            clips = []
            for k in range(batch):  # distinct clips: each from a recording at its own offset
                rec = recordings[k % len(recordings)]
                rec = rec if rec.size > n else np.tile(rec, n // max(1, rec.size) + 1)
                start = int(rng.integers(0, rec.size - n + 1))
                clips.append(rec[start : start + n])
            texts = [SENTENCES[k % len(SENTENCES)] + ("" if k < len(SENTENCES) else f" ({k})") for k in range(batch)]
            contexts = [[SENTENCES[(k + j) % len(SENTENCES)] for j in (1, 2, 3)] for k in range(batch)]
            states = [rng.standard_normal(dw).astype(np.float32) for _ in range(batch)] if dw else None
            mels_np = [features.log_mel(c) for c in clips]
            ctx_arg = contexts if model.config.text_context else None
            with torch.inference_mode():
                speech_vec = model.embed_speech(mels_np, whisper=states)
                text_vec = model.text_encoder(texts, contexts=ctx_arg)
            ctx = text_vec[:, None, :].repeat(1, model.config.context_window, 1)  # full 8-utterance window
            clen = torch.full((batch,), model.config.context_window)
            tgt = torch.full((batch,), model.config.context_window - 1, device=dev)
            present = torch.ones(batch, 2, dtype=torch.bool, device=dev)

            def stage_head():  # + the sentiment head, when the checkpoint has one (as predict() runs it)
                with torch.inference_mode():
                    out = model.forward_features(speech_vec, ctx, clen, tgt, present)
                    model._sentiment(list(text_vec), out.text)

            def stage_cnn():  # what serving runs: length-sorted sub-batches within a frame budget
                model.embed_speech(mels_np, whisper=states)

            def stage_text():
                with torch.inference_mode():
                    model.text_encoder(texts, contexts=ctx_arg)

            def stage_familiar():  # the distance of each utterance's states from the training clips (0 without the check)
                model.speech_distances(states or [None] * batch)

            t = {
                "log_mel": timed(lambda: [features.log_mel(c) for c in clips], args.repeats, sync),
                "speech_cnn": timed(stage_cnn, args.repeats, sync),
                "text_encoder": timed(stage_text, args.repeats, sync),
                "gru_fusion": timed(stage_head, args.repeats, sync),
                "familiar": timed(stage_familiar, args.repeats, sync) if model.config.familiar_max_distance else 0.0,
            }
            per_utt = {k: 1000 * v / batch for k, v in t.items()}
            per_utt["total"] = sum(per_utt.values())
            rows.append({"seconds": seconds, "batch": batch, "ms_per_utterance": per_utt,
                         "utterances_per_second": 1000 / per_utt["total"]})
            print(f"{seconds:4.1f} s  batch {batch:2d}: " + "  ".join(f"{k} {v:7.2f}" for k, v in per_utt.items()) + "  ms/utt")

    target = next(r for r in rows if r["seconds"] == 3.0 and r["batch"] == 1)["ms_per_utterance"]["total"]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(dev)},
        "model": source, "repeats": args.repeats, "rows": rows,
        "inputs": "distinct clips (fixture recordings at random offsets) and sentences per batch item; "
                  f"text_context={model.config.text_context}, whisper_dim={dw}",
        "target": {"what": "3 s utterance, batch 1, whole model", "limit_ms": 50.0, "measured_ms": target, "met": target <= 50.0},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"), str(dev))
    print(f"3 s utterance at batch 1: {target:.1f} ms (target <= 50 ms) -> {out.with_suffix('.json')}")


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["log_mel", "speech_cnn", "text_encoder", "gru_fusion", "familiar"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, seconds in zip(axes, (2.0, 3.0, 10.0)):
        sub = [r for r in rows if r["seconds"] == seconds]
        bottom = np.zeros(len(sub))
        for st in stages:
            vals = np.array([r["ms_per_utterance"][st] for r in sub])
            ax.bar([str(r["batch"]) for r in sub], vals, bottom=bottom, label=st)
            bottom += vals
        ax.set_title(f"{seconds:g} s utterance")
        ax.set_xlabel("batch size")
    axes[0].set_ylabel(f"ms per utterance ({device})")
    axes[0].axhline(50, color="red", ls="--", lw=1)
    axes[-1].legend()
    fig.suptitle("emostream model: per-utterance latency by stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
