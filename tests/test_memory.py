"""The allocator tuning that keeps a long-running service's RSS flat (streamer/memory.py).

A workload shaped like the service's (three threads allocating and freeing 0.1-1.5 MB arrays in
interleaved order, some small long-lived objects, after one large block was freed) runs in a fresh
interpreter with and without `tune_allocator()`: without it glibc keeps tens of MB of free holes
inside its arenas (what made the soak's RSS grow), with it almost none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import ctypes, json, random, sys, threading
import numpy as np
sys.path.insert(0, ROOT)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = False
if TUNED:
    from streamer.memory import tune_allocator
    tuned = tune_allocator()
big = np.ones(1_000_000); del big  # one freed 8 MB block: glibc raises its mmap threshold to 8 MB
keep, lock = [], threading.Lock()

def work(seed):
    rng, live = random.Random(seed), []
    for _ in range(3000):
        live.append(np.empty(rng.randint(100_000, 1_500_000) // 4, np.float32))  # utterance-sized
        if rng.random() < 0.05:
            with lock:
                keep.append(np.empty(rng.randint(1000, 40_000), np.uint8))  # outlives the utterances
        if len(live) > 6:
            live.pop(rng.randrange(len(live)))

threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
m = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "free_in_arenas_mb": m.fordblks / 2**20, "in_use_mb": m.uordblks / 2**20}))
"""


def run(tuned: bool) -> dict:
    code = WORKLOAD.replace("ROOT", repr(str(ROOT))).replace("TUNED", str(tuned))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pinned_mmap_threshold_leaves_no_free_holes_in_the_arenas() -> None:
    plain, tuned = run(False), run(True)
    assert tuned["tuned"], "mallopt(M_MMAP_THRESHOLD) must succeed on glibc (the service runs on Linux)"
    assert tuned["free_in_arenas_mb"] < 8, tuned
    assert plain["free_in_arenas_mb"] > tuned["free_in_arenas_mb"] + 8, (plain, tuned)  # the test can fail
