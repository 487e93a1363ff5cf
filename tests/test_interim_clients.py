"""Interim results and word timings in the clients, without models: the terminal rendering (a
terminal rewrites the interim line in place, a pipe gets every partial as a line), the start
message and subscription URL flags, the Subscriber's resume across partials, the CLIs' --interim /
--words, and `python -m streamer`'s console output."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
from typing import Any

import pytest

from clients.cli import CLEAR_LINE, Printer
from clients.client import Event, StreamClient, Subscriber
from clients.render import Renderer, word_timings
from streamer import protocol as P
from tests.conftest import SPEECH

SCORES = {"neutral": 0.2, "joy": 0.61, "surprise": 0.04, "anger": 0.05, "sadness": 0.04, "disgust": 0.03, "fear": 0.03}
WEIGHTS = {"speech": 0.4, "text": 0.6}
WORDS = [{"word": "And", "start_s": 0.0, "end_s": 0.76, "probability": 0.67},
         {"word": " so", "start_s": 0.76, "end_s": 1.02, "probability": 0.91},
         {"word": "fellow", "start_s": 1.02, "end_s": 1.4, "probability": 0.99}]


def ev(type_: str, seq: int, sid: str = "s1", **fields: Any) -> Event:
    return Event.from_json(json.dumps(P.event(type_, sid, seq, **fields)))


def session(words: bool = True, interim: bool = True, speaker: str | None = None) -> list[Event]:
    """One utterance as a session with interim results and word timings gets it."""
    who = {"speaker": speaker, "channel": 0} if speaker else {}
    evs = [ev(P.SESSION_STARTED, 0), ev(P.UTTERANCE_STARTED, 1, utterance_id=0, start_s=0.0, **who)]
    if interim:
        evs += [ev(P.TRANSCRIPT_PARTIAL, 2, utterance_id=0, text="And so", audio_s=0.8, **who),
                ev(P.TRANSCRIPT_PARTIAL, 3, utterance_id=0, text="And so fell", audio_s=1.2, **who),
                ev(P.EMOTION_PARTIAL, 4, utterance_id=0, label="joy", scores=SCORES, modality_weights=WEIGHTS,
                   text="And so fell", audio_s=1.2, **who)]
    evs += [ev(P.UTTERANCE_ENDED, 5, utterance_id=0, start_s=0.0, end_s=1.5, reason="silence", **who),
            ev(P.TRANSCRIPT, 6, utterance_id=0, text="And so fellow", **({"words": WORDS} if words else {}), **who),
            ev(P.EMOTION, 7, utterance_id=0, label="joy", scores=SCORES, modality_weights=WEIGHTS, latency_ms=500.0, **who),
            ev(P.SESSION_ENDED, 8, utterances=1)]
    return evs


class Terminal(io.StringIO):
    """What a terminal shows: `\\r\\033[2K` erases the current line, `\\n` ends it."""

    def isatty(self) -> bool:
        return True

    def screen(self) -> tuple[list[str], str]:
        """(the finished lines, the line the cursor is on), ANSI colours stripped."""
        lines, current = [], ""
        for token in re.split(r"(\r\x1b\[2K|\n)", self.getvalue()):
            if token == CLEAR_LINE:
                current = ""
            elif token == "\n":
                lines.append(current)
                current = ""
            else:
                current += token
        strip = lambda s: re.sub(r"\x1b\[[0-9;]*m", "", s)  # noqa: E731
        return [strip(x) for x in lines], strip(current)


def printer_args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"jsonl": False, "colour": True, "revisions": True, "save": None, **kw})


# ---- rendering -----------------------------------------------------------------------------
def test_renderer_shows_partials_marked_interim_then_the_final_with_word_timings() -> None:
    r = Renderer(colour=False)
    out = [r.render(e) for e in session()]
    partial_lines = [x for lines in out[2:5] for x in lines]
    assert partial_lines == ['  … interim 0.8 s  "And so"', '  … interim 1.2 s  "And so fell"',
                             '  … interim 1.2 s  joy? 0.61  "And so fell"']
    emotion = out[7]
    assert emotion[0].startswith("[00:00.0–00:01.5] joy") and emotion[0].endswith('"And so fellow"')
    assert emotion[1:] == ["    0.00–0.76 And · 0.76–1.02 so · 1.02–1.40 fellow"]
    assert not r.partials and r.interim_line() == ""
    assert r.timeline_line("s1") == "J"  # the provisional label is not in the timeline


def test_renderer_output_without_the_flags_is_unchanged() -> None:
    lines = [x for e in session(words=False, interim=False) for x in Renderer(colour=False).render(e)]
    with_words = [x for e in session(words=True, interim=True) for x in Renderer(colour=False).render(e)]
    assert len(lines) == 4 and not any("interim" in x for x in lines)
    assert [x for x in with_words if "interim" not in x and "0.00–0.76" not in x] == lines


def test_interim_line_fits_the_width_and_keeps_the_newest_words() -> None:
    r = Renderer(colour=True)
    long = "ask not what your country can do for you ask what you can do for your country " * 3
    r.render(ev(P.TRANSCRIPT_PARTIAL, 2, utterance_id=0, text=long.strip(), audio_s=9.5, speaker="agent"))
    r.render(ev(P.EMOTION_PARTIAL, 3, sid="s2", utterance_id=4, label="anger", scores={"anger": 0.7, "joy": 0.3},
                modality_weights=WEIGHTS, text="", audio_s=2.1))
    line = re.sub(r"\x1b\[[0-9;]*m", "", r.interim_line(79))
    assert len(line) <= 79 and line.count(" | ") == 1, line
    left, right = line.split(" | ")
    assert left.startswith("… interim agent 9.5 s") and left.endswith('your country"') and "…" in left[20:]
    assert right == "… interim 2.1 s  anger? 0.70"
    # the final transcript closes that utterance's interim state; the other stays open
    r.render(ev(P.TRANSCRIPT, 5, utterance_id=0, text="done"))
    assert re.sub(r"\x1b\[[0-9;]*m", "", r.interim_line(79)) == "… interim 2.1 s  anger? 0.70"


def test_word_timings_wrap_between_words() -> None:
    many = [{"word": f"w{i}", "start_s": i * 0.5, "end_s": i * 0.5 + 0.4, "probability": 1.0} for i in range(12)]
    lines = word_timings(many, width=40)
    assert len(lines) > 1 and all(len(x) <= 40 and x.startswith("    ") for x in lines)
    assert not any(x.strip().startswith("·") for x in lines)
    assert " ".join(x.strip() for x in lines).split(" · ") == [f"{i * 0.5:.2f}–{i * 0.5 + 0.4:.2f} w{i}" for i in range(12)]


def test_printer_on_a_terminal_rewrites_the_interim_line_in_place() -> None:
    term = Terminal()
    p = Printer(printer_args(), term)
    evs = session(speaker="agent")
    for e in evs[:5]:  # up to the emotion.partial: the interim line is on screen, rewritten each time
        p(e)
    lines, current = term.screen()
    assert lines == ["● session s1 started"]
    assert current == '… interim agent 1.2 s  joy? 0.61  "And so fell"'
    assert term.getvalue().count(CLEAR_LINE) == 2  # the two earlier versions were erased
    assert "\x1b[2;3m" in term.getvalue()  # dim italic: provisional
    for e in evs[5:]:
        p(e)
    p.close()
    lines, current = term.screen()
    assert current == "" and not any("interim" in x for x in lines), lines
    assert lines[1].startswith("[00:00.0–00:01.5] agent joy") and lines[2] == "    0.00–0.76 And · 0.76–1.02 so · 1.02–1.40 fellow"
    assert lines[-2:] == ["● session s1 ended", "  timeline ■"]


def test_printer_elsewhere_prints_every_partial_as_a_line_and_jsonl_raw() -> None:
    out = io.StringIO()
    p = Printer(printer_args(colour=False), out)
    for e in session():
        p(e)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert [x for x in text.splitlines() if "interim" in x] == [
        '  … interim 0.8 s  "And so"', '  … interim 1.2 s  "And so fell"', '  … interim 1.2 s  joy? 0.61  "And so fell"']
    raw = io.StringIO()
    p = Printer(printer_args(jsonl=True), raw)
    for e in session():
        p(e)
    assert [json.loads(x) for x in raw.getvalue().splitlines()] == [e.data for e in session()]


# ---- the library: start flags, subscription URL, resume across partials ---------------------------
def test_start_message_and_subscription_url_carry_the_flags() -> None:
    plain = json.loads(StreamClient("ws://h:1").start_message.to_json())
    assert "interim" not in plain and "word_timestamps" not in plain
    both = json.loads(StreamClient("ws://h:1", interim=True, word_timestamps=True).start_message.to_json())
    assert both["interim"] is True and both["word_timestamps"] is True
    assert P.StartMessage.from_dict(both).interim and P.StartMessage.from_dict(both).word_timestamps
    assert Subscriber("ws://h:1/", "a b").url == "ws://h:1/v1/subscribe?session=a%20b"
    sub = Subscriber("ws://h:1", "s1", interim=True)
    assert sub.url == "ws://h:1/v1/subscribe?session=s1&interim=1" and sub._resume_url() == sub.url
    sub.last_seq["s1"] = 7  # e.g. a partial's seq
    assert sub._resume_url() == "ws://h:1/v1/subscribe?session=s1&interim=1&after_seq=7"
    every = Subscriber("ws://h:1", interim=True)
    every.last_seq["s1"] = 7
    assert every._resume_url() == "ws://h:1/v1/subscribe?session=*&interim=1"


def test_subscriber_resumes_after_a_partial_without_losing_or_repeating_finals() -> None:
    """A server that sends finals and partials, drops the connection right after a partial, and on
    the reconnect replays (like the real one) only the final events after `after_seq`."""
    from websockets.asyncio.server import serve

    finals = {0: P.SESSION_STARTED, 1: P.UTTERANCE_STARTED, 4: P.UTTERANCE_ENDED, 5: P.TRANSCRIPT, 6: P.EMOTION}
    partials = {2: P.TRANSCRIPT_PARTIAL, 3: P.TRANSCRIPT_PARTIAL}
    wire = lambda seq: json.dumps(P.event({**finals, **partials}[seq], "s1", seq, utterance_id=0))  # noqa: E731
    paths: list[str] = []

    async def handler(ws) -> None:
        paths.append(ws.request.path)
        if len(paths) == 1:
            for seq in (0, 1, 2, 3):
                await ws.send(wire(seq))
            await ws.close(1011, "simulated crash")
            return
        after = int(re.search(r"after_seq=(\d+)", ws.request.path).group(1))
        for seq in sorted(finals):
            if seq > after:
                await ws.send(wire(seq))
        await ws.wait_closed()

    async def go() -> list[tuple[int, str]]:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            got = []
            async for e in Subscriber(f"ws://127.0.0.1:{port}", session="s1", interim=True, backoff_s=0.01):
                got.append((e.seq, e.type))
                if e.type == P.EMOTION:
                    break
            return got

    got = asyncio.run(asyncio.wait_for(go(), 30))
    assert got == [(0, P.SESSION_STARTED), (1, P.UTTERANCE_STARTED), (2, P.TRANSCRIPT_PARTIAL), (3, P.TRANSCRIPT_PARTIAL),
                   (4, P.UTTERANCE_ENDED), (5, P.TRANSCRIPT), (6, P.EMOTION)]
    assert paths == ["/v1/subscribe?session=s1&interim=1", "/v1/subscribe?session=s1&interim=1&after_seq=3"]


# ---- the CLIs pass the flags through ------------------------------------------------------------
class FakeStreamClient:
    made: list[dict[str, Any]] = []

    def __init__(self, url: str, **kw: Any) -> None:
        FakeStreamClient.made.append(kw)

    async def __aenter__(self) -> "FakeStreamClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def fake_run_source(client: Any, chunks: Any, on_event: Any = None, stop_when: Any = None) -> list[Event]:
    return [ev(P.SESSION_ENDED, 0, utterances=0)]


@pytest.mark.parametrize("flags", [[], ["--interim"], ["--words"], ["--interim", "--words"]])
def test_file_cli_passes_interim_and_words(monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> None:
    import clients.file as cli

    FakeStreamClient.made = []
    monkeypatch.setattr(cli, "StreamClient", FakeStreamClient)
    monkeypatch.setattr(cli, "run_source", fake_run_source)
    assert cli.main([str(SPEECH / "LJ001-0008.wav"), "--fast", "--jsonl", *flags]) == 0
    (kw,) = FakeStreamClient.made
    assert kw["interim"] is ("--interim" in flags) and kw["word_timestamps"] is ("--words" in flags)


def test_mic_cli_passes_interim_and_words(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import clients.mic as cli

    class NoAudio:  # stands in for clients.mic.Capture: a device that yields nothing
        def __init__(self, device: Any, rate: int) -> None:
            pass

        def __enter__(self) -> NoAudio:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        async def chunks(self, stop: asyncio.Event):  # type: ignore[no-untyped-def]
            return
            yield

    FakeStreamClient.made = []
    monkeypatch.setattr(cli, "StreamClient", FakeStreamClient)
    monkeypatch.setattr(cli, "run_source", fake_run_source)
    monkeypatch.setattr(cli, "pick_rate", lambda device: 16_000)
    monkeypatch.setattr(cli, "Capture", NoAudio)
    assert cli.main(["--interim", "--words", "--jsonl"]) == 0
    assert FakeStreamClient.made[0]["interim"] is True and FakeStreamClient.made[0]["word_timestamps"] is True
    assert "with interim results and word timings" in capsys.readouterr().err
    args = cli.build_parser().parse_args([])
    assert args.interim is False and args.words is False


def test_subscribe_cli_passes_interim(monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.subscribe as cli

    made: list[dict[str, Any]] = []

    class FakeSubscriber:
        def __init__(self, url: str, **kw: Any) -> None:
            made.append(kw)

        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield ev(P.TRANSCRIPT_PARTIAL, 3, utterance_id=0, text="hi", audio_s=0.8)

    monkeypatch.setattr(cli, "Subscriber", FakeSubscriber)
    assert cli.main(["--interim", "--jsonl", "--once"]) == 0
    assert cli.main(["--jsonl", "--once"]) == 0
    assert [m["interim"] for m in made] == [True, False]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--words"])  # a watcher cannot ask for word timings: the source does


# ---- python -m streamer --------------------------------------------------------------------------
def test_streamer_format_event_for_partials_and_word_timings() -> None:
    from streamer.client import format_event

    lines = [format_event(e.data) for e in session()]
    assert lines[2] == "    #0 … interim transcript (0.8 s): 'And so'"
    assert lines[4] == "    #0 … interim emotion (1.2 s): JOY? 0.61 | speech 0.40 / text 0.60 | 'And so fell'"
    assert lines[6] == "    #0 transcript: 'And so fellow'\n        0.00–0.76 And · 0.76–1.02 so · 1.02–1.40 fellow"
    plain = [format_event(e.data) for e in session(words=False, interim=False)]
    assert plain[3] == "    #0 transcript: 'And so fellow'"  # unchanged without the flags


def test_streamer_console_rewrites_the_interim_line_on_a_terminal() -> None:
    from streamer.__main__ import _Printer, build_parser

    term = Terminal()
    show = _Printer(False, term)
    for e in session()[:5]:
        show(e.data)
    lines, current = term.screen()
    assert lines == ["session s1 started"] and current.startswith("    #0 … interim emotion (1.2 s): JOY?")
    for e in session()[5:]:
        show(e.data)
    lines, current = term.screen()
    assert current == "" and not any("interim" in x for x in lines)
    assert "    #0 transcript: 'And so fellow'" in lines and "        0.00–0.76 And · 0.76–1.02 so · 1.02–1.40 fellow" in lines
    piped = io.StringIO()
    show = _Printer(False, piped)
    for e in session():
        show(e.data)
    assert "\r" not in piped.getvalue() and piped.getvalue().count("… interim") == 3
    a = build_parser().parse_args(["--demo", "--interim", "--words"])
    assert a.interim and a.words
    a = build_parser().parse_args(["--mic"])
    assert not a.interim and not a.words


def test_streamer_mic_printer_subscribes_with_interim() -> None:
    from websockets.asyncio.server import serve

    from streamer.__main__ import _subscribe_and_print

    paths: list[str] = []

    async def handler(ws) -> None:
        paths.append(ws.request.path)
        await ws.close()

    async def go() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            await _subscribe_and_print(url, "mic", True, interim=True)
            await _subscribe_and_print(url, "mic", True)

    asyncio.run(asyncio.wait_for(go(), 30))
    assert paths == ["/v1/subscribe?session=mic&interim=1", "/v1/subscribe?session=mic"]


def test_streamer_console_interim_line_fits_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from streamer.__main__ import _Printer

    monkeypatch.setattr("shutil.get_terminal_size", lambda *a: os.terminal_size((60, 24)))
    term = Terminal()
    show = _Printer(False, term)
    long = "ask not what your country can do for you ask what you can do for your country"
    show(P.event(P.TRANSCRIPT_PARTIAL, "s", 1, utterance_id=3, text=long, audio_s=4.0))
    current = term.screen()[1]
    assert len(current) == 59 and current.startswith("    #3 … interim transcript (4.0 s): …")
    assert current.endswith(" do for your country'")
    show(P.event(P.EMOTION_PARTIAL, "s", 2, utterance_id=3, label="joy", scores=SCORES, modality_weights=WEIGHTS,
                 text=long, audio_s=4.0))
    current = term.screen()[1]
    assert len(current) == 59 and current.startswith("    #3 … interim emotion (4.0 s): JOY? 0.61 | speech 0.40")
