"""The allocator of a long-running service process (Linux; elsewhere nothing is changed).

Why it matters: utterance audio, features, Whisper's and the encoders' temporaries (0.1-2 MB each)
are allocated on the event loop, the decoder threads and the model thread, and freed in another
order. glibc serves a block of 128 KiB or more with its own mmap, but after the first such block is
freed it raises that threshold (up to 32 MiB), and from then on those blocks are carved out of the
per-thread arenas, which fragment: over a long soak the arenas and RSS keep growing while the memory
in use stays flat (bench/soak.py, bench/allocator.py).

The choices, `EMOSTREAM_ALLOCATOR=auto|jemalloc|trim|pinned|glibc` (bench/allocator.py measures
them side by side; `auto` is AUTO, the one that measured best there):
  jemalloc  Debian's `libjemalloc2` (scripts/setup.sh installs it): size-class slabs that do not
            fragment this way and keep freed pages for reuse, returning them after `dirty_decay_ms`.
            An allocator can only be chosen before the process starts, so the service's commands
            (`emostream serve|demo|worker`, `python -m streamer`, `python -m streamer.infer.worker`)
            re-execute themselves once with `LD_PRELOAD` set (`relaunch_with_allocator`);
            `MALLOC_CONF` is set to JEMALLOC_CONF unless the user set one. Where the library is
            missing, GLIBC_FALLBACK.
  trim      glibc untouched, plus a thread that calls `malloc_trim(0)` every TRIM_EVERY_S (or
            `EMOSTREAM_TRIM_EVERY_S`): the pages of the free holes inside the arenas
            go back to the kernel (a hole reused later faults its pages in again, far fewer than
            `pinned` maps); in bench/allocator.py's soak it slowed RSS growth but did not stop it.
  pinned    glibc with the mmap threshold pinned at 128 KiB (`mallopt`): no holes, but every large
            temporary is a fresh mmap whose pages fault in, which costs CPU on the inference path.
  glibc     glibc untouched.
A process that was started under another allocator already (`LD_PRELOAD` of jemalloc or tcmalloc by
the user) is never re-executed; `tune_allocator` reports what is in effect (`/healthz` shows it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

ALLOCATOR_ENV = "EMOSTREAM_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "trim", "pinned", "glibc")
AUTO = "jemalloc"  # what `auto` means: set from bench/allocator.py's measurements (module doc)
GLIBC_FALLBACK = "pinned"  # a jemalloc choice where jemalloc cannot be loaded
TRIM_EVERY_S = 30.0  # `trim`: how often free pages inside glibc's arenas go back to the kernel
# oversize_threshold:0 keeps allocations over 8 MiB in the ordinary arenas: jemalloc's dedicated
# "huge" arena purges them at once, so each of Whisper's large buffers faulted its pages in again
# (bench/results/allocator_oversize.json: Whisper RTF 0.046 vs 0.057 at 4 streams ending together)
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0,oversize_threshold:0"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024
_RELAUNCHED = "EMOSTREAM_ALLOCATOR_RELAUNCHED"  # set on the re-executed process: never loop
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/opt/homebrew/lib")


def choice() -> str:
    value = os.environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        log.warning("%s=%r is not one of %s: using auto", ALLOCATOR_ENV, value, "|".join(CHOICES))
        return "auto"
    return value


def effective_choice() -> str:
    """The choice with `auto` resolved: AUTO (what bench/allocator.py measured best)."""
    c = choice()
    return AUTO if c == "auto" else c


def jemalloc_library() -> str | None:
    """The path of libjemalloc.so.2 on this machine, or None."""
    for d in _LIB_DIRS:
        path = Path(d) / "libjemalloc.so.2"
        if path.exists():
            return str(path)
    return None


def loaded_allocator() -> str | None:
    """'jemalloc' or 'tcmalloc' when such a library is mapped into this process, else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return None


def relaunch_with_allocator(argv: list[str] | None = None) -> None:
    """Re-execute this process under jemalloc when the choice asks for it (see the module doc).

    Returns when nothing is to be done: not Linux, the choice is a glibc one, another allocator is
    loaded already, this is the re-executed process, or jemalloc is not installed (then
    `tune_allocator` falls back to GLIBC_FALLBACK, with a warning when jemalloc was asked for by
    name). Call it first thing in a command's `__main__`, before threads start or files are opened.
    """
    want = effective_choice()
    if not sys.platform.startswith("linux") or want != "jemalloc":
        return
    if os.environ.get(_RELAUNCHED) or loaded_allocator():
        return
    lib = jemalloc_library()
    if lib is None:
        if choice() == "jemalloc":
            log.warning("%s=jemalloc but libjemalloc.so.2 is not installed (Debian: libjemalloc2): "
                        "glibc (%s) instead", ALLOCATOR_ENV, GLIBC_FALLBACK)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_RELAUNCHED] = "1"
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError as e:  # keep running under glibc rather than not at all
        log.warning("could not re-execute under jemalloc (%s): glibc (%s) instead", e, GLIBC_FALLBACK)


def tune_allocator() -> str:
    """Set up the allocator in effect in this process; returns its name (`jemalloc`, `tcmalloc`,
    `trim`, `pinned`, `glibc`). Under glibc: `trim` starts the trimming thread, `pinned` pins the
    mmap threshold; a jemalloc choice that could not be had gets GLIBC_FALLBACK. Call it before the
    inference threads allocate."""
    other = loaded_allocator()
    if other:
        return other
    want = effective_choice()
    if want == "jemalloc":
        want = GLIBC_FALLBACK
    if not sys.platform.startswith("linux") or want == "glibc":
        return "glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return "glibc"
    if want == "trim":
        trim = getattr(libc, "malloc_trim", None)
        if trim is None:  # not glibc (e.g. musl): nothing to tune
            return "glibc"
        _start_trimmer(trim)
        return "trim"
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return "glibc"
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: memory may fragment over long runs")
        return "glibc"
    return "pinned"

_trimmer: threading.Thread | None = None
trims = 0  # malloc_trim calls made so far by the trimming thread
trimmed = threading.Condition()  # notified after each of them


def _start_trimmer(malloc_trim: ctypes._CFuncPtr) -> None:
    """One daemon thread per process: `malloc_trim(0)` every TRIM_EVERY_S, which hands the free
    pages inside every arena back to the kernel (madvise) without moving anything in use."""
    global _trimmer
    if _trimmer is not None:
        return
    malloc_trim.argtypes = [ctypes.c_size_t]
    try:
        every = float(os.environ.get("EMOSTREAM_TRIM_EVERY_S", TRIM_EVERY_S))
    except ValueError:
        every = TRIM_EVERY_S

    def loop() -> None:
        global trims
        while True:
            time.sleep(every)  # the period itself, not a wait for something
            malloc_trim(0)
            with trimmed:
                trims += 1
                trimmed.notify_all()

    _trimmer = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    _trimmer.start()


def fresh_environment(choice: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) for a child process that starts afresh under `choice`: without
    this process's LD_PRELOAD, MALLOC_CONF and re-execution marker (the benches' and tests' runs)."""
    out = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in ("LD_PRELOAD", "MALLOC_CONF", _RELAUNCHED)}
    out[ALLOCATOR_ENV] = choice
    return out
