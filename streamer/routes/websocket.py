"""The WebSocket routes as a werkzeug map for websockets' router (server.py serves it through
http.WebSocketRouter): /v1/stream, /v1/listen, /v1/twilio and /v1/subscribe, one handler each. Every
connection is counted in `host.connections` (shutdown closes them) while its route serves it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from werkzeug.routing import Map, Rule

from streamer import protocol as P
from streamer.events.fanout import Subscriber
from streamer.routes.host import SessionHost
from streamer.routes.listen import ListenConnection, ListenSubscriber
from streamer.routes.source import SourceConnection
from streamer.routes.subscribe import subscriber_connection
from streamer.routes.twilio import twilio_connection


def websocket_routes(host: SessionHost) -> Map:
    async def connection(ws: ServerConnection, run: Callable[[Subscriber], Awaitable[None]],
                         kind: type[Subscriber] = Subscriber, source: bool = True) -> None:
        sub = kind(ws, host.config.server.subscriber_queue, host.metrics)
        sub.source = source  # a source's own socket is not counted as a subscriber
        host.connections.add(sub)
        try:
            await run(sub)
        finally:
            host.connections.discard(sub)

    async def stream(ws: ServerConnection) -> None:
        await connection(ws, lambda sub: SourceConnection(host, ws, sub).run())

    async def listen(ws: ServerConnection) -> None:
        await connection(ws, lambda sub: ListenConnection(host, ws, sub).run(), kind=ListenSubscriber)

    async def twilio(ws: ServerConnection) -> None:
        await connection(ws, lambda sub: twilio_connection(host, ws, sub))

    async def subscribe(ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)

        async def run(sub: Subscriber) -> None:
            sub.interim = query.get("interim", ["0"])[0].lower() in ("1", "true", "yes")
            await subscriber_connection(host, ws, sub, query.get("session", [P.ALL_SESSIONS])[0],
                                        query.get("after_seq", [None])[0])

        await connection(ws, run, source=False)

    return Map([Rule(P.STREAM_PATH, endpoint=stream), Rule(P.LISTEN_PATH, endpoint=listen),
                Rule(P.TWILIO_PATH, endpoint=twilio), Rule(P.SUBSCRIBE_PATH, endpoint=subscribe)],
               merge_slashes=False)  # no redirects: "/v1//stream" is another path
