"""Stream an audio file (wav, flac, mp3, ogg, ...) to the service and print its events.

    python -m clients.file recording.wav [--url ws://127.0.0.1:8765] [--fast] [--interim] [--words] [--diarize]
                           [--jsonl] [--save out.jsonl]
"""

from __future__ import annotations

import argparse
import sys

from clients.audio import SAMPLE_RATE, decode, paced_chunks
from clients.cli import Printer, add_diarize_args, add_output_args, add_result_args, connection_args, diarize_options, run_cli
from clients.client import StreamClient, run_source


async def stream_file(args: argparse.Namespace, printer: Printer) -> int:
    speakers = [s.strip() for s in args.speakers.split(",")] if args.speakers else None
    if speakers is not None and args.diarize:
        raise RuntimeError("--diarize labels the speakers of one channel; --speakers names each channel: use one")
    audio = decode(args.path, SAMPLE_RATE, mono=speakers is None)
    if speakers is not None:
        if audio.ndim != 2 or audio.shape[0] != len(speakers):
            raise RuntimeError(f"--speakers names {len(speakers)} channels; {args.path} has "
                               f"{1 if audio.ndim == 1 else audio.shape[0]}")
        audio = audio.T.reshape(-1)  # interleave: pcm_s16le frames carry one sample per channel
    channels = len(speakers) if speakers else 1
    async with StreamClient(args.url, sample_rate=SAMPLE_RATE, channels=channels, speakers=speakers,
                            session_id=args.session_id, metadata={"source": "clients.file", "file": args.path},
                            interim=args.interim, word_timestamps=args.words, **diarize_options(args),
                            **connection_args(args)) as client:
        chunks = paced_chunks(audio, SAMPLE_RATE * channels, realtime=not args.fast)
        events = await run_source(client, chunks, printer)
    return 0 if any(e.type == "session.ended" for e in events) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clients.file", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="audio file")
    ap.add_argument("--fast", action="store_true", help="send as fast as possible instead of real time")
    ap.add_argument("--session-id", help="ask for this session id")
    ap.add_argument("--speakers", metavar="A,B", help="multi-channel file: one speaker per channel, e.g. agent,customer "
                    "(a call recording with the agent left and the customer right); default: downmix to mono")
    add_result_args(ap)
    add_diarize_args(ap)
    add_output_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_cli(stream_file, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
