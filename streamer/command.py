"""`emostream`: one command for every entry point; each still runs as `python -m …` too.

    emostream serve [--mic | --file F | --demo] …   the service                  python -m streamer
    emostream demo                                  the service on the bundled recording
    emostream mic | file | subscribe …              the clients                  python -m clients.mic, …
    emostream export …                              the durable event log        python -m streamer.events.export
    emostream worker …                              a remote inference worker    python -m streamer.infer.worker
    emostream train …                               the bundled model's recipe   python -m training recipe
    emostream train-run | evaluate …                one training run, scoring    python -m training train|evaluate

The launcher imports a command's module by name only once it is chosen, so `emostream --help`
starts at once and the packages keep their import arrows (README, module map): it starts entry
points, it does not use their code.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    prefix: tuple[str, ...]  # arguments put before the user's
    help: str
    service: bool = False  # a long-running process: started under the chosen allocator (streamer/memory.py)


COMMANDS = {
    "serve": Command("streamer.__main__", (), "run the service (WebSocket/HTTP; --mic, --file F, --demo)", True),
    "demo": Command("streamer.__main__", ("--demo",), "the service fed the bundled recording, printing live emotions", True),
    "mic": Command("clients.mic", (), "talk into this machine's microphone, watch each utterance's emotion"),
    "file": Command("clients.file", (), "stream an audio file to a service"),
    "subscribe": Command("clients.subscribe", (), "watch one session or all (*) of a service"),
    "export": Command("streamer.events.export", (), "export sessions from the durable event log (--store)"),
    "worker": Command("streamer.infer.worker", (), "a remote inference worker (Whisper + encoders) fed through Redis", True),
    "train": Command("training.__main__", ("recipe",), "the recipe that built the bundled model, by stages (--stages, --dry-run)"),
    "train-run": Command("training.__main__", ("train",), "one configurable training run (paper defaults; the v3 path)"),
    "evaluate": Command("training.__main__", ("evaluate",), "score a checkpoint on a dataset split"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:{width}s}  {c.help}" for name, c in COMMANDS.items())
    return (f"usage: emostream COMMAND [options]   (emostream COMMAND --help for its options)\n\n"
            f"real-time multimodal emotion recognition\n\ncommands:\n{rows}\n")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if args else 2
    if args[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"emostream {version('emostream')}")
        except PackageNotFoundError:
            print("emostream (not installed: running from a source tree)")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"emostream: unknown command {args[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    if command.service and argv is None:  # the real command line, not a call from Python
        from streamer.memory import relaunch_with_allocator

        relaunch_with_allocator()  # returns, or re-executes this command line under jemalloc
    sys.argv[0] = f"emostream {args[0]}"  # argparse's prog in the command's own --help and errors
    entry = importlib.import_module(command.module)
    return int(entry.main([*command.prefix, *args[1:]]) or 0)


if __name__ == "__main__":
    sys.exit(main())
