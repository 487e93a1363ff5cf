"""bench/hostile.py in its smoke mode (2000 hostile frames + connections while a healthy session
streams real speech), so the bench cannot rot; and the bug it found, fixed."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.routes import auth
from streamer import protocol as P
from tests.stream_util import WAIT_S, ErrorLog, app_config, emotion_model  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.mark.exclusive  # a healthy session beside hostile load, admission on
def test_hostile_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "hostile.py"), "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=180)
    assert (out / "hostile.json").is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "hostile.json").read_text())
    assert (out / "hostile.png").stat().st_size > 10_000
    # the service survived: alive, healthy, no crashed handler, a clean shutdown
    s = report["survived"]
    assert s["alive_after_attack"] and s["healthz_after"]["status"] == 200, s
    assert s["log_errors"] == 0 and s["log_tracebacks"] == 0, s["log_error_examples"]
    assert s["service_exit_code"] == 0
    # the healthy session got exactly its baseline's events
    h = report["healthy"]
    assert h["baseline"]["exact"], h["baseline"]["checks"]
    assert h["attacked"]["exact"], h["attacked"]["checks"]
    assert h["attacked"]["utterances"] == h["baseline"]["utterances"] >= 1
    assert h["attacked"]["transcripts"] == h["baseline"]["transcripts"]
    # the attack really ran, every kind of it, during the healthy session, and was answered as specified
    a = report["attack"]
    assert a["units"] >= 2000 and a["healthy_session_overlap_s"] > 0
    assert set(report["sent_by_kind"]) >= {"bad_json", "wrong_shape", "unknown_type", "bad_start", "audio_before_start",
                                           "after_start", "huge", "connect_close", "start_close", "twilio_bad",
                                           "slow_reader", "idle_open", "half_open", "bad_token"}
    assert report["reply_mismatches"] == 0, report["reply_mismatch_examples"]
    replies = report["replies_total"]
    assert replies.get("close:1009", 0) >= 1 and replies.get("http:401", 0) >= 1 and replies.get("error:bad_json", 0) >= 100
    # nothing left behind: sockets closed, sessions ended
    m = report["memory"]
    assert m["settle_after"]["stable"] and m["fds_after"] <= m["fds_before"], m
    assert report["healthy"]["attacked"]["checks"]["star_subscriber_saw_exactly_these_events"]


# ---- found by the bench: a Twilio start whose token is not a string crashed the handler ---------------
@pytest.mark.parametrize("token", [5, ["x"], {"a": 1}, True, "\ud800", ""])
def test_non_string_tokens_are_unknown_tokens(token: object) -> None:
    cfg = auth.AuthConfig(tokens=(("src-token-123", ("source",)),))
    assert cfg.roles(token) is None  # type: ignore[arg-type]
    assert not auth.token_allows(cfg, token, auth.SOURCE)  # type: ignore[arg-type]


def test_twilio_start_with_a_non_string_token_is_refused_not_crashed(emotion_model) -> None:  # noqa: F811
    from bench.soak import FakeAsr
    from streamer.server import create_app

    errors = ErrorLog()
    logging.getLogger().addHandler(errors)

    async def go() -> list[int | None]:
        cfg = replace(app_config(), auth=auth.AuthConfig(tokens=(("src-token-123", ("source",)),)))
        app = create_app(cfg, model=emotion_model, asr=FakeAsr())
        await app.start()
        codes = []
        try:
            for token in (5, ["x"], "\ud800"):
                start = {"event": "start", "start": {"callSid": "CA-x", "streamSid": "MZ-x", "customParameters": {"token": token}}}
                async with connect(app.url + P.TWILIO_PATH) as tw:
                    await tw.send(json.dumps(start))
                    with pytest.raises(ConnectionClosed):
                        await asyncio.wait_for(tw.recv(), WAIT_S)
                    codes.append(tw.close_code)
        finally:
            await asyncio.wait_for(app.shutdown(), WAIT_S)
        return codes

    try:
        codes = asyncio.run(go())
    finally:
        logging.getLogger().removeHandler(errors)
    assert codes == [P.CLOSE_POLICY] * 3  # was 1011 and "connection handler failed" (AttributeError: 'int' ... 'encode')
    assert not errors.records, [r.getMessage() for r in errors.records]
