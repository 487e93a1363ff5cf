"""The browser dashboard: `/` and `/static/<file>` served from streamer/static (no CDN, offline)."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def static_response(connection: ServerConnection, path: str) -> Response | None:
    """A response for the dashboard's files, or None when `path` is not one of them."""
    if path in ("/", "/index.html"):
        name = "index.html"
    elif path.startswith("/static/"):
        name = path[len("/static/"):]
    else:
        return None
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
