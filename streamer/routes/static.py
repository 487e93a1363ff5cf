"""The browser dashboard: `/` and `/static/<file>` served from streamer/static (no CDN, offline)."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from werkzeug.routing import Rule

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def index(app: Any, connection: ServerConnection, request: Request) -> Response:
    """/ and /index.html: the dashboard's page."""
    return _file(connection, "index.html", "/index.html")


def static_file(app: Any, connection: ServerConnection, request: Request, name: str) -> Response:
    """/static/<name>: one of the dashboard's files, or 404 for any name outside STATIC_DIR."""
    return _file(connection, name, "/static/" + name)


RULES = [Rule("/", endpoint=index), Rule("/index.html", endpoint=index),
         Rule("/static/<rest:name>", endpoint=static_file)]  # <rest:...>: routes/http.py's converter


def _file(connection: ServerConnection, name: str, path: str) -> Response:
    try:
        file = (STATIC_DIR / name).resolve()
        found = STATIC_DIR in file.parents and file.is_file() and file.suffix in CONTENT_TYPES
    except (OSError, ValueError):  # a NUL byte (ValueError), a name too long for the file system (OSError)
        found = False
    if not found:
        return connection.respond(HTTPStatus.NOT_FOUND, f"no file {path}\n")
    resp = connection.respond(HTTPStatus.OK, "")
    body = file.read_bytes()
    resp.body = body
    set_header(resp, "Content-Length", str(len(body)))
    set_header(resp, "Content-Type", CONTENT_TYPES[file.suffix])
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def set_header(resp: Response, name: str, value: str) -> None:
    """Replace a header (websockets' Headers[...] = v appends a second value instead)."""
    if name in resp.headers:
        del resp.headers[name]
    resp.headers[name] = value
