"""The HTTP routes beside the WebSocket ones: /healthz, /metrics, /v1/sessions (sessions_api.py), the
dashboard's files (static.py), 404 for anything else; auth and request sanity first."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from websockets.protocol import State

from streamer.routes import auth
from streamer import protocol as P
from streamer.routes.sessions_api import api_response
from streamer.routes.static import set_header, static_response
from streamer.routes.host import SessionHost

CLOSE_WAIT_S = 5.0  # a failed connection's buffered bytes get this long to leave before it is aborted


async def _closed(connection: ServerConnection) -> Response:
    """A connection websockets has failed already (it sent its end of the stream): close it and wait
    until it is closed, so that websockets, which answers only a connection still opening, sends
    nothing; a response would hit its assertion that nothing follows the end of the stream."""
    assert connection.transport is not None
    connection.transport.close()
    try:
        await asyncio.wait_for(connection.wait_closed(), CLOSE_WAIT_S)
    except TimeoutError:  # the peer does not read what is left to send
        connection.transport.abort()
        await connection.wait_closed()
    return connection.respond(HTTPStatus.BAD_REQUEST, "")


def process_request(app: SessionHost, connection: ServerConnection,
                    request: Request) -> Response | Awaitable[Response] | None:
    """websockets' process_request hook: an HTTP response, or None to go on with the WebSocket
    handshake of /v1/stream, /v1/subscribe or /v1/twilio. Checks come in this order: malformed
    request, auth (before any data flows), method, then the route."""
    protocol = connection.protocol
    if protocol.state is State.CONNECTING and protocol.eof_sent:  # bytes after the request (a body, a
        return _closed(connection)  # pipelined request): websockets read them as frames and failed it
    try:
        path = urlsplit(request.path).path
    except ValueError:  # e.g. "//[": an unclosed IPv6 host in the request target
        return connection.respond(HTTPStatus.BAD_REQUEST, "malformed request target\n")
    for name in ("Authorization", "Origin"):  # Headers.get() raises on a repeated header
        if len(request.headers.get_all(name)) > 1:
            return connection.respond(HTTPStatus.BAD_REQUEST, f"more than one {name} header\n")
    refused = auth.check(app.config.auth, request.path, request.headers.get("Authorization"),
                         request.headers.get("Origin"))
    if refused is not None:  # before any data flows
        app.metrics.inc("emostream_auth_refused_total")
        resp = connection.respond(refused[0], refused[1] + "\n")
        if refused[0] == HTTPStatus.UNAUTHORIZED:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="emostream"'
        return resp
    if request.method != "GET":  # every route is read-only (WebSocket handshakes are GETs too)
        resp = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed; use GET\n")
        resp.headers["Allow"] = "GET"
        return resp
    if path == P.HEALTH_PATH:
        resp = connection.respond(HTTPStatus.OK, json.dumps(app.health()) + "\n")
        set_header(resp, "Content-Type", "application/json")
        return resp
    if path == P.METRICS_PATH:
        resp = connection.respond(HTTPStatus.OK, app.metrics.render())
        set_header(resp, "Content-Type", app.metrics.content_type)
        return resp
    api = api_response(app, connection, request)
    if api is not None:  # /v1/sessions...
        return api
    static = static_response(connection, path)
    if static is not None:  # the browser dashboard
        return static
    if path not in (P.STREAM_PATH, P.SUBSCRIBE_PATH, P.TWILIO_PATH, P.LISTEN_PATH):
        return connection.respond(HTTPStatus.NOT_FOUND, f"no route {path}; see docs/protocol.md\n")
    if app.shutting_down:
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
    return None
