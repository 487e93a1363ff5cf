"""emostream's live service: audio -> VAD -> Whisper -> dialogue context -> emotion events over
WebSockets. Public names: create_app, App, AppConfig (and streamer.protocol for clients).

Imports are lazy so that `import streamer.protocol` (what clients do) stays standard-library only
and never pulls in torch, websockets or the models.
"""

from __future__ import annotations

from typing import Any

__all__ = ["App", "AppConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "AppConfig":
        from streamer.config import AppConfig

        return AppConfig
    if name in ("App", "create_app"):
        from streamer import server

        return getattr(server, name)
    raise AttributeError(f"module 'streamer' has no attribute {name!r}")
