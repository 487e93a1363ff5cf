"""Watch live sessions: print every event of one session, or of all of them.

    python -m clients.subscribe [--session ID|*] [--url ws://127.0.0.1:8765] [--interim] [--jsonl] [--save out.jsonl]
"""

from __future__ import annotations

import argparse
import sys

from clients.cli import Printer, add_output_args, add_result_args, connection_args, run_cli
from clients.client import Subscriber
from streamer import protocol as P


async def watch(args: argparse.Namespace, printer: Printer) -> int:
    seen = 0
    async for ev in Subscriber(args.url, session=args.session, reconnect=not args.once, interim=args.interim,
                               **connection_args(args)):
        printer(ev)
        if ev.type == P.SESSION_ENDED and args.session != P.ALL_SESSIONS and args.exit_on_end:
            return 0
        seen += 1
        if args.count and seen >= args.count:
            return 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clients.subscribe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", default=P.ALL_SESSIONS, help="session id, or * for all (default)")
    ap.add_argument("--exit-on-end", action="store_true", help="exit when a single watched session ends")
    ap.add_argument("--count", type=int, default=0, help="exit after this many events (0: never)")
    ap.add_argument("--once", action="store_true", help="do not reconnect when the connection drops")
    add_result_args(ap, words=False)  # word timings are the source's choice: shown when its transcripts carry them
    add_output_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_cli(watch, build_parser().parse_args(argv), interrupted_rc=0)


if __name__ == "__main__":
    sys.exit(main())
