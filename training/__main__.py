"""CLI: `python -m training recipe ...` (the bundled checkpoint's recipe, training/stages.py: what
`emostream train` runs), `python -m training train ...` (one configurable run: the v3 path) and
`python -m training evaluate ...`.

  python -m training recipe --data ../shared/data --runs runs [--stages speech,fusion] [--dry-run]
  python -m training train --data meld:../shared/data/meld --split official --out runs/meld
  torchrun --nproc_per_node 2 -m training train ...   # DDP: same run, each global batch split over ranks
  python -m training evaluate --checkpoint model/checkpoints/default.pt \\
      --data meld:../shared/data/meld --split official:test --json runs/eval/meld_test.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from training.config import TrainConfig

PARTS = ("train", "val", "test", "all")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (config is data: the CLI only maps flags onto it)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if f.name == "data":
            p.add_argument(flag, required=True, help="dataset spec kind:PATH[,key=value] (meld, emodb, ravdess, tess, cremad, mosei)")
        elif hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "acted":
            p.add_argument(flag, action="append", default=[], help="acted-speech spec to pair with MELD (repeatable)")
        else:
            typ = {int: int, float: float, str: str}[hint]
            p.add_argument(flag, type=typ, default=f.default, help=f"default {f.default!r}")


def _config_from_args(a: argparse.Namespace) -> TrainConfig:
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)}
    kw["acted"] = tuple(kw["acted"])
    return TrainConfig(**kw)


def parse_split(spec: str) -> tuple[str, str]:
    """'official:test' -> ('official', 'test'); 'speakers:11+13:test' -> ('speakers:11+13', 'test');
    no part given -> 'test'."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in PARTS:
        return head, tail
    return spec, "test"


def cmd_train(a: argparse.Namespace) -> int:
    from training import distributed
    from training.loop import Trainer

    cfg = _config_from_args(a)
    trainer = Trainer(cfg)  # under torchrun: joins the process group (training/distributed.py)
    if a.resume:
        trainer.resume()
        if distributed.is_main():
            print(f"resumed {cfg.out} at epoch {trainer.epoch} (best val WF1 {trainer.best:.2f})")
    summary = trainer.fit()
    if distributed.is_main():
        print(f"run folder: {cfg.out}  (best.pt, last.pt, history.json, curves.png, val/test JSON + PNG)")
    distributed.teardown()
    return 130 if summary.get("interrupted") else 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    import torch

    from model import load_checkpoint
    from training.datasets import fingerprint, load_spec, split_corpus
    from training.loop import build_table, cache_speech_vectors, evaluate
    from training.metrics import format_report
    from training.report import plot_confusion, plot_curves

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    model = load_checkpoint(a.checkpoint, device=a.device, encoder=a.encoder or None)
    split, part = parse_split(a.split)
    corpus = load_spec(a.data, audio_cache=Path(a.cache_dir) / "audio")
    targets = list(range(len(corpus))) if part == "all" else split_corpus(corpus, split, a.seed)[part]
    # evaluation never trains the encoder: its sentence vectors (with context, where the model reads
    # earlier utterances) are computed once, like serving's cache
    table = build_table([corpus], model, a.cache_dir, finetune=False, needed=targets)
    if a.cache_speech or (model.config.whisper_dim and corpus.has_audio):
        cache_speech_vectors(model, table)
    t0 = time.perf_counter()
    rep = evaluate(model, table, targets, mode=a.mode, progress=True)
    rep["eval_seconds"] = round(time.perf_counter() - t0, 2)
    rep["checkpoint"] = str(a.checkpoint)
    rep["train_config"] = getattr(model, "metadata", {}).get("train_config")  # how the scored model was trained
    rep["data"] = {"spec": a.data, "split": split, "part": part, "mode": a.mode, "fingerprint": fingerprint(corpus)}
    title = f"{Path(a.checkpoint).name} on {a.data.split(':')[0]} {split}:{part} ({a.mode})"
    print(format_report(rep, title))
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=2))
        png = plot_confusion(rep["confusion"], rep["labels"], out.with_suffix(".png"),
                             title=f"{a.data.split(':')[0]} {split}:{part} ({a.mode}): WF1 {rep['wf1']:.1f} WA {rep['wa']:.1f}")
        print(f"wrote {out} and {png}")
        history = getattr(model, "metadata", {}).get("history")
        if history:  # the checkpoint's own learning curves, beside its scores
            curves = plot_curves(history, out.with_name(out.stem + "_curves.png"), title=f"training of {Path(a.checkpoint).name}")
            print(f"wrote {curves}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from model import DEFAULT_CHECKPOINT

    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    from training import stages

    rc = sub.add_parser("recipe", help="the recipe that built the bundled checkpoint, by stages (emostream train)",
                        description=stages.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages.add_arguments(rc)
    tr = sub.add_parser("train", help="train a model (paper defaults), with early stopping on validation WF1")
    _add_config_flags(tr)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last.pt and OUT/last.state.pt")
    ev = sub.add_parser("evaluate", help="score a checkpoint: Acc, macro-F1, WA, WF1, per class; JSON + confusion PNG")
    ev.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", default="official:test", help="SPLIT[:PART], PART in train|val|test|all")
    ev.add_argument("--mode", choices=("auto", "text", "speech"), default="auto", help="restrict the modalities used")
    ev.add_argument("--json", default="", help="write the report here (and a confusion PNG beside it)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--encoder", default="", help="where to find the checkpoint's frozen text encoder")
    ev.add_argument("--cache-dir", default="cache")
    ev.add_argument("--seed", type=int, default=0, help="split seed (must match training for paper/speaker splits)")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--cache-speech", action=argparse.BooleanOptionalAction, default=False,
                    help="embed each clip once (faster for large acted corpora)")
    a = ap.parse_args(argv)
    if a.cmd == "recipe":
        return stages.main(a)
    return cmd_train(a) if a.cmd == "train" else cmd_evaluate(a)


if __name__ == "__main__":
    sys.exit(main())
