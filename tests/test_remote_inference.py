"""Remote inference (--inference): service instances without Whisper or the text encoder, a real
`python -m streamer.infer.worker` process and a real Redis (Debian's redis-server on a private unix socket).
Transcripts and emotions of real speech match the in-process engine; a killed worker costs one
utterance an error event (the session and the service go on); a job a worker took and never
acknowledged is taken over by another worker (XAUTOCLAIM). Admission and /healthz follow the
workers' heartbeats: no worker alive, Redis unreachable or a queue deeper than the workers can clear
refuses new sessions (`overloaded`, close 1013), and the first two make /healthz `degraded`. Plus
the head-only checkpoint loader."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio
from streamer.config import InferenceConfig, WorkerConfig
from tests.stream_util import (WAIT_S, app_config, check_session_events, emotion_model, load,  # noqa: F401
                               scraped, wer, whisper)
from tests.test_bus import redis_server  # noqa: F401

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


# ---- helpers ----------------------------------------------------------------------------------
@contextmanager
def worker_process(url: str, checkpoint: Path, log: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m streamer.infer.worker` on the tiny checkpoint; yields once it printed 'ready' (bounded)."""
    err = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer.infer.worker", "--bus", url, "--checkpoint", str(checkpoint), "--device", "cpu",
         "--torch-threads", "1", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"worker not ready within {WAIT_S} s: {log.read_text()}") from None
        assert "ready" in line, (line, log.read_text())
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        err.close()


@asynccontextmanager
async def front_end(checkpoint: Path, url: str, **inference: Any) -> AsyncIterator[Any]:
    """A service instance on port 0 in --inference mode: it loads the checkpoint's head only."""
    from streamer.server import create_app

    base = app_config(checkpoint)
    cfg = replace(base, inference=replace(base.inference, remote=url, **inference))
    app = create_app(cfg)
    await app.start()
    try:
        yield app
    finally:
        await asyncio.wait_for(app.shutdown(), WAIT_S)


def fake_worker(url: str, name: str = "fake-worker", ttl_s: float = WAIT_S, **load: Any) -> None:
    """The heartbeat a worker writes (WorkerLoad fields in `load`), for a worker that takes no jobs:
    front-ends count it alive for `ttl_s`."""
    import redis

    from streamer.infer.remote import WORKER_INDEX, WorkerLoad, encode_heartbeat, heartbeat_key

    client = redis.Redis.from_url(url)
    client.set(heartbeat_key(name), encode_heartbeat(WorkerLoad(name, ttl_s=ttl_s, **load)), px=int(ttl_s * 1000))
    client.sadd(WORKER_INDEX, name)


async def healthz(app: Any) -> dict[str, Any]:
    """GET /healthz over HTTP (so the answer is shown to be plain JSON)."""

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.port}{P.HEALTH_PATH}", timeout=WAIT_S) as r:
            assert r.status == 200
            return json.loads(r.read())

    return await asyncio.to_thread(get)


