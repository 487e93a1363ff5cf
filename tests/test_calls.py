"""Live call monitoring end to end on port 0: a simulated Twilio Media Streams client sending
μ-law real speech at real-time pace on two tracks, a stereo call recording through clients.file,
alert rules firing and not firing, a webhook received by a local HTTP server, call summaries."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.config import CallsConfig
from streamer.calls.telephony import media_message, mulaw_encode
from tests.stream_util import (StubAsr, app_config, emotion_model, load, recv_until, served, wer,  # noqa: F401
                               whisper)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


class Webhook:
    """A local HTTP server collecting POSTed JSON bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.got = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.got:
                    outer.bodies.append(body)
                    outer.got.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait_for(self, type_: str, timeout: float = 60) -> dict:
        with self.got:
            ok = self.got.wait_for(lambda: any(b["type"] == type_ for b in self.bodies), timeout)
        assert ok, f"no {type_} webhook within {timeout} s: {self.bodies}"
        return next(b for b in self.bodies if b["type"] == type_)


@pytest.fixture()
def webhook():
    hook = Webhook()
    yield hook
    hook.httpd.shutdown()


def rules_file(tmp_path: Path) -> Path:
    """One rule that must fire (any emotion at all, for the customer) and one that must not
    (anger >= 0.99: the untrained tiny test model spreads its probability ~evenly)."""
    f = tmp_path / "rules.json"
    f.write_text(json.dumps({"rules": [
        {"name": "customer-spoke", "speaker": "customer", "labels": list(P_LABELS), "aggregate": "sum",
         "threshold": 0.99, "count": 1, "window": 1, "severity": "info"},
        {"name": "furious-customer", "speaker": "customer", "labels": ["anger"], "threshold": 0.99, "count": 1, "window": 1},
    ]}))
    return f


P_LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def calls_app(model, asr, tmp_path: Path, hook: Webhook):
    from streamer.server import create_app

    calls = CallsConfig(alert_rules=rules_file(tmp_path), webhook_url=hook.url, summaries_dir=tmp_path / "summaries")
    return create_app(replace(app_config(), calls=calls), model=model, asr=asr)


def check_call(events: list[dict], speakers: set[str]) -> None:
    assert events[0]["type"] == P.SESSION_STARTED and events[-1]["type"] == P.SESSION_ENDED
    seqs = [e["seq"] for e in events]
    assert all(b > a for a, b in zip(seqs, seqs[1:]))
    ended = {e["utterance_id"]: e["speaker"] for e in events if e["type"] == P.UTTERANCE_ENDED}
    emotions = {e["utterance_id"]: e["speaker"] for e in events if e["type"] == P.EMOTION}
    assert ended == emotions and set(ended.values()) == speakers, (ended, emotions)
    for e in events:
        if e["type"] in (P.UTTERANCE_STARTED, P.UTTERANCE_ENDED, P.TRANSCRIPT, P.EMOTION):
            assert e["speaker"] in speakers and e["channel"] in (0, 1)


def turns(first: np.ndarray, second: np.ndarray, sr: int, tail: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Two channels of one conversation: `first` speaks, a pause, then `second` answers."""
    gap = np.zeros(int(0.8 * sr), np.float32)
    end = np.zeros(int(tail * sr), np.float32)
    a = np.concatenate([gap, first, gap, np.zeros(len(second), np.float32), end])
    b = np.concatenate([gap, np.zeros(len(first), np.float32), gap, second, end])
    return a, b


def said(events: list[dict], speaker: str) -> str:
    return " ".join(e["text"] for e in events if e["type"] == P.TRANSCRIPT and e["speaker"] == speaker)


async def twilio_call(app, call_sid: str, inbound: np.ndarray, outbound: np.ndarray) -> list[dict]:  # type: ignore[no-untyped-def]
    """Start `app`, run one call through /v1/twilio at real-time pace (both tracks) watched on
    /v1/subscribe, shut the app down; the watcher's events."""
    await app.start()
    try:
        return await _call(app, call_sid, inbound, outbound)
    finally:
        await asyncio.wait_for(app.shutdown(), 60)


async def _call(app, call_sid: str, inbound: np.ndarray, outbound: np.ndarray) -> list[dict]:  # type: ignore[no-untyped-def]
    async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session={call_sid}") as watcher, \
            connect(f"{app.url}{P.TWILIO_PATH}") as twilio:
        await twilio.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await twilio.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
            "streamSid": "MZ1", "accountSid": "AC1", "callSid": call_sid, "tracks": ["inbound", "outbound"],
            "customParameters": {"queue": "billing"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        t0, n = time.monotonic(), 160  # Twilio sends 20 ms (160 μ-law bytes) per message and track
        for k, i in enumerate(range(0, len(inbound), n)):
            delay = t0 + k * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # real-time pacing, as a phone call arrives
            for track, audio in (("inbound", inbound), ("outbound", outbound)):
                await twilio.send(json.dumps(media_message("MZ1", track, k, k * 20, mulaw_encode(audio[i:i + n]))))
        await twilio.send(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": "end"}}))
        await twilio.send(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"callSid": call_sid}}))
        return await recv_until(watcher, P.SESSION_ENDED, timeout=120)


