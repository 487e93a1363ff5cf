"""What watches a session's events besides its subscribers: alert rules (and the webhook they post
to) and the call summary's destinations. A SessionRunner tells each observer every final event it
publishes, publishes the events an observer answers with (alerts), and hands it the call summary
when the session ends (pipeline.parts.SessionObserver)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamer import protocol as P
from streamer.calls.alerts import AlertEngine
from streamer.calls.webhook import WebhookSender
from streamer.metrics import Metrics


class AlertObserver:
    """Evaluates the alert rules on each emotion event; each alert that fires is published in the
    session and posted to the webhook (when there is one)."""

    def __init__(self, engine: AlertEngine, metrics: Metrics, webhook: WebhookSender | None = None) -> None:
        self.engine, self.metrics, self.webhook = engine, metrics, webhook

    def on_event(self, ev: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
        if ev.get("type") != P.EMOTION:
            return ()
        out = []
        for alert in self.engine.evaluate(ev):
            self.metrics.inc("emostream_alerts_total")
            out.append((P.ALERT, alert))
            if self.webhook is not None:
                self.webhook.send({"type": P.ALERT, "session_id": ev["session_id"], **alert})
        return out

    def on_end(self, summary: dict[str, Any]) -> None:
        self.engine.forget(summary["session_id"])


class SummaryObserver:
    """Writes each call summary to `folder`/<session_id>.json and posts it to the webhook (either optional)."""

    def __init__(self, folder: Path | None = None, webhook: WebhookSender | None = None) -> None:
        self.folder, self.webhook = folder, webhook

    def on_event(self, ev: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
        return ()

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in summary["session_id"])
            (self.folder / f"{name}.json").write_text(json.dumps(summary, indent=2))
        if self.webhook is not None:
            self.webhook.send({"type": P.CALL_SUMMARY, **summary})
