"""What the command-line clients share: output options and event printing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import IO

from clients.client import DEFAULT_URL, Event
from clients.render import Renderer, jsonl
from streamer import protocol as P

CLEAR_LINE = "\r\033[2K"  # back to the start of the line and erase it


def add_output_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", default=DEFAULT_URL, help=f"service address (default {DEFAULT_URL})")
    ap.add_argument("--token", default=os.environ.get("EMOSTREAM_TOKEN"),
                    help="API token (default: $EMOSTREAM_TOKEN)")
    ap.add_argument("--insecure", action="store_true", help="wss:// without certificate verification (self-signed)")
    ap.add_argument("--jsonl", action="store_true", help="print raw events as JSON lines")
    ap.add_argument("--save", metavar="FILE", help="also append every event to FILE as JSON lines")
    ap.add_argument("--no-colour", "--no-color", dest="colour", action="store_false", help="plain text")
    ap.add_argument("--no-revisions", dest="revisions", action="store_false", help="hide emotion.revised")


def add_result_args(ap: argparse.ArgumentParser, words: bool = True) -> None:
    """--interim (and, for sources, --words): what the session or the watcher asks the server for."""
    ap.add_argument("--interim", action="store_true",
                    help="also show the text so far (and a provisional emotion) while someone is still speaking; "
                         "on a terminal the interim line is rewritten in place until the final result replaces it")
    if words:
        ap.add_argument("--words", action="store_true",
                        help="word timings: each final transcript carries every word's start and end (s)")


def add_diarize_args(ap: argparse.ArgumentParser) -> None:
    """--diarize / --max-speakers: sources where several people share the one channel."""
    ap.add_argument("--diarize", action="store_true",
                    help="several people on one channel: label each utterance's speaker (S1, S2, ... in order of "
                         "first appearance; a later utterance may re-attribute an earlier one)")
    ap.add_argument("--max-speakers", type=int, default=None, metavar="N", choices=range(1, P.MAX_SPEAKERS + 1),
                    help=f"with --diarize: at most N speakers (1-{P.MAX_SPEAKERS}; default: any number)")


def diarize_options(args: argparse.Namespace) -> dict:
    """StreamClient keyword arguments for --diarize / --max-speakers (the latter needs the former)."""
    if args.max_speakers is not None and not args.diarize:
        raise SystemExit("error: --max-speakers needs --diarize")
    return {"diarize": args.diarize, "max_speakers": args.max_speakers}


class Printer:
    """Prints events human-readably (or as JSONL) and optionally saves them. On a terminal, interim
    results (transcript.partial, emotion.partial) share one status line that is rewritten in place
    and cleared before the final lines; elsewhere (a pipe, a file, --jsonl) every partial is a line."""

    def __init__(self, args: argparse.Namespace, out: IO[str] = sys.stdout) -> None:
        self.as_jsonl = args.jsonl
        self.tty = out.isatty()
        self.renderer = Renderer(colour=args.colour and self.tty, show_revisions=args.revisions)
        self.out = out
        self.save = open(args.save, "a", encoding="utf-8") if args.save else None
        self.status = ""  # the interim line on screen (terminals only)

    def __call__(self, ev: Event) -> None:
        if self.as_jsonl:
            print(jsonl(ev), file=self.out, flush=True)
        elif self.tty:
            width = shutil.get_terminal_size().columns
            self.renderer.width = width
            lines = self.renderer.render(ev)
            self._redraw([] if ev.type in P.INTERIM_TYPES else lines, self.renderer.interim_line(width - 1))
        else:
            for line in self.renderer.render(ev):
                print(line, file=self.out, flush=True)
        if self.save is not None:
            self.save.write(json.dumps(ev.data, ensure_ascii=False) + "\n")
            self.save.flush()

    def _redraw(self, lines: list[str], status: str) -> None:
        """Final lines above, then the interim status line (no newline: the next redraw erases it)."""
        if not lines and status == self.status:
            return
        if self.status:
            self.out.write(CLEAR_LINE)
        for line in lines:
            self.out.write(line + "\n")
        self.out.write(status)
        self.status = status
        self.out.flush()

    def close(self) -> None:
        if self.status:  # interrupted while someone was speaking: leave the line clean
            self.out.write(CLEAR_LINE)
            self.out.flush()
            self.status = ""
        if self.save is not None:
            self.save.close()


def connection_args(args: argparse.Namespace) -> dict:
    """token/ssl keyword arguments for StreamClient and Subscriber from the CLI options."""
    ctx = None
    if args.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return {"token": args.token, "ssl": ctx}


def run_cli(main: Callable[[argparse.Namespace, Printer], Awaitable[int]], args: argparse.Namespace,
            interrupted_rc: int = 130) -> int:
    """Run a client's coroutine with its Printer; a clear one-line error instead of a traceback."""
    printer = Printer(args)
    try:
        return asyncio.run(main(args, printer))
    except KeyboardInterrupt:
        return interrupted_rc
    except (OSError, RuntimeError, ConnectionError) as e:  # ConnectionError: gave up reconnecting
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        printer.close()
