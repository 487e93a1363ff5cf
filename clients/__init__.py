"""Clients for the emostream service (protocol v1): an async Python library and command-line tools.

    from clients import StreamClient, Subscriber

Command-line tools: `python -m clients.mic`, `python -m clients.file PATH`, `python -m clients.subscribe`.
"""

from clients.client import DEFAULT_URL, Event, StreamClient, Subscriber, pcm16, run_source

__all__ = ["DEFAULT_URL", "Event", "StreamClient", "Subscriber", "pcm16", "run_source"]
