"""`python -m streamer`: the live emotion service, and the demo that feeds it a bundled recording.

    python -m streamer --demo                 # serve on a free port, stream the bundled recording
                                              # through /v1/stream in real time, print each event
    python -m streamer                        # serve on 127.0.0.1:8765 until Ctrl-C
    python -m streamer --mic [DEVICE]         # serve + the desktop microphone as session "mic"
    python -m streamer --file talk.mp3 --fast # serve + stream a file as fast as possible
    python -m streamer --demo --interim --words  # + the text so far while speaking, and word timings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from streamer.routes import auth
from streamer import protocol as P
from streamer.config import (MODALITIES, AppConfig, AsrConfig, CallsConfig, InferenceConfig, SegmenterConfig,
                             ServerConfig, default_checkpoint)
from streamer.config import BusConfig, DiarizeConfig, StoreConfig

DEMO_RECORDING = Path(__file__).resolve().parent / "assets" / "demo.flac"


def _checked_url(build: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the URL as given, refused with the config's own reason when invalid."""
    def check(url: str) -> str:
        try:
            build(url)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return url

    return check


def _unit_interval(text: str) -> float:
    """An argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


_bus_url = _checked_url(lambda url: BusConfig(url=url))
_inference_url = _checked_url(lambda url: InferenceConfig(remote=url))


def build_parser() -> argparse.ArgumentParser:
    """Every option, one add_argument each (longer than the ~60-line guide: a flat list reads best)."""
    p = argparse.ArgumentParser(prog="python -m streamer", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None,
                   help="default 8765; 0 picks a free port (the default with --demo/--file)")
    p.add_argument("--checkpoint", type=Path, default=None, help=f"emotion model (default {default_checkpoint()})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for both models")
    p.add_argument("--modalities", choices=MODALITIES, default="both",
                   help="score both modalities, or speech / text alone (an utterance lacking it keeps the other)")
    p.add_argument("--low-confidence", type=_unit_interval, default=None, metavar="FLOAT",
                   help='mark an emotion "confidence": "low" when its calibrated top score is below this '
                        "(default: the checkpoint's, 0.5: below it the model is more likely wrong than right)")
    p.add_argument("--asr-model", default=None, help="Whisper CTranslate2 model name or path (default: packaged tiny.en)")
    p.add_argument("--asr-beam", type=int, default=1)
    p.add_argument("--asr-window", type=float, default=None, metavar="S",
                   help="shortest Whisper encoder window, seconds (default 10; 30 is Whisper's standard, slower on short "
                        "utterances): an utterance gets its length + 2 s, rounded up to 5 s, within [S, 30]. With --inference "
                        "the workers decode: give it to them (python -m streamer.infer.worker --asr-window)")
    p.add_argument("--asr-workers", type=int, default=0,
                   help="Whisper decoders run in parallel, one thread each on a CPU (0: 2 on a multi-core CPU, 1 on CUDA)")
    p.add_argument("--vad", choices=["hybrid", "silero", "webrtc"], default="hybrid")
    p.add_argument("--trailing-silence", type=float, default=None, metavar="S", help="silence that ends an utterance (0.5)")
    p.add_argument("--split-after", type=float, default=None, metavar="S",
                   help="an utterance this long ends at its next pause of 0.1 s, so a long turn is decoded while the "
                        "speaker goes on, unless the service is at capacity (8; 0: only the silence wait and the "
                        "15 s maximum end an utterance)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mic", nargs="?", const="", default=None, metavar="DEVICE",
                     help="capture the microphone (default device, or a name/index from --list-devices)")
    src.add_argument("--file", type=Path, default=None, help="stream a wav/flac/mp3/ogg file through /v1/stream")
    src.add_argument("--demo", action="store_true", help="stream the bundled recording and print what it hears")
    src.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True, help="pace files in real time (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false", help="send files as fast as possible")
    p.add_argument("--json", action="store_true", help="print raw JSON events instead of readable lines")
    p.add_argument("--interim", action="store_true",
                   help="with --demo/--file/--mic: also show the text so far (and a provisional emotion) while someone "
                        "speaks; on a terminal that line is rewritten in place until the final result replaces it")
    p.add_argument("--words", action="store_true",
                   help="with --demo/--file/--mic: word timings on every final transcript")
    p.add_argument("--diarize", action="store_true",
                   help="several people on one channel: the --demo/--file/--mic session labels each utterance's speaker "
                        "(S1, S2, ...); the voice model is loaded at start (WebSocket sources ask with \"diarize\": true)")
    sec = p.add_argument_group("security (docs/protocol.md#authentication)")
    sec.add_argument("--token", action="append", default=[], metavar="TOKEN",
                     help="API token with the admin role (repeatable; also $EMOSTREAM_TOKEN)")
    sec.add_argument("--token-file", type=Path, default=None, metavar="FILE", help="lines of 'TOKEN ROLE[,ROLE]'")
    sec.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                     help="browser Origin allowed to connect, e.g. https://ops.example.com (repeatable)")
    sec.add_argument("--certfile", type=Path, default=None, help="TLS certificate (PEM) for wss:// and https://")
    sec.add_argument("--keyfile", type=Path, default=None, help="TLS private key (PEM)")
    calls = p.add_argument_group("call monitoring (docs/calls.md)")
    calls.add_argument("--speakers", metavar="A,B", default=None,
                       help="with --file: one speaker per channel of a multi-channel recording, e.g. agent,customer")
    calls.add_argument("--alert-rules", type=Path, default=None, metavar="JSON", help="alert rules file")
    calls.add_argument("--webhook", default=None, metavar="URL", help="POST alerts and call summaries here")
    calls.add_argument("--summaries", type=Path, default=None, metavar="DIR", help="write <session>.json call summaries")
    calls.add_argument("--score-sides", metavar="A[,B]", default=None,
                       help="only these sides get emotion and sentiment (e.g. customer: Twilio's inbound track); the "
                            "others are transcribed only (EU AI Act art. 5(1)(f): no emotion inference on workers)")
    p.add_argument("--store", type=Path, default=None, metavar="PATH",
                   help="keep every event in this SQLite file (WAL): GET /v1/sessions, python -m streamer.events.export")
    p.add_argument("--bus", default=None, metavar="URL", type=_bus_url,
                   help="share events with other instances through Redis: redis://HOST:PORT/DB or unix:///path/redis.sock")
    p.add_argument("--inference", default=None, metavar="URL", type=_inference_url,
                   help="run Whisper and the text encoder in `python -m streamer.infer.worker` processes fed through this "
                        "Redis (redis://HOST:PORT/DB or unix:///path/redis.sock); default: in this process")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> AppConfig:
    client_mode = a.demo or a.file is not None
    port = a.port if a.port is not None else (0 if client_mode else 8765)
    seg = SegmenterConfig(vad=a.vad)
    if a.trailing_silence is not None:
        seg = replace(seg, trailing_silence_s=a.trailing_silence,
                      early_decode_s=min(seg.early_decode_s, a.trailing_silence),
                      tail_pad_s=min(seg.tail_pad_s, a.trailing_silence),
                      split_pause_s=min(seg.split_pause_s, a.trailing_silence))
    if a.split_after is not None:
        seg = replace(seg, split_after_s=a.split_after)
    asr = AsrConfig(device=a.device, beam_size=a.asr_beam, workers=a.asr_workers)
    if a.asr_window is not None:
        asr = replace(asr, min_window_s=a.asr_window)
    if a.asr_model:
        asr = replace(asr, model=a.asr_model)
    inf = InferenceConfig(device=a.device, remote=a.inference, modalities=a.modalities,
                          low_confidence=a.low_confidence)
    if a.checkpoint is not None:
        inf = replace(inf, checkpoint=a.checkpoint)
    sides = tuple(x.strip() for x in a.score_sides.split(",") if x.strip()) if a.score_sides else ()
    calls = CallsConfig(alert_rules=a.alert_rules, webhook_url=a.webhook, summaries_dir=a.summaries, score_sides=sides)
    tokens = [(t, (auth.ADMIN,)) for t in [*a.token, os.environ.get("EMOSTREAM_TOKEN", "")] if t]
    if a.token_file is not None:
        tokens += auth.load_token_file(a.token_file)
    security = auth.AuthConfig(tokens=tuple(tokens), allowed_origins=tuple(a.allowed_origin),
                               certfile=a.certfile, keyfile=a.keyfile)
    config = AppConfig(server=ServerConfig(host=a.host, port=port), segmenter=seg, asr=asr, inference=inf, calls=calls,
                       auth=security)
    return replace(config, store=StoreConfig(path=a.store), bus=BusConfig(url=a.bus),
                   diarize=DiarizeConfig(default=a.diarize))


CLEAR_LINE = "\r\033[2K"  # back to the start of the line and erase it


class _Printer:
    """Prints events (format_event, or raw JSON with --json). On a terminal an interim result
    (transcript.partial / emotion.partial) is a status line rewritten in place, erased when the next
    line is printed (the final results replace it); elsewhere every partial is a line of its own."""

    def __init__(self, as_json: bool, out: Any = None) -> None:
        self.as_json, self.out = as_json, out if out is not None else sys.stdout
        self.tty = not as_json and self.out.isatty()
        self.status = False  # an interim line is on screen

    def __call__(self, ev: dict[str, Any]) -> None:
        from streamer.client import format_event

        line = json.dumps(ev) if self.as_json else format_event(ev)
        if not line:
            return
        if not self.tty:
            print(line, file=self.out, flush=True)
            return
        if self.status:
            self.out.write(CLEAR_LINE)
        if ev["type"] in P.INTERIM_TYPES:
            width = shutil.get_terminal_size().columns - 1
            if len(line) > width:  # one screen line, or the next rewrite could not erase it: keep the newest words
                cut = line.find("): ") + 3 if ev["type"] == P.TRANSCRIPT_PARTIAL else line.rfind(" | ") + 3
                line = (line[:cut] + "…" + line[-(width - cut - 1):]) if 2 < cut < width - 10 else line[: width - 1] + "…"
            self.out.write(f"\033[2;3m{line}\033[0m")  # dim italic: provisional
            self.status = True
        else:
            first, *rest = line.split("\n")  # a transcript's word timings: dim, under it
            self.out.write(first + "\n" + "".join(f"\033[2m{r}\033[0m\n" for r in rest))
            self.status = False
        self.out.flush()


def _extras(a: argparse.Namespace) -> str:
    """', interim results, word timings' for the console lines that say what is streamed."""
    return "".join(f", {x}" for x, on in (("interim results", a.interim), ("word timings", a.words),
                                          ("speakers", a.diarize)) if on)


async def _subscribe_and_print(url: str, session: str, as_json: bool, token: str | None = None,
                               interim: bool = False) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from streamer.client import tls_for

    show = _Printer(as_json)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with connect(f"{url}{P.SUBSCRIBE_PATH}?session={session}{'&interim=1' if interim else ''}",
                           additional_headers=headers, ssl=tls_for(url)) as ws:
            async for msg in ws:
                show(json.loads(msg))
    except ConnectionClosed:
        return


def _source_audio(a: argparse.Namespace) -> tuple[Any, list[str] | None]:
    """--demo / --file: the recording (channels, n) or (n,) at 16 kHz and its speakers; (None, None)
    without one. Raises SourceError."""
    from streamer.sources import SourceError, load_file

    if not (a.demo or a.file is not None):
        return None, None
    speakers = a.speakers.split(",") if a.speakers and a.file is not None else None
    if speakers and a.diarize:
        raise SourceError("--diarize labels the speakers of one channel; --speakers names each channel: use one")
    return load_file(DEMO_RECORDING if a.demo else a.file, channels=len(speakers) if speakers else None), speakers


async def _stream_recording(app: Any, a: argparse.Namespace, audio: Any, speakers: list[str] | None,
                            token: str | None) -> int:
    """Stream --demo / --file through the service's own socket, printing its events; then shut down."""
    from streamer.client import stream_audio
    from websockets.exceptions import ConnectionClosed

    name = "the bundled recording" if a.demo else str(a.file)
    print(f"streaming {name} ({audio.shape[-1] / 16000:.1f} s, {'real time' if a.realtime else 'fast'}{_extras(a)}) "
          f"through {app.url}{P.STREAM_PATH}", flush=True)
    rc = 0
    try:
        result = await stream_audio(app.url, audio, realtime=a.realtime, on_event=_Printer(a.json), speakers=speakers,
                                    token=token, interim=a.interim, word_timestamps=a.words, diarize=a.diarize,
                                    timeout_s=max(120.0, 3 * audio.shape[-1] / 16000))
        lat = sorted(e["latency_ms"] for e in result.of_type(P.EMOTION))
        if lat and not a.json:
            print(f"{len(lat)} utterances; end of speech -> emotion: median {lat[len(lat) // 2]:.0f} ms, "
                  f"max {lat[-1]:.0f} ms", flush=True)
    except (ConnectionClosed, OSError, asyncio.TimeoutError) as e:
        if not app.shutting_down:  # else: interrupted by SIGINT/SIGTERM, a clean stop
            print(f"error: streaming failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
    app.shutdown()
    return rc


async def _serve_microphone(app: Any, a: argparse.Namespace, token: str | None) -> int:
    """--mic: a server-side session 'mic' fed by the microphone, printed until the service stops."""
    from streamer.sources import Microphone, SourceError

    try:
        mic = Microphone(a.mic or None)
        mic.start()  # capturing before "listening" is printed: the first words are not lost
        app.add_source("mic", mic.chunks(), "microphone", interim=a.interim, word_timestamps=a.words)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        await app.shutdown()
        return 2
    printer = asyncio.create_task(_subscribe_and_print(app.url, "mic", a.json, token, interim=a.interim))
    print(f"listening to the microphone (session 'mic'{_extras(a)}); Ctrl-C to stop", flush=True)
    await app.wait_closed()
    printer.cancel()
    return 0


async def run(a: argparse.Namespace) -> int:
    """The service with its optional source (demo, file, microphone) until it ends or a signal
    comes; each startup failure gets its own message."""
    config = config_from_args(a)
    ckpt = config.inference.checkpoint
    if not Path(ckpt).is_file():  # before the imports below (torch, ~3 s): a typo fails at once
        print(f"error: emotion model checkpoint not found: {ckpt}\n"
              f"       train one (see README) or pass --checkpoint PATH", file=sys.stderr)
        return 2
    from model import CheckpointError
    from streamer.server import create_app
    from streamer.sources import SourceError
    from streamer.infer.transcriber import AsrModelError

    try:
        audio, speakers = _source_audio(a)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"ASR and encoders on workers via {config.inference.remote}" if config.inference.remote else \
        f"ASR {Path(config.asr.model).name}"
    print(f"loading models (checkpoint {ckpt}, {where}) ...", file=sys.stderr, flush=True)
    try:
        app = create_app(config)
    except (CheckpointError, AsrModelError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    await app.start()
    own_token = next((t for t, roles in config.auth.tokens if auth.ADMIN in roles), None)  # for the built-in clients
    print(f"emostream listening on {app.url} (stream: {app.url}{P.STREAM_PATH}, "
          f"events: {app.url}{P.SUBSCRIBE_PATH}?session=*, health: http://{config.server.host}:{app.port}{P.HEALTH_PATH}; allocator {app.allocator})",
          flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.shutdown)
    if audio is not None:
        rc = await _stream_recording(app, a, audio, speakers, own_token)
    elif a.mic is not None:
        rc = await _serve_microphone(app, a, own_token)
        if rc:
            return rc
    else:
        rc = 0
        await app.wait_closed()  # until SIGINT/SIGTERM
    await app.shutdown()
    print("stopped", file=sys.stderr, flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.list_devices:
        from streamer.sources import SourceError, list_devices

        try:
            print(list_devices())
        except SourceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return asyncio.run(run(a))


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # returns, or re-executes this command line under jemalloc
    sys.exit(main())
