"""The HTTP routes beside the WebSocket ones, on werkzeug's router (the one websockets' own `route`
dispatches the WebSocket routes with, WebSocketRouter below): /healthz, /metrics, /v1/sessions
(sessions_api.py) and the dashboard's files (static.py). Auth and request sanity come first; a
path neither map knows gets 404."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.asyncio.router import Router
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from websockets.protocol import State
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter, Map, Rule

from streamer.routes import auth, sessions_api, static
from streamer import protocol as P
from streamer.routes.host import SessionHost
from streamer.routes.static import set_header

CLOSE_WAIT_S = 5.0  # a failed connection's buffered bytes get this long to leave before it is aborted
SERVER_NAME = "emostream"  # the maps' host: no rule redirects or matches on a host, and Host may be absent


class Rest(BaseConverter):
    """`<rest:name>`: the rest of the path, slashes and all, possibly empty (a static file's name is
    checked by static.py, an unknown /v1/sessions path gets that API's JSON 404)."""

    regex = ".*"
    part_isolating = False


def _health(app: SessionHost, connection: ServerConnection, request: Request) -> Response:
    resp = connection.respond(HTTPStatus.OK, json.dumps(app.health()) + "\n")
    set_header(resp, "Content-Type", "application/json")
    return resp


def _metrics(app: SessionHost, connection: ServerConnection, request: Request) -> Response:
    resp = connection.respond(HTTPStatus.OK, app.metrics.render())
    set_header(resp, "Content-Type", app.metrics.content_type)
    return resp


HTTP_ROUTES = Map([
    Rule(P.HEALTH_PATH, endpoint=_health),
    Rule(P.METRICS_PATH, endpoint=_metrics),
    *sessions_api.RULES,
    *static.RULES,
], merge_slashes=False, converters={"rest": Rest})  # no redirects: "//x" and "/x/" are other paths
_HTTP = HTTP_ROUTES.bind(SERVER_NAME, url_scheme="http")


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
    """websockets' process_request hook, before its router: an HTTP response, or None to go on to
    the WebSocket routes (WebSocketRouter). Checks come in this order: malformed request, auth
    (before any data flows), method, then the HTTP routes."""
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
    if not path.startswith("/"):  # "" or "*": werkzeug would redirect an empty path to "/"
        return no_route(connection, path)
    try:
        endpoint, args = _HTTP.match(path)
    except NotFound:
        return None  # a WebSocket route, or the router's 404
    return endpoint(app, connection, request, **args)


def no_route(connection: ServerConnection, path: str) -> Response:
    return connection.respond(HTTPStatus.NOT_FOUND, f"no route {path}; see docs/protocol.md\n")


class WebSocketRouter(Router):
    """websockets' router for the WebSocket routes (server.py's map), run after process_request:
    the service's 404 text, and 503 for a WebSocket route while the service shuts down."""

    def __init__(self, host: SessionHost, url_map: Map, server_name: str | None, url_scheme: str) -> None:
        super().__init__(url_map, server_name, url_scheme)
        self.host = host

    def not_found(self, connection: ServerConnection) -> Response:
        assert connection.request is not None  # set before process_request runs
        return no_route(connection, urlsplit(connection.request.path).path)

    def redirect(self, connection: ServerConnection, url: str) -> Response:
        return self.not_found(connection)  # no rule redirects, and no path is rewritten

    def route_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = super().route_request(connection, request)
        if response is None and self.host.shutting_down:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return response

