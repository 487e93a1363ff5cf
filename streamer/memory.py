"""Allocator tuning for a long-running service process (glibc on Linux; a no-op elsewhere).

glibc serves an allocation of 128 KiB or more with its own mmap, returned to the system when freed,
but after the first such block is freed it raises that threshold dynamically (up to 32 MiB), and
from then on utterance audio, features and encoder outputs (0.1-2 MB each) are carved out of the
per-thread malloc arenas. The event loop and the inference threads allocate and free them in
interleaved order, so the arenas fragment: in a 3-minute soak (20 sessions, fake ASR) malloc's
arenas grew 361 -> 519 MB while the memory in use stayed 221 -> 237 MB, and RSS rose ~30 MB a
minute. Pinning the threshold at 128 KiB (which also stops the dynamic adjustment) keeps the free
memory inside the arenas at ~4 MB: RSS 662 -> 698 MB over the same run, the growth of the bounded
per-session buffers (bench/results/soak.json).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def tune_allocator() -> bool:
    """Pin glibc's mmap threshold (see the module doc); True when it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc (e.g. musl): nothing to tune
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: memory may fragment over long runs")
    return ok
