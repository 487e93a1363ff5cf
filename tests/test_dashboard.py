"""The browser dashboard in a real headless Chromium (Debian's; no browser download): its
microphone is fed from a real speech wav, and utterances with transcripts and emotions must appear,
the utterance being spoken first as interim text (grey italics) with a provisional emotion chip.
A screenshot is saved to artifacts/dashboard.png."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import SPEECH
from tests.service import running_service

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LABELS = {"neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"}
pytestmark = pytest.mark.slow
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Before the page's own script: record what the page sends and where it connects, and every interim
# text / provisional chip ever shown (the final results replace them within a second or two).
SPY = """
window.__spy = { urls: [], sent: [], interim: [], provisional: [] };
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(url, protocols) { super(url, protocols); window.__spy.urls.push(String(url)); }
  send(data) { if (typeof data === "string") window.__spy.sent.push(JSON.parse(data)); return super.send(data); }
};
new MutationObserver(() => {
  for (const t of document.querySelectorAll("li.utt .text.interim")) {
    const st = getComputedStyle(t);
    window.__spy.interim.push({ text: t.textContent, italic: st.fontStyle, colour: st.color,
                                 final: getComputedStyle(t.closest("li").querySelector(".meta")).color });
  }
  for (const c of document.querySelectorAll("li.utt .chip.provisional")) window.__spy.provisional.push(c.textContent);
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
"""


def test_static_files_are_served(tiny_checkpoint):
    with running_service(tiny_checkpoint) as app:
        base = f"http://127.0.0.1:{app.port}"
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            html = r.read()
            assert r.headers["Content-Type"].startswith("text/html") and b"emostream" in html
            assert b'src="http' not in html and b'href="http' not in html, "no CDN: works offline"
        with urllib.request.urlopen(base + "/static/app.js", timeout=10) as r:
            body = r.read()
            assert r.headers["Content-Type"].startswith("application/javascript")
            assert b"/v1/subscribe" in body and b"audioWorklet" in body and b"import " not in body
            assert b"transcript.partial" in body and b"emotion.partial" in body and b"&interim=1" in body
        assert b'<input type="checkbox" id="interim" checked>' in html and b"Interim results" in html
        for bad in ("/static/../server.py", "/static/nope.js"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + bad, timeout=10)
            assert e.value.code == 404


def test_dashboard_microphone_to_emotions_in_chromium(tiny_checkpoint, transcripts, tmp_path):
    assert CHROMIUM, "Chromium is installed by scripts/setup.sh (Debian package 'chromium')"
    from playwright.sync_api import sync_playwright

    # Chromium's fake microphone loops a 16-bit wav: two real sentences with a pause between them.
    a, _ = sf.read(SPEECH / "LJ001-0004.wav", dtype="float32")
    b, _ = sf.read(SPEECH / "LJ001-0008.wav", dtype="float32")
    pause = np.zeros(int(22050 * 1.2), dtype=np.float32)
    wav = tmp_path / "mic.wav"
    sf.write(wav, np.concatenate([pause, a, pause, b, pause * 3]), 22050, subtype="PCM_16")

    ARTIFACTS.mkdir(exist_ok=True)
    with running_service(tiny_checkpoint) as app, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
        ])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(SPY)
            page.goto(f"http://127.0.0.1:{app.port}/?mic=1")
            page.wait_for_function("document.querySelector('#mic').classList.contains('on')", timeout=30_000)
            # the first sentence's emotion (bars drawn) and transcript must appear
            page.wait_for_function(
                "[...document.querySelectorAll('li.utt')].some(li => li.querySelector('.bars').children.length > 0"
                " && !li.querySelector('.text').classList.contains('pending'))", timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            items = page.eval_on_selector_all("li.utt", "els => els.map(e => ({label: e.querySelector('.label').textContent,"
                                              " text: e.querySelector('.text').textContent, bars: e.querySelectorAll('.bar').length,"
                                              " weights: e.querySelector('.weights').textContent}))")
            session = page.eval_on_selector("#session", "s => s.value")
            spy = page.evaluate("window.__spy")
            # the finished utterances show only the final results
            left = page.eval_on_selector_all("li.utt", "els => els.filter(e => e.querySelector('.bars').children.length)"
                                             ".map(e => e.querySelectorAll('.text.interim, .chip.provisional').length)")
        finally:
            browser.close()
    assert not errors, errors
    done = [i for i in items if i["bars"]]
    assert done and all(i["label"] in LABELS and i["bars"] == 7 and "speech" in i["weights"] for i in done), items
    heard = " ".join(i["text"] for i in done).lower()
    assert "printed" in heard or "surpassed" in heard or "block" in heard, heard
    assert session not in ("*", ""), "the page switched to watching its own microphone session"
    # "Interim results" is ticked by default: the microphone's start asks for them, so does the watcher
    start = next(m for m in spy["sent"] if m.get("type") == "start")
    assert start["interim"] is True and start["metadata"] == {"source": "dashboard"}
    assert any(f"/v1/subscribe?session={session}&interim=1" in u for u in spy["urls"]), spy["urls"]
    # the utterance being spoken showed its text so far in grey italics, and a provisional emotion
    assert spy["interim"] and all(i["italic"] == "italic" and i["colour"] == i["final"] for i in spy["interim"]), spy
    assert any(i["text"].strip() for i in spy["interim"])
    assert spy["provisional"] and all(c.endswith("?") and c[:-1] in LABELS for c in spy["provisional"]), spy
    assert left and not any(left), "final transcript and emotion replaced the interim text and chip"


def test_dashboard_calls_view_shows_each_side_and_alerts(tiny_checkpoint, tmp_path):
    """A stereo call (agent left, customer right) streamed while the page watches: the calls
    table shows both sides' current emotion and highlights the alert."""
    import asyncio
    import json

    from clients import StreamClient, run_source
    from clients.audio import paced_chunks
    from playwright.sync_api import sync_playwright
    from streamer.config import CallsConfig

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"name": "customer-spoke", "speaker": "customer", "aggregate": "sum",
                                            "labels": sorted(LABELS), "threshold": 0.99, "count": 1, "window": 1}]}))
    a, _ = sf.read(SPEECH / "LJ001-0002.wav", dtype="float32")
    b, _ = sf.read(SPEECH / "LJ001-0008.wav", dtype="float32")
    from model.features import resample

    a, b = resample(a, 22050), resample(b, 22050)
    gap = np.zeros(12800, np.float32)
    left = np.concatenate([gap, a, gap, np.zeros_like(b), gap])
    right = np.concatenate([gap, np.zeros_like(a), gap, b, gap])
    stereo = np.stack([left, right], axis=1).reshape(-1)

    with running_service(tiny_checkpoint, calls=CallsConfig(alert_rules=rules)) as app, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                     "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{app.port}/")
            page.wait_for_function("window.emostream.sub && window.emostream.sub.readyState === 1", timeout=30_000)

            async def call() -> None:
                async with StreamClient(app.url, channels=2, speakers=["agent", "customer"], session_id="call-42") as c:
                    await run_source(c, paced_chunks(stereo, 32000, realtime=False))

            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # playwright owns this thread's loop
                pool.submit(asyncio.run, call()).result(timeout=120)
            page.wait_for_function("document.querySelector('#calls tr.alerting.ended') !== null", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard_calls.png"), full_page=True)
            row = page.eval_on_selector("#calls tbody tr", "tr => ({cells: [...tr.querySelectorAll('.side')].map(td => "
                                        "[td.dataset.speaker, td.textContent]), alerts: tr.querySelector('.alerts').textContent})")
        finally:
            browser.close()
    sides = dict(row["cells"])
    assert set(sides) == {"customer", "agent"}
    assert all(any(lab in text for lab in LABELS) for text in sides.values()), sides
    assert row["alerts"].startswith("1") and "customer" in row["alerts"]


def test_dashboard_interim_checkbox_sets_the_subscription(tiny_checkpoint):
    """Unticking "Interim results" re-subscribes without `interim=1` (and `?interim=0` starts unticked);
    nothing else in the page changes."""
    from playwright.sync_api import sync_playwright

    with running_service(tiny_checkpoint) as app, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(SPY)
            base = f"http://127.0.0.1:{app.port}"
            page.goto(base + "/")
            page.wait_for_function("window.emostream.sub && window.emostream.sub.readyState === 1", timeout=30_000)
            page.uncheck("#interim")
            page.wait_for_function("window.__spy.urls.length === 2 && window.emostream.sub.readyState === 1",
                                   timeout=30_000)
            page.check("#interim")
            page.wait_for_function("window.__spy.urls.length === 3", timeout=30_000)
            urls = page.evaluate("window.__spy.urls")
            page.goto(base + "/?interim=0")
            page.wait_for_function("window.emostream.sub && window.emostream.sub.readyState === 1", timeout=30_000)
            unticked = page.evaluate("[document.querySelector('#interim').checked, window.__spy.urls]")
        finally:
            browser.close()
    assert not errors, errors
    paths = [u.removeprefix(base.replace("http", "ws")) for u in urls]
    assert paths == ["/v1/subscribe?session=*&interim=1", "/v1/subscribe?session=*", "/v1/subscribe?session=*&interim=1"]
    assert unticked[0] is False and unticked[1][-1].endswith("/v1/subscribe?session=*")


def test_dashboard_speakers_box_and_diarized_labels(tiny_checkpoint, tmp_path):
    """"Speakers" (or ?diarize=1) makes the microphone's start ask for diarize; a diarized session
    streamed beside the page shows each utterance's speaker (S1, S2) with it, follows
    speaker.revised, and is not mistaken for a call (no calls-table row: it has no channels)."""
    import asyncio
    import concurrent.futures

    from playwright.sync_api import sync_playwright
    from streamer.client import stream_audio
    from tests.test_diarize_service import conversation

    a, _ = sf.read(SPEECH / "LJ001-0002.wav", dtype="float32")
    wav = tmp_path / "mic.wav"
    sf.write(wav, np.concatenate([np.zeros(11025, np.float32), a]), 22050, subtype="PCM_16")
    audio, _ = conversation()
    with running_service(tiny_checkpoint) as app, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(SPY)
            page.goto(f"http://127.0.0.1:{app.port}/?diarize=1&interim=0")
            page.wait_for_function("window.emostream.sub && window.emostream.sub.readyState === 1", timeout=30_000)
            ticked = page.eval_on_selector("#diarize", "b => b.checked")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # playwright owns this thread's loop
                res = pool.submit(asyncio.run, stream_audio(app.url, audio, realtime=False, diarize=True,
                                                            session_id="pair")).result(timeout=120)
            page.wait_for_function("[...document.querySelectorAll('li.utt')].filter(li => li.querySelector('.bars')"
                                   ".children.length).length >= 12", timeout=60_000)
            metas = page.eval_on_selector_all("li.utt .meta", "els => els.map(e => e.textContent)")
            calls_hidden = page.eval_on_selector("#calls-panel", "p => p.hidden")
            page.click("#mic")  # the microphone's start message asks for diarize
            page.wait_for_function("window.__spy.sent.some(m => m.type === 'start')", timeout=30_000)
            start = page.evaluate("window.__spy.sent.find(m => m.type === 'start')")
        finally:
            browser.close()
    assert not errors, errors
    assert ticked and start.get("diarize") is True, start
    final = {e["utterance_id"]: e["speaker"] for e in res.events if e["type"] == "transcript"}
    final.update({e["utterance_id"]: e["speaker"] for e in res.events if e["type"] == "speaker.revised"})
    shown = [m for m in metas if m.startswith("pair")]
    assert len(shown) == len(final) and {m.split(" · ")[1].split(" ")[0] for m in shown} == {"S1", "S2"}, metas
    # what the page shows is each utterance's last label (speaker.revised applied)
    assert sorted(m.split(" · ")[1].split(" ")[0] for m in shown) == sorted(final.values()), (metas, final)
    assert calls_hidden, "a diarized session is not a call"
