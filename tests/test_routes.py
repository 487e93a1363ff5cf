"""The routing tables without a server: routes/http.py's HTTP map (werkzeug) and WebSocketRouter,
the websockets router subclass the service dispatches its WebSocket routes with. The routes'
behaviour over real sockets is in test_fuzz_http.py, test_stream_protocol.py and test_store.py."""

from __future__ import annotations

from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import pytest
from werkzeug.exceptions import NotFound
from werkzeug.routing import Map, Rule

from streamer import protocol as P
from streamer.routes import sessions_api, static
from streamer.routes.http import _HTTP, SERVER_NAME, WebSocketRouter


class Conn(SimpleNamespace):
    """What the router touches of a ServerConnection: request, respond(), handler(_kwargs)."""

    def respond(self, status: HTTPStatus, text: str) -> tuple[int, str]:
        return int(status), text


def request(path: str) -> Any:
    return SimpleNamespace(path=path, headers={})


@pytest.mark.parametrize("path, endpoint, args", [
    ("/healthz", "_health", {}),
    ("/metrics", "_metrics", {}),
    ("/", static.index, {}),
    ("/index.html", static.index, {}),
    ("/static/app.js", static.static_file, {"name": "app.js"}),
    ("/static/../server.py", static.static_file, {"name": "../server.py"}),  # static.py refuses it (404)
    ("/static//abs/app.js", static.static_file, {"name": "/abs/app.js"}),
    ("/v1/sessions", sessions_api.sessions, {}),
    ("/v1/sessions/", sessions_api.sessions, {}),
    ("/v1/sessions/desk%2F3/events", sessions_api.events, {"session_id": "desk%2F3"}),  # unquoted by the endpoint
    ("/v1/sessions/desk/3/events", sessions_api.no_route, {"rest": "desk/3/events"}),
    ("/v1/sessions/x/events/", sessions_api.no_route, {"rest": "x/events/"}),
])
def test_http_map_routes_each_path_to_its_endpoint(path: str, endpoint: Any, args: dict[str, str]) -> None:
    got, got_args = _HTTP.match(path)
    assert (got.__name__ if isinstance(endpoint, str) else got) == endpoint and got_args == args


@pytest.mark.parametrize("path", ["/healthz/", "/HEALTHZ", "/metrics/x", "/static", "/v1/stream", "/v1/stream/", "/v1"])
def test_http_map_knows_no_other_path_and_never_redirects(path: str) -> None:
    with pytest.raises(NotFound):  # not a RequestRedirect: "/x/" is another path, not a redirect to "/x"
        _HTTP.match(path)


def router(shutting_down: bool = False) -> WebSocketRouter:
    routes = Map([Rule(P.STREAM_PATH, endpoint="stream"), Rule(P.SUBSCRIBE_PATH, endpoint="subscribe")],
                 merge_slashes=False)
    return WebSocketRouter(SimpleNamespace(shutting_down=shutting_down), routes, SERVER_NAME, "ws")  # type: ignore[arg-type]


def test_websocket_router_dispatches_refuses_unknown_paths_and_redirects_nothing() -> None:
    r = router()
    conn = Conn(request=request(P.SUBSCRIBE_PATH + "?session=a&interim=1"))
    assert r.route_request(conn, conn.request) is None  # type: ignore[arg-type]
    assert conn.handler == "subscribe" and conn.handler_kwargs == {}
    for path in ("/nope", P.STREAM_PATH + "/", "/v1//stream", ""):
        conn = Conn(request=request(path))
        assert r.route_request(conn, conn.request) == (404, f"no route {path}; see docs/protocol.md\n"), path  # type: ignore[arg-type]
        assert not hasattr(conn, "handler")


def test_websocket_router_refuses_new_connections_while_shutting_down() -> None:
    conn = Conn(request=request(P.STREAM_PATH))
    assert router(shutting_down=True).route_request(conn, conn.request) == (503, "shutting down\n")  # type: ignore[arg-type]
    conn = Conn(request=request("/nope"))  # an unknown path is still unknown
    assert router(shutting_down=True).route_request(conn, conn.request)[0] == 404  # type: ignore[arg-type,index]


def test_a_subscriber_closes_once() -> None:
    """The first finish() closes the socket; a later one (the listen route after admission refused
    a start) queues nothing behind it."""
    import asyncio

    from streamer.events.fanout import Subscriber
    from streamer.metrics import Metrics

    class FakeSocket:
        def __init__(self) -> None:
            self.closes: list[tuple[int, str]] = []

        async def send(self, text: str) -> None:
            pass

        async def close(self, code: int, reason: str) -> None:
            self.closes.append((code, reason))

    async def scenario() -> tuple[list[tuple[int, str]], int]:
        ws = FakeSocket()
        sub = Subscriber(ws, 8, Metrics())  # type: ignore[arg-type]
        sub.offer('{"seq": 1}')
        sub.finish(P.CLOSE_TRY_AGAIN, "too many sessions")
        sub.finish(P.CLOSE_POLICY, "start refused: see the Error message")
        await asyncio.wait_for(sub.task, 5)
        return ws.closes, sub.queue.qsize()

    closes, left = asyncio.run(scenario())
    assert closes == [(P.CLOSE_TRY_AGAIN, "too many sessions")] and left == 0
