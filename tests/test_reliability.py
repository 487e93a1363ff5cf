"""Reliability and security over real sockets on port 0: tokens and roles, origins, TLS, limits,
resume without loss (subscribers and sources, exactly once), and faults that stay contained."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.routes import auth
from streamer import protocol as P
from streamer.client import stream_audio, to_pcm16
from tests.stream_util import (StubAsr, WAIT_S, app_config, check_session_events, emotion_model, load, recv_json,  # noqa: F401
                               recv_until, wer, whisper)

pytestmark = pytest.mark.slow
TOKENS = (("src-token-123", ("source",)), ("sub-token-456", ("subscriber",)), ("admin-token-789", ("admin",)))


@asynccontextmanager
async def serving(model, asr, *, auth_cfg: auth.AuthConfig | None = None, **server):  # type: ignore[no-untyped-def]
    from streamer.server import create_app

    cfg = app_config(**server)
    if auth_cfg is not None:
        cfg = replace(cfg, auth=auth_cfg)
    app = create_app(cfg, model=model, asr=asr)
    await app.start()
    try:
        yield app
    finally:
        await asyncio.wait_for(app.shutdown(), WAIT_S)


def http_status(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10, context=context) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def refused_status(url: str, **kw) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidStatus) as e:
        async with connect(url, **kw):
            pass
    return e.value.response.status_code


# ---- auth ------------------------------------------------------------------------------------
def test_tokens_roles_and_origins(emotion_model, whisper, transcripts):  # noqa: F811
    cfg = auth.AuthConfig(tokens=TOKENS, allowed_origins=("https://ops.example.com",))

    async def go() -> dict:
        async with serving(emotion_model, whisper, auth_cfg=cfg) as app:
            u, http = app.url, f"http://127.0.0.1:{app.port}"
            out = {
                "no_token": await refused_status(u + P.STREAM_PATH),
                "bad_token": await refused_status(u + P.STREAM_PATH, additional_headers={"Authorization": "Bearer nope-nope"}),
                "wrong_role": await refused_status(u + P.SUBSCRIBE_PATH + "?session=*", additional_headers={
                    "Authorization": "Bearer src-token-123"}),
                "bad_origin": await refused_status(u + P.SUBSCRIBE_PATH + "?token=sub-token-456", origin="https://evil.example"),
                "health": await asyncio.to_thread(http_status, http + P.HEALTH_PATH),
                "page": await asyncio.to_thread(http_status, http + "/"),
                "metrics_no_token": await asyncio.to_thread(http_status, http + P.METRICS_PATH),
                "metrics_sub": await asyncio.to_thread(http_status, http + P.METRICS_PATH, {"Authorization": "Bearer sub-token-456"}),
                "metrics_admin": await asyncio.to_thread(http_status, http + P.METRICS_PATH, {"Authorization": "Bearer admin-token-789"}),
            }
            # accepted: a subscriber by query token from the allowed origin, a source by bearer header
            async with connect(u + P.SUBSCRIBE_PATH + "?session=auth-1&token=sub-token-456",
                               origin="https://ops.example.com") as sub:
                result = await stream_audio(u, load("LJ001-0008.wav"), realtime=False, session_id="auth-1",
                                            token="src-token-123")
                out["watched"] = await recv_until(sub, P.SESSION_ENDED)
            out["source"] = result.events
            return out

    out = asyncio.run(go())
    assert (out["no_token"], out["bad_token"], out["wrong_role"], out["bad_origin"]) == (401, 401, 403, 403)
    assert (out["health"], out["page"]) == (200, 200)
    assert (out["metrics_no_token"], out["metrics_sub"], out["metrics_admin"]) == (401, 403, 200)
    check_session_events(out["source"])
    assert [e["seq"] for e in out["watched"]] == [e["seq"] for e in out["source"]]
    text = " ".join(e["text"] for e in out["source"] if e["type"] == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0008.wav"], text) <= 0.3


def test_twilio_token_travels_as_a_custom_parameter(emotion_model, whisper):  # noqa: F811
    cfg = auth.AuthConfig(tokens=TOKENS)
    start = {"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA-auth", "tracks": ["inbound"],
                                         "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

    async def go() -> tuple[int | None, dict]:
        async with serving(emotion_model, whisper, auth_cfg=cfg) as app:
            async with connect(app.url + P.TWILIO_PATH) as tw:  # no token: refused at start, before audio
                await tw.send(json.dumps(start))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(tw.recv(), WAIT_S)
                refused = tw.close_code
            ok = json.loads(json.dumps(start))
            ok["start"]["customParameters"] = {"token": "src-token-123", "queue": "vip"}
            async with connect(app.url + P.SUBSCRIBE_PATH + "?session=CA-auth&token=sub-token-456") as sub, \
                    connect(app.url + P.TWILIO_PATH) as tw:
                await tw.send(json.dumps(ok))
                started = await recv_json(sub)
                await tw.send(json.dumps({"event": "stop"}))
            return refused, started

    refused, started = asyncio.run(go())
    assert refused == P.CLOSE_POLICY
    assert started["type"] == P.SESSION_STARTED and started["metadata"]["queue"] == "vip"
    assert "token" not in started["metadata"], "the token is never published"


def test_tls_with_a_certificate_generated_here(emotion_model, whisper, tmp_path):  # noqa: F811
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # verified against the generated certificate
    cfg = auth.AuthConfig(tokens=TOKENS, certfile=cert, keyfile=key)

    async def go() -> tuple[str, list[dict], int]:
        async with serving(emotion_model, whisper, auth_cfg=cfg) as app:
            async with connect(app.url + P.STREAM_PATH, ssl=client_ctx,
                               additional_headers={"Authorization": "Bearer src-token-123"}) as ws:
                await ws.send(P.StartMessage(session_id="tls-1").to_json())
                await ws.send(to_pcm16(load("LJ001-0002.wav")))
                await ws.send(P.STOP_MESSAGE)
                events = await recv_until(ws, P.SESSION_ENDED)
            status = await asyncio.to_thread(http_status, f"https://127.0.0.1:{app.port}{P.HEALTH_PATH}", None, client_ctx)
            return app.url, events, status

    url, events, status = asyncio.run(go())
    assert url.startswith("wss://") and status == 200
    check_session_events(events)


def test_loud_warning_without_tokens_on_a_public_bind(emotion_model, whisper, caplog):  # noqa: F811
    async def go(host: str) -> None:
        async with serving(emotion_model, whisper, host=host):
            pass

    with caplog.at_level(logging.WARNING, logger="streamer"):
        asyncio.run(go("127.0.0.1"))
        assert "SECURITY" not in caplog.text
        asyncio.run(go("0.0.0.0"))
    assert "SECURITY" in caplog.text and "without API tokens" in caplog.text


def test_token_file_and_bad_configs(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# ops\nsrc-token-123 source\nwatch-token-1 subscriber,source  # both\n")
    assert auth.load_token_file(f) == [("src-token-123", ("source",)), ("watch-token-1", ("subscriber", "source"))]
    with pytest.raises(ValueError, match="roles"):
        auth.AuthConfig(tokens=(("long-enough-token", ("root",)),))
    with pytest.raises(ValueError, match="8 characters"):
        auth.AuthConfig(tokens=(("short", ("admin",)),))
    with pytest.raises(ValueError, match="both"):
        auth.AuthConfig(certfile=Path("c.pem"))


# ---- limits ----------------------------------------------------------------------------------------
def test_limits_give_clear_errors(emotion_model, whisper):  # noqa: F811
    speech = load("LJ001-0004.wav")

    async def go() -> dict:
        out = {}
        async with serving(emotion_model, whisper, idle_timeout_s=0.5, max_session_s=2.0, max_subscribers=1,
                           max_realtime_factor=4.0, realtime_burst_s=1.0, resume_grace_s=0) as app:
            async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*") as first:
                with pytest.raises(ConnectionClosed):  # the second subscriber is over the limit
                    async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*") as second:
                        await asyncio.wait_for(second.recv(), WAIT_S)
                out["subscriber_close"] = second.close_code
                await first.close()
            async with connect(app.url + P.STREAM_PATH) as ws:  # idle: start, then nothing
                await ws.send(P.StartMessage(session_id="idle").to_json())
                out["idle"] = await recv_until(ws, P.SESSION_ENDED)
            async with connect(app.url + P.STREAM_PATH) as ws:  # too long, and faster than 4x real time
                await ws.send(P.StartMessage(session_id="long").to_json())
                pcm = to_pcm16(speech)
                try:
                    for i in range(0, len(pcm), 3200):
                        await ws.send(pcm[i:i + 3200])
                except ConnectionClosed:
                    pass
                out["long"] = await recv_until(ws, P.SESSION_ENDED)
            out["throttled"] = app.metrics.value("emostream_throttled_total")
        return out

    out = asyncio.run(go())
    assert out["subscriber_close"] == P.CLOSE_TRY_AGAIN
    assert [e["code"] for e in out["idle"] if e["type"] == P.ERROR] == [P.E_IDLE_TIMEOUT]
    assert [e["code"] for e in out["long"] if e["type"] == P.ERROR] == [P.E_SESSION_TOO_LONG]
    ended = [e for e in out["long"] if e["type"] == P.UTTERANCE_ENDED]
    assert ended and ended[-1]["end_s"] <= 2.5, "audio after the limit is not processed"
    assert out["throttled"] > 0, "audio sent faster than 4x real time was slowed down"


def test_max_subscribers_counts_subscribers_not_sources(emotion_model, whisper):  # noqa: F811
    """Open source sessions register their own sockets in the fan-out; they must not use up the
    subscriber limit: with max_subscribers=1 and two sessions streaming, one subscriber is admitted
    (it gets the sessions' ends), the next is refused."""
    async def go() -> tuple[list[str], int | None]:
        async with serving(emotion_model, whisper, max_subscribers=1) as app:
            async with connect(app.url + P.STREAM_PATH) as a, connect(app.url + P.STREAM_PATH) as b:
                for ws, sid in ((a, "a"), (b, "b")):
                    await ws.send(P.StartMessage(session_id=sid).to_json())
                    await recv_until(ws, P.SESSION_STARTED)
                async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*") as sub:
                    with pytest.raises(ConnectionClosed):  # the second subscriber is over the limit
                        async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*") as second:
                            await asyncio.wait_for(second.recv(), WAIT_S)
                    for ws in (a, b):
                        await ws.send(P.STOP_MESSAGE)
                        await recv_until(ws, P.SESSION_ENDED)
                    got: list[str] = []
                    while got.count(P.SESSION_ENDED) < 2:
                        got.append(json.loads(await asyncio.wait_for(sub.recv(), WAIT_S))["type"])
                return got, second.close_code

    got, refused = asyncio.run(go())
    assert got.count(P.SESSION_ENDED) == 2
    assert refused == P.CLOSE_TRY_AGAIN


# ---- resume without loss ------------------------------------------------------------------------------
def test_subscriber_resumes_exactly_once(emotion_model, whisper):  # noqa: F811
    async def go() -> tuple[list[dict], list[dict], list[dict], list[dict]]:
        async with serving(emotion_model, whisper) as app:
            sid = "resume-sub"
            sub = await connect(f"{app.url}{P.SUBSCRIBE_PATH}?session={sid}")
            source = asyncio.create_task(stream_audio(app.url, np.concatenate([load("LJ001-0002.wav"), np.zeros(8000, np.float32),
                                                                               load("LJ001-0008.wav")]),
                                                      realtime=True, session_id=sid))
            first = await recv_until(sub, P.TRANSCRIPT)  # part of the session, then the subscriber drops
            sub.transport.abort()
            result = await source
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session={sid}&after_seq={first[-1]['seq']}") as again:
                rest = await recv_until(again, P.SESSION_ENDED)
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session={sid}&after_seq=-1") as whole:
                everything = await recv_until(whole, P.SESSION_ENDED)
            return first, rest, result.events, everything

    first, rest, source, everything = asyncio.run(go())
    seqs = [e["seq"] for e in first + rest]
    assert seqs == [e["seq"] for e in source] == [e["seq"] for e in everything], "every event exactly once"
    assert first + rest == source


def test_source_drop_and_resume_loses_nothing(emotion_model, whisper, transcripts):  # noqa: F811
    a, b = load("LJ001-0002.wav"), load("LJ001-0008.wav")
    pause = np.zeros(16000, np.float32)

    async def go() -> tuple[list[dict], list[dict]]:
        async with serving(emotion_model, whisper, resume_grace_s=30) as app:
            sid = "resume-src"
            ws = await connect(app.url + P.STREAM_PATH)
            await ws.send(P.StartMessage(session_id=sid).to_json())
            await ws.send(to_pcm16(np.concatenate([a, pause])))
            before = await recv_until(ws, P.EMOTION)
            ws.transport.abort()  # the network drops: no stop
            async with connect(app.url + P.STREAM_PATH) as ws2:
                await ws2.send(json.dumps({"type": "start", "sample_rate": 16000, "session_id": sid,
                                           "after_seq": before[-1]["seq"]}))
                await ws2.send(to_pcm16(np.concatenate([b, pause])))
                await ws2.send(P.STOP_MESSAGE)
                after = await recv_until(ws2, P.SESSION_ENDED)
            return before, after

    before, after = asyncio.run(go())
    events = before + after
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[-1] + 1)), "gap-free, no repeats"
    assert any(e["type"] == P.SESSION_RESUMED for e in after)
    said = " ".join(e["text"] for e in events if e["type"] == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0002.wav"] + " " + transcripts["LJ001-0008.wav"], said) <= 0.3, said
    assert after[-1]["type"] == P.SESSION_ENDED and after[-1]["utterances"] == 2


def test_resume_requests_are_validated(emotion_model, whisper):  # noqa: F811
    async def go() -> tuple[dict, dict, int | None]:
        async with serving(emotion_model, whisper) as app:
            async with connect(app.url + P.STREAM_PATH) as ws:  # after_seq without a session_id
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "after_seq": 3}))
                bad_start = await recv_json(ws)
            async with connect(app.url + P.STREAM_PATH) as live, connect(app.url + P.STREAM_PATH) as thief:
                await live.send(P.StartMessage(session_id="taken").to_json())
                await recv_json(live)
                await thief.send(json.dumps({"type": "start", "sample_rate": 16000, "session_id": "taken", "after_seq": 0}))
                stolen = await recv_json(thief)
                await live.send(P.STOP_MESSAGE)
            async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*&after_seq=3") as sub:
                err = await recv_json(sub)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(sub.recv(), WAIT_S)
            return bad_start, stolen, err, sub.close_code

    bad_start, stolen, err, code = asyncio.run(go())
    assert bad_start["code"] == P.E_BAD_START
    assert stolen["code"] == P.E_SESSION_EXISTS, "a live (attached) session cannot be taken over"
    assert err["code"] == P.E_BAD_REQUEST and code == P.CLOSE_POLICY


