"""HTTP endpoints beside the WebSocket routes: GET /v1/sessions and /v1/sessions/{id}/events,
served from the durable event log (`--store`). Queries are short indexed reads on the event loop,
bounded by MAX_LIMIT rows."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from werkzeug.routing import Rule

from streamer.routes.host import SessionHost
from streamer.routes.static import set_header

SESSIONS_PATH = "/v1/sessions"
DEFAULT_SESSIONS = 100
DEFAULT_EVENTS = 1000
MAX_LIMIT = 10_000  # rows per response; page with offset / after_seq
MAX_SQL_INT = 2**63 - 1  # SQLite's INTEGER: a larger offset / after_seq / run cannot be bound


class _BadQuery(ValueError):
    pass


def sessions(app: SessionHost, connection: ServerConnection, request: Request) -> Response:
    """GET /v1/sessions: the stored sessions, newest first (limit, offset)."""
    if app.store is None:
        return _no_store(connection)
    query = parse_qs(urlsplit(request.path).query)
    try:
        limit = _int(query, "limit", DEFAULT_SESSIONS, 1, MAX_LIMIT)
        offset = _int(query, "offset", 0, 0, MAX_SQL_INT)
    except _BadQuery as e:
        return _bad_query(connection, e)
    return _json(connection, HTTPStatus.OK, app.store.sessions(limit=limit, offset=offset))


def events(app: SessionHost, connection: ServerConnection, request: Request, session_id: str) -> Response:
    """GET /v1/sessions/{id}/events: a session's events exactly as sent (after_seq, limit, run)."""
    store = app.store
    if store is None:
        return _no_store(connection)
    session_id = unquote(session_id)  # ids may hold any character, %-encoded ("/" too, as %2F)
    query = parse_qs(urlsplit(request.path).query)
    try:
        after_seq = _int(query, "after_seq", -1, -1, MAX_SQL_INT)
        limit = _int(query, "limit", DEFAULT_EVENTS, 1, MAX_LIMIT)
        run = _int(query, "run", None, 1, MAX_SQL_INT)
    except _BadQuery as e:
        return _bad_query(connection, e)
    session = store.session(session_id, run)
    if session is None:
        which = f"session {session_id!r}" + (f" run {run}" if run is not None else "")
        return _json(connection, HTTPStatus.NOT_FOUND, {"error": "unknown_session", "message": f"{which} is not in the event store"})
    texts = store.event_texts(session_id, after_seq=after_seq, limit=limit, run=session["run"])
    return _respond(connection, HTTPStatus.OK, "[" + ",".join(texts) + "]\n")  # events exactly as sent


def no_route(app: SessionHost, connection: ServerConnection, request: Request, rest: str) -> Response:
    """Any other path under /v1/sessions/: this API's JSON 404."""
    if app.store is None:
        return _no_store(connection)
    path = urlsplit(request.path).path
    return _json(connection, HTTPStatus.NOT_FOUND, {
        "error": "no_route", "message": f"no route {path}; use {SESSIONS_PATH} or {SESSIONS_PATH}/ID/events"})


RULES = [  # for routes/http.py's map; <rest:...> is its converter for the rest of a path
    Rule(SESSIONS_PATH, endpoint=sessions),
    Rule(SESSIONS_PATH + "/", endpoint=sessions),
    Rule(SESSIONS_PATH + "/<session_id>/events", endpoint=events),  # one path segment, still %-encoded
    Rule(SESSIONS_PATH + "/<rest:rest>", endpoint=no_route),
]


def _no_store(connection: ServerConnection) -> Response:
    return _json(connection, HTTPStatus.NOT_FOUND, {
        "error": "no_store", "message": "no event store: start the service with --store PATH to keep events"})


def _bad_query(connection: ServerConnection, e: _BadQuery) -> Response:
    return _json(connection, HTTPStatus.BAD_REQUEST, {"error": "bad_query", "message": str(e)})


def _int(query: dict[str, list[str]], name: str, default: int | None, low: int, high: int) -> Any:
    values = query.get(name)
    if not values:
        return default
    try:
        v = int(values[-1])
    except ValueError:
        raise _BadQuery(f"{name} must be an integer, got {values[-1]!r}") from None
    if v < low or v > high:
        raise _BadQuery(f"{name} must be in {low}..{high}, got {v}")
    return v


def _json(connection: ServerConnection, status: HTTPStatus, obj: Any) -> Response:
    return _respond(connection, status, json.dumps(obj) + "\n")


def _respond(connection: ServerConnection, status: HTTPStatus, body: str) -> Response:
    resp = connection.respond(status, body)
    set_header(resp, "Content-Type", "application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp
