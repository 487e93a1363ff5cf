"""Desktop microphone session: talk, and watch each utterance's transcript and emotion appear.

    python -m clients.mic [--url ws://127.0.0.1:8765] [--device N|NAME] [--list-devices] [--interim] [--words]
                          [--diarize [--max-speakers N]] [--save session.jsonl]

With --interim the words appear while you speak (grey, rewritten in place) and the final result
replaces them; --words adds each word's timing under the transcript; --diarize (several people at
one microphone) puts each utterance's speaker (S1, S2, ...) before its emotion.

Ctrl-C stops capturing, waits for the last utterance's result, prints the emotion timeline and
exits; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import numpy as np

from clients.audio import CHUNK_S
from clients.cli import Printer, add_diarize_args, add_output_args, add_result_args, connection_args, diarize_options, run_cli
from clients.client import StreamClient, run_source


def list_devices() -> str:
    import sounddevice as sd

    return str(sd.query_devices())


class Capture:
    """The input device, capturing from `with` on into a bounded queue (so what is said once
    "listening" shows is not lost while the connection opens); `chunks()` yields int16 mono
    blocks (CHUNK_S each) until `stop` is set. The PortAudio callback runs on its own thread and
    only hands blocks to the event loop; when the queue is full the oldest block is dropped."""

    def __init__(self, device: str | int | None, sample_rate: int) -> None:
        import sounddevice as sd

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=100)
        self.stream = sd.InputStream(device=device, channels=1, samplerate=sample_rate, dtype="int16",
                                     blocksize=int(sample_rate * CHUNK_S), callback=self._on_block)

    def __enter__(self) -> Capture:
        self.stream.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()

    def _on_block(self, indata, frames, time_info, status) -> None:  # PortAudio thread
        self.loop.call_soon_threadsafe(self._put, indata[:, 0].copy())

    def _put(self, block: np.ndarray) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # never block capture: drop the oldest block
        self.queue.put_nowait(block)

    async def chunks(self, stop: asyncio.Event) -> AsyncIterator[np.ndarray]:
        while not stop.is_set():
            getter = asyncio.ensure_future(self.queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()


def pick_rate(device: str | int | None) -> int:
    """16 kHz when the device takes it, else its default rate (the server resamples 8-48 kHz)."""
    import sounddevice as sd

    try:
        sd.check_input_settings(device=device, channels=1, samplerate=16_000, dtype="int16")
        return 16_000
    except Exception:  # PortAudio raises several types for an unsupported rate
        return int(sd.query_devices(device, "input")["default_samplerate"])


async def session(args: argparse.Namespace, printer: Printer) -> int:
    device = int(args.device) if args.device and args.device.isdigit() else args.device
    rate = pick_rate(device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        if stop.is_set():
            raise SystemExit(130)  # second Ctrl-C: leave now
        print("\n… finishing the last utterance (Ctrl-C again to quit now)", file=sys.stderr)
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with Capture(device, rate) as mic:  # capturing before the session starts: the first words are not lost
        async with StreamClient(args.url, sample_rate=rate, session_id=args.session_id, metadata={"source": "clients.mic"},
                                interim=args.interim, word_timestamps=args.words, **diarize_options(args),
                                **connection_args(args)) as client:
            extras = [x for x, on in (("interim results", args.interim), ("word timings", args.words),
                                      ("speaker labels", args.diarize)) if on]
            print(f"● listening on {'default input' if device is None else device} at {rate} Hz "
                  f"→ {args.url}{' with ' + ' and '.join(extras) if extras else ''} (Ctrl-C to stop)", file=sys.stderr)
            await run_source(client, mic.chunks(stop), printer, stop_when=stop)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clients.mic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="input device index or name (see --list-devices)")
    ap.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    ap.add_argument("--session-id", help="ask for this session id")
    add_result_args(ap)
    add_diarize_args(ap)
    add_output_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_devices:
        print(list_devices())
        return 0
    return run_cli(session, args)


if __name__ == "__main__":
    sys.exit(main())