# ---- faults ------------------------------------------------------------------------------------------
class FlakyAsr(StubAsr):
    """Real Whisper, except that it raises for any batch containing a poisoned utterance."""

    def __init__(self, real, poison_len: int) -> None:
        self.real, self.poison_len, self.calls = real, poison_len, 0

    def transcribe(self, audios, words=None, redecode=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        if any(abs(len(a) - self.poison_len) < 16000 * 0.6 for a in audios):
            raise RuntimeError("simulated ASR crash")
        return self.real.transcribe(audios)


def test_asr_failure_on_one_utterance_is_contained(emotion_model, whisper, transcripts):  # noqa: F811
    bad = np.concatenate([np.zeros(8000, np.float32), load("LJ001-0006.wav")])  # ~4.9 s: poisoned
    good = load("LJ001-0008.wav")  # ~1.8 s
    flaky = FlakyAsr(whisper, poison_len=len(load("LJ001-0006.wav")))

    async def go() -> tuple[list[dict], list[dict]]:
        async with serving(emotion_model, flaky) as app:
            r1, r2 = await asyncio.gather(
                stream_audio(app.url, np.concatenate([bad, np.zeros(16000, np.float32), good]), realtime=False, session_id="flaky"),
                stream_audio(app.url, good, realtime=False, session_id="healthy"))
            return r1.events, r2.events

    flaky_events, healthy = asyncio.run(go())
    errors = [e for e in flaky_events if e["type"] == P.ERROR]
    assert len(errors) == 1 and errors[0]["code"] == P.E_INTERNAL and "simulated ASR crash" in errors[0]["message"]
    assert any(e["type"] == P.EMOTION for e in flaky_events), "the session went on after the failed utterance"
    assert flaky_events[-1]["type"] == P.SESSION_ENDED
    check_session_events(healthy)
    text = " ".join(e["text"] for e in healthy if e["type"] == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0008.wav"], text) <= 0.3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated death
def test_dead_inference_worker_is_restarted(emotion_model, whisper):  # noqa: F811
    async def go() -> tuple[list[dict], list[dict], int]:
        async with serving(emotion_model, whisper) as app:
            engine = app.engine
            real = engine._process
            state = {"killed": False}

            def dying(batch):  # type: ignore[no-untyped-def]
                if not state["killed"]:
                    state["killed"] = True
                    raise SystemExit("simulated worker death")  # a BaseException ends the thread
                return real(batch)

            engine._process = dying
            first = await stream_audio(app.url, load("LJ001-0002.wav"), realtime=False, session_id="w1")
            second = await stream_audio(app.url, load("LJ001-0008.wav"), realtime=False, session_id="w2")
            return first.events, second.events, engine.restarts

    first, second, restarts = asyncio.run(go())
    assert any(e["type"] == P.ERROR and "worker" in e["message"] for e in first), "the dying batch failed visibly"
    assert first[-1]["type"] == P.SESSION_ENDED, "the session still ended"
    assert restarts >= 1
    check_session_events(second)


def test_resume_after_a_restart_comes_from_the_durable_log(emotion_model, whisper, tmp_path):  # noqa: F811
    from streamer.config import StoreConfig
    from streamer.server import create_app

    async def go() -> tuple[list[dict], list[dict]]:
        cfg = replace(app_config(), store=StoreConfig(path=tmp_path / "events.db"))
        app = create_app(cfg, model=emotion_model, asr=whisper)
        await app.start()
        try:
            result = await stream_audio(app.url, load("LJ001-0008.wav"), realtime=False, session_id="durable-1")
        finally:
            await app.shutdown()
        again = create_app(cfg, model=emotion_model, asr=whisper)  # a new process would look the same
        await again.start()
        try:
            async with connect(f"{again.url}{P.SUBSCRIBE_PATH}?session=durable-1&after_seq=2") as sub:
                replayed = await recv_until(sub, P.SESSION_ENDED)
                with pytest.raises(ConnectionClosed):  # the session is over: the subscription ends
                    await asyncio.wait_for(sub.recv(), WAIT_S)
        finally:
            await again.shutdown()
        return result.events, replayed

    source, replayed = asyncio.run(go())
    assert replayed == [e for e in source if e["seq"] > 2]
