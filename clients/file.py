"""Stream an audio file (wav, flac, mp3, ogg, ...) to the service and print its events.

    python -m clients.file recording.wav [--url ws://127.0.0.1:8765] [--fast] [--jsonl] [--save out.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from clients.audio import SAMPLE_RATE, decode, paced_chunks
from clients.cli import Printer, add_output_args
from clients.client import StreamClient, run_source


async def stream_file(args: argparse.Namespace, printer: Printer) -> int:
    audio = decode(args.path, SAMPLE_RATE)
    async with StreamClient(args.url, sample_rate=SAMPLE_RATE, session_id=args.session_id,
                            metadata={"source": "clients.file", "file": args.path}) as client:
        events = await run_source(client, paced_chunks(audio, SAMPLE_RATE, realtime=not args.fast), printer)
    return 0 if any(e.type == "session.ended" for e in events) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clients.file", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="audio file")
    ap.add_argument("--fast", action="store_true", help="send as fast as possible instead of real time")
    ap.add_argument("--session-id", help="ask for this session id")
    add_output_args(ap)
    args = ap.parse_args(argv)
    printer = Printer(args)
    try:
        return asyncio.run(stream_file(args, printer))
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        printer.close()


if __name__ == "__main__":
    sys.exit(main())