def test_twilio_media_stream_two_speakers_alerts_webhook_summary(emotion_model, whisper, transcripts, tmp_path, webhook):  # noqa: F811
    customer = load("LJ001-0004.wav", sr=8000)  # the caller, first
    agent = load("LJ001-0008.wav", sr=8000)  # then the agent answers
    inbound, outbound = turns(customer, agent, 8000, tail=1.6)
    call_sid = "CA" + "0" * 30 + "1"
    events = asyncio.run(twilio_call(calls_app(emotion_model, whisper, tmp_path, webhook), call_sid, inbound, outbound))
    check_call(events, {"customer", "agent"})
    assert events[0]["session_id"] == call_sid and events[0]["metadata"]["queue"] == "billing"
    assert wer(transcripts["LJ001-0004.wav"], said(events, "customer")) <= 0.3, said(events, "customer")
    assert wer(transcripts["LJ001-0008.wav"], said(events, "agent")) <= 0.3, said(events, "agent")
    first = {e["speaker"]: e["seq"] for e in reversed([e for e in events if e["type"] == P.EMOTION])}
    assert first["customer"] < first["agent"], "both sides share one dialogue, in turn order"

    alerts = [e for e in events if e["type"] == P.ALERT]
    assert [a["rule"] for a in alerts] == ["customer-spoke"], "the rule that must fire did, the other did not"
    assert alerts[0]["speaker"] == "customer"
    summary = next(e for e in events if e["type"] == P.CALL_SUMMARY)
    assert set(summary["speakers"]) == {"customer", "agent"} and summary["alerts"][0]["rule"] == "customer-spoke"
    assert summary["speakers"]["customer"]["timeline"][0]["text"]
    assert json.loads((tmp_path / "summaries" / f"{call_sid}.json").read_text())["session_id"] == call_sid
    assert webhook.wait_for(P.ALERT)["rule"] == "customer-spoke"
    assert webhook.wait_for(P.CALL_SUMMARY)["session_id"] == call_sid


def test_score_sides_customer_transcribes_the_agent_without_scoring_it(emotion_model, whisper, transcripts, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    """--score-sides customer (EU AI Act art. 5(1)(f)): the agent's track is transcribed, and its words
    are the customer's context, but it gets no emotion, revision, sentiment, alert or summary entry,
    and the model never computes a feature of the agent's voice or words."""
    encoded: list[str] = []
    real = emotion_model.encode_utterances

    def spy(texts, audios, **kw):  # type: ignore[no-untyped-def]
        encoded.extend(texts)
        return real(texts, audios, **kw)

    monkeypatch.setattr(emotion_model, "encode_utterances", spy)
    from streamer.__main__ import build_parser, config_from_args
    from streamer.server import create_app

    assert config_from_args(build_parser().parse_args(["--score-sides", "customer"])).calls.score_sides == ("customer",)
    assert config_from_args(build_parser().parse_args([])).calls.score_sides == ()
    inbound, outbound = turns(load("LJ001-0004.wav", sr=8000), load("LJ001-0008.wav", sr=8000), 8000, tail=1.6)
    call_sid = "CA" + "0" * 30 + "2"
    calls = CallsConfig(alert_rules=rules_file(tmp_path), score_sides=("customer",))
    app = create_app(replace(app_config(), calls=calls), model=emotion_model, asr=whisper)
    events = asyncio.run(twilio_call(app, call_sid, inbound, outbound))
    scored = [e for e in events if e["type"] in (P.EMOTION, P.EMOTION_REVISED, P.EMOTION_PARTIAL, P.ALERT)]
    assert scored and {e["speaker"] for e in scored} == {"customer"}
    assert wer(transcripts["LJ001-0008.wav"], said(events, "agent")) <= 0.3, "the agent is still transcribed"
    assert {e["speaker"] for e in events if e["type"] == P.UTTERANCE_ENDED} == {"customer", "agent"}
    summary = next(e for e in events if e["type"] == P.CALL_SUMMARY)
    assert set(summary["speakers"]) == {"customer"}
    agent = {e["text"] for e in events if e["type"] == P.TRANSCRIPT and e["speaker"] == "agent"}
    customer = {e["text"] for e in events if e["type"] == P.TRANSCRIPT and e["speaker"] == "customer"}
    assert agent and customer <= set(encoded) and not agent & set(encoded), (agent, encoded)


def test_stereo_call_recording_through_clients_file(emotion_model, whisper, transcripts, tmp_path, webhook):  # noqa: F811
    left, right = turns(load("LJ001-0002.wav"), load("LJ001-0006.wav"), 16000)  # agent left, customer right
    wav = tmp_path / "call.wav"
    sf.write(wav, np.stack([left, right], axis=1), 16000, subtype="PCM_16")

    async def go() -> subprocess.CompletedProcess:
        app = calls_app(emotion_model, whisper, tmp_path, webhook)
        await app.start()
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "clients.file", str(wav), "--speakers", "agent,customer", "--fast", "--jsonl",
                "--url", app.url, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 180)
            return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())
        finally:
            await asyncio.wait_for(app.shutdown(), 60)

    res = asyncio.run(go())
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    check_call(events, {"agent", "customer"})
    assert wer(transcripts["LJ001-0002.wav"], said(events, "agent")) <= 0.3
    assert wer(transcripts["LJ001-0006.wav"], said(events, "customer")) <= 0.3
    assert [a["rule"] for a in events if a["type"] == P.ALERT] == ["customer-spoke"]


