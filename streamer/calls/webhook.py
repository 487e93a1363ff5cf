"""Webhook delivery of alerts and call summaries: a bounded queue drained by one background task
that POSTs JSON with retries and back-off. `send` never blocks the stream; when the queue is full
the oldest payload is dropped and counted."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger(__name__)


class WebhookSender:
    def __init__(self, url: str, *, retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 5.0,
                 queue_size: int = 1000) -> None:
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self.sent = self.failed = self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="webhook")

    def send(self, payload: dict[str, Any]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(payload)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far was delivered or given up (shutdown)."""
        await asyncio.wait_for(self.queue.join(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _post(self, body: bytes) -> int:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "emostream-webhook/1"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return resp.status

    async def _run(self) -> None:
        while True:
            payload = await self.queue.get()
            body = json.dumps(payload).encode()
            try:
                delay = self.backoff_s
                for attempt in range(self.retries + 1):
                    try:
                        status = await asyncio.to_thread(self._post, body)
                        if 200 <= status < 300:
                            self.sent += 1
                            break
                    except (urllib.error.URLError, OSError, TimeoutError) as e:
                        log.warning("webhook %s attempt %d failed: %s", self.url, attempt + 1, e)
                    if attempt < self.retries:
                        await asyncio.sleep(delay)  # back-off between retries
                        delay *= 2
                else:
                    self.failed += 1
                    log.error("webhook %s: gave up on a %s payload", self.url, payload.get("type"))
            finally:
                self.queue.task_done()
