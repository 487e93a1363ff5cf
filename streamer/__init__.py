"""emostream's live service: audio -> VAD -> Whisper -> dialogue context -> emotion events over
WebSockets. Public names: create_app, AppConfig (and streamer.protocol for clients)."""

from streamer.config import AppConfig
from streamer.server import App, create_app

__all__ = ["App", "AppConfig", "create_app"]
