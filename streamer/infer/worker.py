"""`python -m streamer.infer.worker --bus redis://…`: a remote inference worker (see streamer/infer/remote.py).

    python -m streamer.infer.worker --bus redis://gpu-host:6379/0 --device cuda --max-batch 16
    python -m streamer --inference redis://gpu-host:6379/0      # front-ends, as many as needed

Owns Whisper and the emotion model's encoders; stateless. Takes jobs from every front-end through
one Redis consumer group, batches them (the first job, then whatever arrives within max_wait_ms, up
to max_batch), decodes and encodes them, and answers each on its front-end's reply stream. A reply
and the job's XACK are written in one transaction; jobs left pending by a dead worker are taken over
after claim_idle_s (XAUTOCLAIM); jobs past their deadline (the front-end gave up) are dropped unread.
A heartbeat thread writes the worker's load to Redis every heartbeat_s (a key with a TTL: see
remote.py), which front-ends read for admission and /healthz. SIGINT/SIGTERM: the batch in hand is
finished, the heartbeat deleted, then the worker exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from streamer.memory import tune_allocator
from streamer.config import AsrConfig, WorkerConfig, default_checkpoint


def asr_config(a: argparse.Namespace) -> AsrConfig:
    """The worker's Whisper settings from its options: one decoding thread per worker process."""
    cfg = AsrConfig(device=a.device, beam_size=a.asr_beam, workers=1)
    if a.asr_model:
        cfg = replace(cfg, model=a.asr_model)
    if a.asr_window is not None:
        cfg = replace(cfg, min_window_s=a.asr_window)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    d = WorkerConfig()
    p = argparse.ArgumentParser(prog="python -m streamer.infer.worker", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bus", required=True, metavar="URL",
                   help="the Redis the front-ends use with --inference: redis://HOST:PORT/DB or unix:///path/redis.sock")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for both models")
    p.add_argument("--checkpoint", type=Path, default=None, help=f"emotion model (default {default_checkpoint()})")
    p.add_argument("--asr-model", default=None, help="Whisper CTranslate2 model name or path (default: packaged tiny.en)")
    p.add_argument("--asr-beam", type=int, default=1)
    p.add_argument("--asr-window", type=float, default=None, metavar="S",
                   help="shortest Whisper encoder window, seconds (default 10; 30 is Whisper's standard)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N", help="jobs per batch")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, metavar="M", help="wait for company per batch")
    p.add_argument("--claim-idle", type=float, default=d.claim_idle_s, metavar="S",
                   help="take over jobs a dead worker left pending this long")
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--name", default=None, help="consumer name (default host-pid-random)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()  # a long-running process: streamer/memory.py
    try:
        config = WorkerConfig(url=a.bus, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, claim_idle_s=a.claim_idle)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model import CheckpointError, load_checkpoint  # the heavy imports (torch), after the arguments
    from streamer.infer.consumer import Worker
    from streamer.infer.remote import JOBS
    from streamer.infer.transcriber import AsrModelError, Transcriber

    if a.torch_threads > 0:
        import torch

        torch.set_num_threads(a.torch_threads)
    asr_cfg = asr_config(a)
    try:
        model = load_checkpoint(a.checkpoint or default_checkpoint(), device=a.device)
        asr = Transcriber(asr_cfg)
    except (CheckpointError, AsrModelError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worker = Worker(config, model, asr, a.name)
    warm = worker.warmup()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    worker.start_heartbeat()  # before 'ready': a front-end started after it sees this worker alive
    print(f"worker {worker.name} ready (models on {model.device}/{asr.device}, warm-up {warm:.2f} s); "
          f"serving {JOBS} on {config.url}", flush=True)
    worker.run()
    print(f"worker {worker.name} stopped: {worker.jobs} jobs in {worker.batches} batches, "
          f"{worker.expired} expired, {worker.failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # returns, or re-executes this command line under jemalloc
    sys.exit(main())
