"""What the command-line clients share: output options and event printing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import IO

from clients.client import DEFAULT_URL, Event
from clients.render import Renderer, jsonl


def add_output_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", default=DEFAULT_URL, help=f"service address (default {DEFAULT_URL})")
    ap.add_argument("--token", default=os.environ.get("EMOSTREAM_TOKEN"),
                    help="API token (default: $EMOSTREAM_TOKEN)")
    ap.add_argument("--insecure", action="store_true", help="wss:// without certificate verification (self-signed)")
    ap.add_argument("--jsonl", action="store_true", help="print raw events as JSON lines")
    ap.add_argument("--save", metavar="FILE", help="also append every event to FILE as JSON lines")
    ap.add_argument("--no-colour", "--no-color", dest="colour", action="store_false", help="plain text")
    ap.add_argument("--no-revisions", dest="revisions", action="store_false", help="hide emotion.revised")


class Printer:
    """Prints events human-readably (or as JSONL) and optionally saves them."""

    def __init__(self, args: argparse.Namespace, out: IO[str] = sys.stdout) -> None:
        self.as_jsonl = args.jsonl
        self.renderer = Renderer(colour=args.colour and out.isatty(), show_revisions=args.revisions)
        self.out = out
        self.save = open(args.save, "a", encoding="utf-8") if args.save else None

    def __call__(self, ev: Event) -> None:
        lines = [jsonl(ev)] if self.as_jsonl else self.renderer.render(ev)
        for line in lines:
            print(line, file=self.out, flush=True)
        if self.save is not None:
            self.save.write(json.dumps(ev.data, ensure_ascii=False) + "\n")
            self.save.flush()

    def close(self) -> None:
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
