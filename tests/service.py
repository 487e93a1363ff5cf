"""Run the real service in a background thread (its own event loop) on port 0, for tests that
drive it from subprocesses or synchronous code (CLIs, a browser)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path


@contextmanager
def running_service(checkpoint: Path, calls=None, **server_overrides) -> Iterator[object]:
    from streamer.config import AppConfig, CallsConfig, InferenceConfig, ServerConfig
    from streamer.server import create_app

    cfg = AppConfig(
        server=replace(ServerConfig(port=0), **server_overrides),
        inference=InferenceConfig(checkpoint=checkpoint, device="cpu"),
        calls=calls or CallsConfig(),
    )
    app = create_app(cfg)
    loop = asyncio.new_event_loop()
    ready, failed = threading.Event(), []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(app.start())
        except BaseException as e:  # surfaced to the test below
            failed.append(e)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="service", daemon=True)
    thread.start()
    if not ready.wait(120) or failed:
        raise RuntimeError(f"service did not start: {failed}")
    try:
        yield app
    finally:
        async def stop() -> None:
            await app.shutdown()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