def test_bad_twilio_messages_do_not_take_the_call_down(emotion_model, whisper, tmp_path, webhook):  # noqa: F811
    async def go() -> list[dict]:
        app = calls_app(emotion_model, whisper, tmp_path, webhook)
        await app.start()
        try:
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=CAbad") as watcher, \
                    connect(f"{app.url}{P.TWILIO_PATH}") as twilio:
                await twilio.send(json.dumps({"event": "start", "start": {
                    "streamSid": "MZ2", "callSid": "CAbad", "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
                await twilio.send("not json")
                await twilio.send(json.dumps({"event": "media", "media": {"payload": "%%%", "track": "inbound"}}))
                await twilio.send(json.dumps({"event": "teleport"}))
                speech = load("LJ001-0008.wav", sr=8000)
                for k, i in enumerate(range(0, len(speech) + 8000, 160)):
                    chunk = np.zeros(160, np.float32) if i >= len(speech) else speech[i:i + 160]
                    await twilio.send(json.dumps(media_message("MZ2", "inbound", k, k * 20, mulaw_encode(chunk))))
                await twilio.send(json.dumps({"event": "stop"}))
                return await recv_until(watcher, P.SESSION_ENDED, timeout=120)
        finally:
            await asyncio.wait_for(app.shutdown(), 60)

    events = asyncio.run(go())
    errors = [e for e in events if e["type"] == P.ERROR]
    assert len(errors) == 3, errors
    assert any(e["type"] == P.EMOTION and e["speaker"] == "customer" for e in events), "the call went on"


def test_streamer_cli_stereo_file_with_alerts_and_summaries(tiny_checkpoint, transcripts, tmp_path):
    left, right = turns(load("LJ001-0002.wav"), load("LJ001-0008.wav"), 16000)
    wav = tmp_path / "call.wav"
    sf.write(wav, np.stack([left, right], axis=1), 16000, subtype="PCM_16")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "streamer", "--file", str(wav), "--speakers", "agent,customer", "--fast",
                          "--json", "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                          "--alert-rules", str(rules_file(tmp_path)), "--summaries", str(tmp_path / "sums")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    check_call(events, {"agent", "customer"})
    assert wer(transcripts["LJ001-0008.wav"], said(events, "customer")) <= 0.3
    assert [e["rule"] for e in events if e["type"] == P.ALERT] == ["customer-spoke"]
    (summary,) = [json.loads(p.read_text()) for p in (tmp_path / "sums").glob("*.json")]
    assert set(summary["speakers"]) == {"agent", "customer"} and summary["session_id"] == events[0]["session_id"]
    bad = subprocess.run([sys.executable, "-m", "streamer", "--file", str(SPEECH_MONO), "--speakers", "agent,customer",
                          "--checkpoint", str(tiny_checkpoint)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "1 channel(s); 2 speakers" in bad.stderr


SPEECH_MONO = Path(__file__).resolve().parent / "fixtures" / "speech" / "LJ001-0002.wav"


def test_a_call_past_capacity_is_refused_like_any_session(emotion_model) -> None:  # noqa: F811
    """/v1/twilio goes through the same admission as /v1/stream: with max_sessions live, a new
    call's stream is closed with 1013 and no session is created for it."""
    async def go() -> tuple[int | None, str, list[str]]:
        async with served(emotion_model, StubAsr(), max_sessions=1) as app:
            async with connect(f"{app.url}{P.STREAM_PATH}") as source:
                await source.send(json.dumps({"type": "start", "sample_rate": 16000, "session_id": "first"}))
                await recv_until(source, P.SESSION_STARTED)
                async with connect(f"{app.url}{P.TWILIO_PATH}") as twilio:
                    await twilio.send(json.dumps({"event": "start", "start": {
                        "streamSid": "MZ3", "callSid": "CAfull", "tracks": ["inbound"],
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
                    await asyncio.wait_for(twilio.wait_closed(), 30)
                    return twilio.close_code, twilio.close_reason or "", sorted(app.sessions)

    code, reason, live = asyncio.run(go())
    assert (code, reason) == (P.CLOSE_TRY_AGAIN, "too many sessions")
    assert live == ["first"]