async def healthz_until(app: Any, pred: Any, what: str) -> dict[str, Any]:
    """Poll /healthz until pred(health), bounded by WAIT_S (the front-end reads heartbeats every WATCH_S)."""
    deadline = time.monotonic() + WAIT_S
    while not pred(health := await healthz(app)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {health}"
        await asyncio.sleep(0.05)  # polling the service's state, bounded by WAIT_S
    return health


async def until(pred: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling the service's state, bounded by WAIT_S


async def try_start(app: Any) -> tuple[dict[str, Any], int | None]:
    """A start without audio: (the first event, the close code); an admitted session is stopped at once."""
    async with asyncio.timeout(WAIT_S), connect(app.url + P.STREAM_PATH) as ws:
        await ws.send(P.StartMessage(sample_rate=16_000).to_json())
        first = json.loads(await ws.recv())
        if first["type"] == P.SESSION_STARTED:
            await ws.send(P.STOP_MESSAGE)
        await ws.wait_closed()  # the service closes it: 1000 after session.ended, 1013 when refused
    return first, ws.close_code


def refused(start: tuple[dict[str, Any], int | None], why: str) -> bool:
    first, code = start
    return first["type"] == P.ERROR and first["code"] == P.E_OVERLOADED and why in first["message"] \
        and code == P.CLOSE_TRY_AGAIN


def admitted(start: tuple[dict[str, Any], int | None]) -> bool:
    return start[0]["type"] == P.SESSION_STARTED and start[1] == P.CLOSE_NORMAL


def of(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def text_of(events: list[dict[str, Any]]) -> str:
    return " ".join(e["text"] for e in of(events, P.TRANSCRIPT))


# ---- model: the head without the encoder ------------------------------------------------------
def test_head_only_checkpoint_predicts_like_the_full_model(tiny_checkpoint, emotion_model):  # noqa: F811
    """load_checkpoint(load_encoder=False) builds no text encoder (the configured one need not even
    exist), refuses to encode, and predicts exactly as the full model from the same encodings."""
    from model import load_checkpoint
    from model.text_encoder import AbsentTextEncoder

    head = load_checkpoint(tiny_checkpoint, device="cpu", encoder="/nonexistent/encoder", load_encoder=False)
    assert isinstance(head.text_encoder, AbsentTextEncoder)
    assert not any(k.startswith("text_encoder.") for k in head.state_dict())
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal(16_000).astype(np.float32) * 0.1 for _ in range(3)]
    encoded = emotion_model.encode_utterances(["I am so happy", "", "what?"], audios)
    with pytest.raises(RuntimeError, match="without its text encoder"):
        head.encode_utterances(["hello"], [audios[0]])
    full_d, head_d = emotion_model.new_dialogue(), head.new_dialogue()
    for e in encoded:
        a, b = emotion_model.predict([(full_d, full_d.append(e))])[0], head.predict([(head_d, head_d.append(e))])[0]
        assert a.label == b.label
        assert max(abs(a.scores[k] - b.scores[k]) for k in a.scores) < 1e-6


def test_audio_wire_format_is_exact():
    from streamer.infer.remote import decode_audio, encode_audio

    pcm = (np.arange(-32768, 32768, 7, dtype=np.int32).astype(np.float32) / 32768.0)
    fmt, data = encode_audio(pcm)
    assert fmt == b"s16" and len(data) == 2 * len(pcm) and np.array_equal(decode_audio(fmt, data), pcm)
    resampled = np.linspace(-0.5, 0.5, 1001, dtype=np.float32)  # not on the int16 grid
    fmt, data = encode_audio(resampled)
    assert fmt == b"f32" and np.array_equal(decode_audio(fmt, data), resampled)


# ---- the service with a worker ----------------------------------------------------------------
def test_remote_workers_match_the_in_process_engine(redis_server, tiny_checkpoint, emotion_model, whisper,  # noqa: F811
                                                     transcripts, tmp_path):
    """Two front-ends, one worker batching both: WER <= 0.3, the event contract, and every emotion
    (and revision) equal within 1e-4 to what the in-process engine gives for the same audio."""
    from model.text_encoder import AbsentTextEncoder
    from streamer.server import create_app

    names = ["jfk.flac", "LJ001-0008.wav"]

    async def remote() -> dict[str, Any]:
        async with front_end(tiny_checkpoint, redis_server.url) as a, front_end(tiny_checkpoint, redis_server.url) as b:
            assert a.asr is None and isinstance(a.model.text_encoder, AbsentTextEncoder)
            ra, rb = await asyncio.gather(stream_audio(a.url, load(names[0]), realtime=False, timeout_s=WAIT_S),
                                          stream_audio(b.url, load(names[1]), realtime=False, timeout_s=WAIT_S))
            return {"events": [ra.events, rb.events], "jobs": [a.metrics.value("emostream_remote_job_seconds_count"), b.metrics.value("emostream_remote_job_seconds_count")],
                    "metrics": a.metrics.render(), "health": a.health(), "depth": [a.engine.depth, b.engine.depth]}

    async def local() -> list[list[dict[str, Any]]]:
        app = create_app(app_config(tiny_checkpoint), model=emotion_model, asr=whisper)
        await app.start()
        try:
            return [(await stream_audio(app.url, load(n), realtime=False, timeout_s=WAIT_S)).events for n in names]
        finally:
            await asyncio.wait_for(app.shutdown(), WAIT_S)

    with worker_process(redis_server.url, tiny_checkpoint, tmp_path / "worker.log", "--max-wait-ms", "20"):
        got = asyncio.run(remote())
    want = asyncio.run(local())
    for name, events, ref in zip(names, got["events"], want):
        check_session_events(events)
        assert not of(events, P.ERROR), of(events, P.ERROR)
        assert wer(transcripts[name], text_of(events)) <= 0.3, (name, text_of(events))
        assert text_of(events) == text_of(ref)
        for type_ in (P.EMOTION, P.EMOTION_REVISED):
            mine, theirs = of(events, type_), of(ref, type_)
            assert [e["utterance_id"] for e in mine] == [e["utterance_id"] for e in theirs]
            for x, y in zip(mine, theirs):
                assert x["label"] == y["label"]
                assert max(abs(x["scores"][k] - y["scores"][k]) for k in x["scores"]) < 1e-4
                assert max(abs(x["modality_weights"][k] - y["modality_weights"][k]) for k in ("speech", "text")) < 1e-4
    assert len(of(got["events"][0], P.EMOTION)) >= 3
    assert got["jobs"][0] >= len(of(got["events"][0], P.EMOTION)) and got["jobs"][1] >= 1
    samples = scraped(got["metrics"])
    assert samples["emostream_remote_job_seconds_count"] == got["jobs"][0] and samples["emostream_remote_jobs_outstanding"] == 0
    assert got["health"]["status"] == "ok" and got["depth"] == [0, 0]


def test_a_dead_worker_costs_one_utterance_and_its_pending_jobs_are_taken_over(redis_server, tiny_checkpoint,  # noqa: F811
                                                                              transcripts, tmp_path):
    """Worker killed -> the next utterance gets an `internal` error within remote_timeout_s and the
    session ends normally; a job delivered to a consumer that never acknowledged it is answered by
    the next worker (XAUTOCLAIM); with that worker up the service is whole again."""
    import redis

    from streamer.infer.remote import GROUP, JOBS, job_fields, parse_reply

    timeout_s = 3.0
    client = redis.Redis.from_url(redis_server.url)
    speech = load("LJ001-0008.wav")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with front_end(tiny_checkpoint, redis_server.url, remote_timeout_s=timeout_s) as app:
            with worker_process(redis_server.url, tiny_checkpoint, tmp_path / "w1.log") as w1:
                await healthz_until(app, lambda h: h["status"] == "ok", "the worker's heartbeat")
                out["before"] = (await stream_audio(app.url, speech, realtime=False, timeout_s=WAIT_S)).events
                w1.send_signal(signal.SIGKILL)
                w1.wait(WAIT_S)
            t0 = time.monotonic()  # its heartbeat lives on until its TTL: this session is admitted
            out["dead"] = (await stream_audio(app.url, speech, realtime=False, timeout_s=WAIT_S)).events
            out["dead_s"] = time.monotonic() - t0
            out["health"] = await healthz_until(app, lambda h: h["status"] == "degraded", "the heartbeat to expire")
            out["gone_s"] = time.monotonic() - t0
            out["timeouts"] = app.metrics.value("emostream_remote_timeouts_total")
            # a worker that died holding a job: delivered to consumer "gone", never acknowledged
            client.xadd(JOBS, job_fields("orphan-1", "emostream:infer:r:orphan", speech, time.time() + WAIT_S))
            taken = client.xreadgroup(GROUP, "gone", {JOBS: ">"}, count=10)
            out["orphaned"] = sum(len(entries) for _, entries in taken)
            with worker_process(redis_server.url, tiny_checkpoint, tmp_path / "w2.log", "--claim-idle", "0.5"):
                reply = await asyncio.to_thread(client.xread, {"emostream:infer:r:orphan": "0-0"}, 1, int(WAIT_S * 1000))
                out["orphan_reply"] = parse_reply(reply[0][1][0][1], torch.device("cpu"))
                out["pending"] = client.xpending(JOBS, GROUP)["pending"]
                await healthz_until(app, lambda h: h["status"] == "ok", "the second worker's heartbeat")
                out["after"] = (await stream_audio(app.url, speech, realtime=False, timeout_s=WAIT_S)).events
        return out

    out = asyncio.run(scenario())
    ref = transcripts["LJ001-0008.wav"]
    for key in ("before", "after"):
        check_session_events(out[key])
        assert not of(out[key], P.ERROR) and wer(ref, text_of(out[key])) <= 0.3, (key, out[key])
    dead = out["dead"]
    errors = of(dead, P.ERROR)
    assert errors and all(e["code"] == P.E_INTERNAL and "no inference worker answered" in e["message"] for e in errors)
    assert dead[-1]["type"] == P.SESSION_ENDED and not of(dead, P.EMOTION)
    assert out["dead_s"] < timeout_s + 10  # bounded by the job timeout, not by a hung session
    assert out["timeouts"] == len(errors)
    assert out["gone_s"] < WorkerConfig().heartbeat_ttl_s + 10  # the killed worker is seen gone within its TTL
    gone = out["health"]["inference"]
    assert gone["workers"]["alive"] == 0 and "no inference worker alive" in gone["problem"], gone
    assert out["orphaned"] == 1 and out["pending"] == 0
    job_id, analysis = out["orphan_reply"]
    assert job_id == "orphan-1" and wer(ref, analysis.transcript.text) <= 0.3
    assert analysis.encoded.speech_vec is not None and analysis.encoded.text_vec is not None


def test_inference_flag_and_config():
    from streamer.__main__ import build_parser, config_from_args

    a = build_parser().parse_args(["--inference", "unix:///run/redis.sock"])
    assert config_from_args(a).inference.remote == "unix:///run/redis.sock"
    assert config_from_args(build_parser().parse_args([])).inference.remote is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--inference", "http://x"])
    with pytest.raises(ValueError):
        InferenceConfig(remote="tcp://x")


def test_engine_bounds_withdraws_and_expires_jobs(redis_server, tiny_checkpoint):  # noqa: F811
    """Without workers: outstanding jobs are bounded (Overloaded), a withdrawn job (speech resumed)
    is cancelled and deleted from the job stream, an unanswered one fails with RemoteTimeout."""
    import redis

    from model import load_checkpoint
    from streamer.infer.engine import Overloaded
    from streamer.metrics import Metrics
    from streamer.infer.remote import JOBS, RemoteInferenceEngine, RemoteTimeout

    client = redis.Redis.from_url(redis_server.url)
    head = load_checkpoint(tiny_checkpoint, device="cpu", load_encoder=False)
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, device="cpu", remote=redis_server.url, queue_size=2,
                          remote_timeout_s=1.0)

    async def until(pred: Any) -> None:
        deadline = time.monotonic() + WAIT_S
        while not pred():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # polling Redis state, bounded by WAIT_S

    async def scenario() -> dict[str, Any]:
        metrics = Metrics()
        engine = RemoteInferenceEngine(head, cfg, metrics)
        engine.start()
        try:
            audio = np.zeros(8000, dtype=np.float32)
            first, second = engine.analyze(audio), engine.analyze(audio)
            with pytest.raises(Overloaded):
                engine.analyze(audio)
            await until(lambda: client.xlen(JOBS) == 2)
            first.abandoned = True
            await until(lambda: client.xlen(JOBS) == 1)
            with pytest.raises(RemoteTimeout):
                await asyncio.wait_for(second.future, WAIT_S)
            await until(lambda: client.xlen(JOBS) == 0)
            return {"first_cancelled": first.future.cancelled(), "depth": engine.depth,
                    "timeouts": metrics.value("emostream_remote_timeouts_total")}
        finally:
            engine.stop()
            await engine.aclose()

    out = asyncio.run(scenario())
    assert out == {"first_cancelled": True, "depth": 0, "timeouts": 1}


def test_redis_unreachable_refuses_sessions_and_degrades_health(tiny_checkpoint, tmp_path):
    """--inference pointing at no Redis: the service starts at once and serves HTTP, /healthz says
    `degraded` with inference.redis "down", and a start is refused (`overloaded`, close 1013)
    instead of admitting a session whose every utterance would fail. (Redis lost mid-session:
    tests/test_faults.py.)"""
    url = f"unix://{tmp_path / 'nobody.sock'}"

    async def scenario() -> dict[str, Any]:
        t0 = time.monotonic()
        async with front_end(tiny_checkpoint, url) as app:
            up_s = time.monotonic() - t0
            return {"up_s": up_s, "health": await healthz(app), "start": await try_start(app),
                    "errors": app.metrics.value("emostream_remote_errors_total"),
                    "overloaded": app.metrics.value("emostream_overloaded_total")}

    out = asyncio.run(scenario())
    assert out["health"]["status"] == "degraded" and refused(out["start"], "inference Redis unreachable"), out
    inference = out["health"]["inference"]
    assert inference["redis"] == "down" and not inference["ok"], inference
    assert "inference Redis unreachable" in inference["problem"] and inference["workers"]["alive"] == 0
    assert out["up_s"] < 10 and out["errors"] >= 1 and out["overloaded"] == 1


def test_admission_and_healthz_follow_the_workers_heartbeats(redis_server, tiny_checkpoint, transcripts,  # noqa: F811
                                                              tmp_path):
    """No worker yet: /healthz `degraded` (workers.alive 0) and a start refused (`overloaded`, close
    1013). A worker up: its heartbeat is read, /healthz `ok` with its load, a session is admitted
    and served, and the worker's job count shows in its heartbeat. The worker stopped: it deletes
    its heartbeat, so /healthz is `degraded` again well within the TTL. Redis killed: `degraded`
    with inference.redis "down", and starts refused."""
    speech = load("LJ001-0008.wav")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with front_end(tiny_checkpoint, redis_server.url) as app:
            out["none"] = await healthz(app), await try_start(app)
            with worker_process(redis_server.url, tiny_checkpoint, tmp_path / "worker.log"):
                out["up"] = await healthz_until(app, lambda h: h["status"] == "ok", "the worker's heartbeat")
                out["start"] = await try_start(app)
                res = await stream_audio(app.url, speech, realtime=False, timeout_s=WAIT_S)
                out["served"] = res.events, res.close_code
                out["counted"] = await healthz_until(
                    app, lambda h: any(w["jobs"] >= 1 for w in h["inference"]["workers"]["list"]), "the worker's job count")
            t0 = time.monotonic()
            out["stopped"] = await healthz_until(app, lambda h: h["status"] == "degraded", "the worker gone")
            out["stopped_s"] = time.monotonic() - t0
            redis_server.kill()
            out["down"] = await healthz_until(app, lambda h: h["inference"]["redis"] == "down", "Redis gone")
            out["down_start"] = await try_start(app)
        return out

    out = asyncio.run(scenario())
    health, start = out["none"]
    assert health["status"] == "degraded" and health["inference"]["redis"] == "up", health
    assert health["inference"]["workers"]["alive"] == 0 and health["inference"]["wait_s"] is None
    assert refused(start, "no inference worker alive"), start
    up = out["up"]["inference"]
    assert up["ok"] and up["problem"] is None and up["workers"]["alive"] == 1 and up["workers"]["decoders"] == 1
    (beat,) = up["workers"]["list"]
    assert beat["decoders"] == 1 and 0 <= beat["load"] <= 1 and beat["job_s"] > 0
    assert 0 <= beat["age_s"] <= beat["ttl_s"] == WorkerConfig().heartbeat_ttl_s
    assert admitted(out["start"]), out["start"]
    events, close = out["served"]
    check_session_events(events)
    assert not of(events, P.ERROR) and of(events, P.EMOTION) and close == P.CLOSE_NORMAL, events
    assert wer(transcripts["LJ001-0008.wav"], text_of(events)) <= 0.3
    assert out["counted"]["inference"]["workers"]["list"][0]["load"] > 0
    assert out["stopped"]["inference"]["workers"]["alive"] == 0
    assert out["stopped_s"] < WorkerConfig().heartbeat_ttl_s  # deleted at exit, not expired
    down = out["down"]
    assert down["status"] == "degraded" and "inference Redis unreachable" in down["inference"]["problem"]
    assert refused(out["down_start"], "inference Redis unreachable"), out["down_start"]


def test_a_queue_deeper_than_the_workers_can_clear_refuses_sessions(redis_server, tiny_checkpoint):  # noqa: F811
    """One live worker (a heartbeat that takes no jobs) at 1 s a job: with 3 jobs in the stream a
    new utterance would wait 3 s, past admit_max_wait_s (1 s), so a start is refused (`overloaded`,
    close 1013) and an utterance past max_queue_s (2 s here) gets Overloaded; /healthz stays `ok`
    (busy is not broken). The queue drained: sessions are admitted again."""
    import redis

    from streamer.infer.engine import Overloaded
    from streamer.infer.remote import JOBS, job_fields

    client = redis.Redis.from_url(redis_server.url)
    fake_worker(redis_server.url, job_s=1.0)
    silence = np.zeros(1600, dtype=np.float32)

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with front_end(tiny_checkpoint, redis_server.url, max_queue_s=2.0) as app:
            out["empty"] = app.engine.wait_estimate_s(), await try_start(app)
            for i in range(3):
                client.xadd(JOBS, job_fields(f"queued-{i}", "emostream:infer:r:nobody", silence, time.time() + WAIT_S))
            await until(lambda: app.engine.wait_estimate_s() > 0, "the front-end to read the queue")
            out["deep"] = app.engine.wait_estimate_s(), await try_start(app), await healthz(app)
            with pytest.raises(Overloaded, match="workers are 3.0 s behind"):
                app.engine.analyze(silence)
            client.xtrim(JOBS, maxlen=0)
            await until(lambda: app.engine.wait_estimate_s() == 0, "the front-end to read the drained queue")
            out["drained"] = await try_start(app)
        return out

    out = asyncio.run(scenario())
    assert out["empty"][0] == 0 and admitted(out["empty"][1]), out["empty"]
    wait, start, health = out["deep"]
    assert wait == 3.0 and refused(start, "would wait 3.0 s"), (wait, start)
    assert health["status"] == "ok" and health["inference"]["queue"] == 3 and health["inference"]["wait_s"] == 3.0
    assert admitted(out["drained"]), out["drained"]
