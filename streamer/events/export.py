"""`python -m streamer.events.export`: the durable event log (`--store`) as JSON lines, one event a line.

    python -m streamer.events.export --store events.db                      # every session, (run, seq) order
    python -m streamer.events.export --store events.db --session desk-3 -o desk-3.jsonl
    python -m streamer.events.export --store events.db --session desk-3 --after-seq 41   # what came after 41

Safe while the service is writing: it reads one consistent snapshot and never blocks the writer.
A session id used more than once (e.g. "mic" after a restart) means its newest run; --run N picks another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamer.events.store import EventStore, StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamer.events.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--store", type=Path, required=True, metavar="PATH", help="the service's --store file")
    p.add_argument("--session", default=None, metavar="ID", help="only this session (default: all)")
    p.add_argument("--run", type=int, default=None, metavar="N", help="with --session: this run of the id (see GET /v1/sessions)")
    p.add_argument("--after-seq", type=int, default=None, metavar="N", help="only events with seq > N (in each session)")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE", help="write here (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.run is not None and a.session is None:
        print("error: --run needs --session", file=sys.stderr)
        return 2
    try:
        store = EventStore(a.store, readonly=True)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if a.session is not None and store.session(a.session, a.run) is None:
            run = f" run {a.run}" if a.run is not None else ""
            print(f"error: session {a.session!r}{run} is not in {a.store}", file=sys.stderr)
            return 1
        out = open(a.output, "w", encoding="utf-8") if a.output is not None else sys.stdout
        n = 0
        try:
            for text in store.iter_export(a.session, a.after_seq, a.run):
                out.write(text + "\n")
                n += 1
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"exported {n} events from {a.store}" + (f" to {a.output}" if a.output else ""), file=sys.stderr)
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
