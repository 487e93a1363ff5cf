"""Call-monitoring building blocks: μ-law, Twilio messages, alert rules, call summary, webhook."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from streamer import protocol as P
from streamer.calls.alerts import AlertEngine, AlertRule, load_rules
from streamer.calls.summary import CallSummary
from streamer.calls.telephony import (MULAW_TO_PCM16, TwilioError, media_message, mulaw_decode, mulaw_encode, parse_media,
                                parse_start)
from streamer.calls.webhook import WebhookSender


# ---- μ-law -------------------------------------------------------------------------------------
def test_mulaw_table_matches_g711():
    # reference points of ITU-T G.711 μ-law (as audioop.ulaw2lin computes them)
    assert MULAW_TO_PCM16[0x00] == -32124 and MULAW_TO_PCM16[0x80] == 32124
    assert MULAW_TO_PCM16[0x7F] == 0 and MULAW_TO_PCM16[0xFF] == 0
    assert MULAW_TO_PCM16[0x70] == -120 and MULAW_TO_PCM16[0xF0] == 120
    try:
        import audioop  # stdlib up to Python 3.12: an independent implementation
    except ImportError:
        return
    ref = np.frombuffer(audioop.ulaw2lin(bytes(range(256)), 2), dtype="<i2")
    np.testing.assert_array_equal(MULAW_TO_PCM16, ref)


def test_mulaw_round_trip_is_close():
    x = (np.sin(np.linspace(0, 200, 8000)) * 0.6).astype(np.float32)
    y = mulaw_decode(mulaw_encode(x))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(x - y).max() < 0.02  # μ-law step at 0.6 full scale is ~1/64


# ---- Twilio messages -----------------------------------------------------------------------------
START = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
         "start": {"streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound", "outbound"],
                   "customParameters": {"agent": "ann"},
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def test_parse_start_and_media():
    s = parse_start(START)
    assert (s.call_sid, s.stream_sid, s.tracks, s.sample_rate) == ("CA1", "MZ1", ("inbound", "outbound"), 8000)
    assert s.custom_parameters == {"agent": "ann"}
    payload = mulaw_encode(np.zeros(160, np.float32))
    m = parse_media(media_message("MZ1", "outbound", 3, 60, payload))
    assert m.track == "outbound" and m.chunk == 3 and m.timestamp_ms == 60 and m.audio.shape == (160,)


@pytest.mark.parametrize("bad", [
    {"event": "start"},
    {"event": "start", "start": {"streamSid": "MZ1", "tracks": ["inbound"]}},
    {"event": "start", "start": {**START["start"], "tracks": ["sideways"]}},
    {"event": "start", "start": {**START["start"], "mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000}}},
])
def test_bad_start_is_a_clear_error(bad):
    with pytest.raises(TwilioError):
        parse_start(bad)


@pytest.mark.parametrize("media", [None, {"payload": "!!notbase64"}, {"payload": "AAAA", "track": "x"},
                                   {"payload": "AAAA", "timestamp": "soon"}])
def test_bad_media_is_a_clear_error(media):
    with pytest.raises(TwilioError):
        parse_media({"event": "media", "media": media})


# ---- alert rules --------------------------------------------------------------------------------------
def emotion(uid: int, speaker: str, **scores: float) -> dict:
    full = {"neutral": 0.0, "joy": 0.0, "surprise": 0.0, "anger": 0.0, "sadness": 0.0, "disgust": 0.0, "fear": 0.0}
    full.update(scores)
    full["neutral"] = max(0.0, 1 - sum(v for k, v in full.items() if k != "neutral"))
    label = max(full, key=full.get)
    return {"type": P.EMOTION, "session_id": "CA1", "seq": uid, "utterance_id": uid, "speaker": speaker,
            "label": label, "scores": full}


RULE = AlertRule(name="angry-customer", speaker="customer", labels=("anger", "disgust"), threshold=0.6, count=2, window=3)


def test_rule_fires_on_2_of_3_and_only_once_while_active():
    eng = AlertEngine([RULE])
    assert eng.evaluate(emotion(0, "customer", anger=0.7)) == []
    assert eng.evaluate(emotion(1, "agent", anger=0.9)) == [], "agent utterances do not count for a customer rule"
    assert eng.evaluate(emotion(2, "customer", joy=0.8)) == []
    fired = eng.evaluate(emotion(3, "customer", disgust=0.65))
    assert len(fired) == 1 and fired[0]["rule"] == "angry-customer" and fired[0]["matched_utterances"] == [0, 3]
    assert eng.evaluate(emotion(4, "customer", anger=0.9)) == [], "still active: no repeat"
    for uid in (5, 6, 7):
        assert eng.evaluate(emotion(uid, "customer", joy=0.9)) == []
    assert eng.evaluate(emotion(8, "customer", anger=0.9)) == []
    assert len(eng.evaluate(emotion(9, "customer", anger=0.9))) == 1, "re-armed after calming down"


def test_rule_does_not_fire_below_threshold_or_when_spread_out():
    eng = AlertEngine([RULE])
    for uid, s in enumerate([0.59, 0.55, 0.3, 0.7, 0.1, 0.2, 0.7]):
        assert eng.evaluate(emotion(uid, "customer", anger=s)) == []


def test_a_confident_only_rule_ignores_low_confidence_emotions():
    from dataclasses import replace

    unsure = lambda uid, **kw: {**emotion(uid, "customer", **kw), "confidence": "low", "familiar_voice": False}  # noqa: E731
    sure = lambda uid, **kw: {**emotion(uid, "customer", **kw), "confidence": "ok"}  # noqa: E731
    strict, plain = AlertEngine([replace(RULE, confident_only=True)]), AlertEngine([RULE])
    assert [len(plain.evaluate(unsure(u, anger=0.9))) for u in (0, 1)] == [0, 1]  # scores alone: fires
    assert [len(strict.evaluate(unsure(u, anger=0.9))) for u in (0, 1)] == [0, 0]
    assert [len(strict.evaluate(sure(u, anger=0.9))) for u in (2, 3)] == [0, 1]
    with pytest.raises(ValueError, match="confident_only"):
        AlertRule.from_dict({"name": "x", "labels": ["anger"], "confident_only": "yes"})


def test_rules_load_from_json(tmp_path):
    f = tmp_path / "rules.json"
    f.write_text(json.dumps({"rules": [{"name": "sad", "labels": "sadness", "threshold": 0.5, "count": 1, "window": 1}]}))
    (rule,) = load_rules(f)
    assert rule.labels == ("sadness",) and rule.speaker is None
    f.write_text(json.dumps({"rules": [{"name": "x", "labels": ["anger"], "count": 4, "window": 3}]}))
    with pytest.raises(ValueError, match="count"):
        load_rules(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_rules(f)


# ---- call summary ----------------------------------------------------------------------------------------
def test_call_summary_per_speaker_with_revision_and_alerts():
    s = CallSummary("CA1")
    for uid, speaker, scores in [(0, "agent", {"joy": 0.8}), (1, "customer", {"anger": 0.7}), (2, "customer", {"anger": 0.9})]:
        s.add({"type": P.UTTERANCE_ENDED, "utterance_id": uid, "start_s": uid * 2.0, "end_s": uid * 2.0 + 1.5, "speaker": speaker})
        s.add({"type": P.TRANSCRIPT, "utterance_id": uid, "text": f"t{uid}", "speaker": speaker})
        s.add(emotion(uid, speaker, **scores))
    s.add({**emotion(1, "customer", sadness=0.95), "type": P.EMOTION_REVISED})
    s.add({"type": "alert", "session_id": "CA1", "rule": "angry-customer", "utterance_id": 2})
    d = s.to_dict()
    cust = d["speakers"]["customer"]
    assert cust["utterances"] == 2 and cust["distribution"] == {"sadness": 0.5, "anger": 0.5}
    assert cust["timeline"][0]["label"] == "sadness" and cust["timeline"][0]["text"] == "t1"
    assert cust["peaks"]["sadness"]["score"] == 0.95 and cust["peaks"]["anger"]["utterance_id"] == 2
    assert d["speakers"]["agent"]["dominant"] == "joy"
    assert d["alerts"] == [{"rule": "angry-customer", "utterance_id": 2}]


# ---- webhook ---------------------------------------------------------------------------------------------
def test_webhook_retries_until_delivered():
    received: list[dict] = []
    attempts = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            attempts["n"] += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if attempts["n"] < 3:
                self.send_response(503)  # the first two attempts fail
            else:
                received.append(body)
                self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    async def go() -> WebhookSender:
        w = WebhookSender(f"http://127.0.0.1:{httpd.server_address[1]}/hook", retries=4, backoff_s=0.01)
        w.start()
        w.send({"type": "alert", "rule": "angry-customer"})
        await w.drain(20)
        await w.stop()
        return w

    try:
        w = asyncio.run(go())
    finally:
        httpd.shutdown()
    assert received == [{"type": "alert", "rule": "angry-customer"}] and attempts["n"] == 3
    assert (w.sent, w.failed) == (1, 0)


def test_webhook_gives_up_without_blocking():
    async def go() -> WebhookSender:
        w = WebhookSender("http://127.0.0.1:9/unreachable", retries=1, backoff_s=0.01, timeout_s=1)
        w.start()
        w.send({"type": "alert"})
        await w.drain(20)
        await w.stop()
        return w

    w = asyncio.run(go())
    assert (w.sent, w.failed) == (0, 1)


def test_call_summary_says_how_far_to_trust_each_speakers_emotions():
    s = CallSummary("CA1")
    marks = [("ok", True), ("low", False), ("low", True), ("ok", None)]  # None: the event did not say
    for uid, (conf, familiar) in enumerate(marks):
        ev = {**emotion(uid, "customer", anger=0.7), "confidence": conf}
        if familiar is not None:
            ev["familiar_voice"] = familiar
        s.add(ev)
    s.add(emotion(9, "agent", joy=0.8))  # an older server: neither field
    d = s.to_dict()["speakers"]
    assert d["customer"]["low_confidence_share"] == 0.5 and d["customer"]["unfamiliar_voice_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert d["customer"]["timeline"][1]["familiar_voice"] is False and d["customer"]["timeline"][1]["confidence"] == "low"
    assert "low_confidence_share" not in d["agent"] and "unfamiliar_voice_share" not in d["agent"]
