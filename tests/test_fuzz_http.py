"""HTTP fuzzing against one real service (hypothesis), over raw sockets: every HTTP route
(/healthz, /metrics, /, /static/..., /v1/sessions, /v1/sessions/{id}/events, unknown paths) with
fuzzed paths, query strings (names and values valid and not, huge, negative, unicode,
percent-encoded, repeated), methods and headers (Authorization variants, Origin, WebSocket upgrade
headers on HTTP routes, missing or garbage Sec-WebSocket-Key/Version on the WebSocket routes), and
malformed requests (bad request lines and versions, oversized headers, headers without a colon,
missing CRLF, truncated requests, early closes).

Properties: every request gets a well-formed HTTP response (Content-Length matching the body) or
a clean close, within a bound; never a 500; the status is the one the route's contract gives
(auth first, then method, then the route's own checks); a JSON content type means a JSON body;
a 200 that is neither JSON nor metrics is byte-for-byte a file of streamer/static (nothing
outside it leaks); no handler logs an error; a healthy session streaming real speech at real-time
pace meanwhile gets exactly its normal events; and /healthz answers afterwards.

The service runs with API tokens, an Origin allow-list and an event store that already holds
ended sessions (written by an earlier run of the service on the same file, so they are only in the
store, not in memory). Examples are derandomized (CI-stable).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from streamer.routes import auth
from streamer import protocol as P
from streamer.client import stream_audio
from streamer.routes.static import CONTENT_TYPES, STATIC_DIR
from streamer.metrics import Metrics

from tests.stream_util import (  # noqa: F401
    HEALTHY, HEALTHY_FILE, NO_LOAD_ADMISSION, WAIT_S, ServiceThread, app_config, emotion_model, load, scraped, whisper,
)
from tests.stream_util import healthy_session as shared_healthy_session  # noqa: E402

pytestmark = pytest.mark.slow

SRC, SUB, ADMIN = "src-token-123", "sub-token-456", "admin-token-789"
TOKENS = ((SRC, (auth.SOURCE,)), (SUB, (auth.SUBSCRIBER,)), (ADMIN, (auth.ADMIN,)))
ROLES = {SRC: (auth.SOURCE,), SUB: (auth.SUBSCRIBER,), ADMIN: (auth.ADMIN,)}
ORIGIN = "https://ops.example.com"
LIVE = "@live"  # in a fuzzed session id: replaced by the live healthy session's id when sent
STORED = ("desk/3 ü", "desk/3 ü", "plain")  # ended sessions in the store (one id used twice: two runs)
READ_S = 5.0  # a response (or the close) must come within this; the server's open_timeout is 10 s
MAX_SQL_INT = 2**63 - 1
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---- the service on a background loop ---------------------------------------------------------
class Harness(ServiceThread):
    """The service with tokens, an Origin allow-list and a store that already holds STORED; its
    event loop runs in a thread, tests submit coroutines to it."""

    def __init__(self, model: Any, asr: Any, db: Path) -> None:
        from streamer.config import StoreConfig
        from streamer.server import create_app

        super().__init__("fuzz-http-service")
        store = StoreConfig(path=db)
        first = replace(app_config(), store=store)  # an earlier run of the service writes STORED
        self.call(self._fill(create_app(replace(first, inference=replace(first.inference, warmup=False)),
                                        model=model, asr=asr)))
        cfg = replace(app_config(**NO_LOAD_ADMISSION), store=store, auth=auth.AuthConfig(tokens=TOKENS, allowed_origins=(ORIGIN,)))
        self.serve(create_app(cfg, model=model, asr=asr))
        self.url = self.app.url
        self.port = self.app.port
        self.known = self.call(self._snapshot())  # session id -> run -> its events, as stored
        assert sorted(self.known) == sorted(set(STORED)) and len(self.known[STORED[0]]) == 2, self.known.keys()
        self.seen: Counter[str] = Counter()  # (route or ending, status) -> examples: printed, for -s
        self.connections = 0  # fuzz connections made (so a test can show it really ran concurrently)
        self.healthy_runs = 0
        self.live = ""  # the healthy session running now

    @staticmethod
    async def _fill(app: Any) -> None:
        await app.start()
        try:
            for i, sid in enumerate(STORED):
                audio = load("LJ001-0002.wav") if i == 0 else np.zeros(8_000, np.float32)  # speech, then short runs
                res = await stream_audio(app.url, audio, realtime=False, session_id=sid)
                assert res.events[-1]["type"] == P.SESSION_ENDED
        finally:
            await asyncio.wait_for(app.shutdown(), WAIT_S)

    async def _snapshot(self) -> dict[str, dict[int, list[dict[str, Any]]]]:
        store = self.app.store
        out: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for s in store.sessions(limit=100):
            out.setdefault(s["id"], {})[s["run"]] = store.events(s["id"], run=s["run"])
        return out



@pytest.fixture(scope="module")
def harness(emotion_model, whisper, tmp_path_factory) -> Iterator[Harness]:  # noqa: F811
    h = Harness(emotion_model, whisper, tmp_path_factory.mktemp("fuzz-http") / "events.db")
    try:
        yield h
    finally:
        h.close()


# ---- the healthy session (stream_util's, with a source token) -----------------------------------
def healthy_session(h: Harness, reference: str) -> Any:
    return shared_healthy_session(h, reference, headers={"Authorization": f"Bearer {SRC}"})


def server_is_fine(h: Harness) -> None:
    """/healthz answers (over a raw socket, like everything here), nothing left behind, no errors."""
    reply = h.call(exchange(h, request("GET", P.HEALTH_PATH, port=h.port)))
    assert reply.status == 200, reply
    health = json.loads(reply.body)
    assert health["status"] == "ok" and health["sessions"] == 0, health
    assert not h.app.sessions, list(h.app.sessions)
    h.call(no_connections(h))
    assert not h.errors.records, h.errors.report()


# ---- raw HTTP ---------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int | None  # None: the server closed without a response (a clean close)
    headers: dict[str, list[str]]  # lower-case name -> values
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


def request(method: str, target: str, headers: list[tuple[str, str]] | None = None, *, port: int = 0,
            version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", f"Host: 127.0.0.1:{port}", *(f"{n}: {v}" for n, v in headers or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [\x20-\x7e]*")


def parse_head(head: bytes) -> tuple[int, dict[str, list[str]]]:
    lines = head[:-4].split(b"\r\n")
    m = STATUS_LINE.fullmatch(lines[0])
    assert m, f"malformed status line {lines[0]!r}"
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and re.fullmatch(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+", name), f"malformed header {line!r}"
        headers.setdefault(name.decode().lower(), []).append(value.strip().decode("latin-1"))
    return int(m.group(1)), headers


async def forgotten(h: Harness, me: tuple[str, int], timeout: float = 10.0) -> None:
    """Until the server no longer holds a WebSocket connection from `me`."""
    async with asyncio.timeout(timeout):
        while any(c.remote_address == me for c in h.app.server.all_connections):
            await asyncio.sleep(0.005)


async def no_connections(h: Harness, timeout: float = 10.0) -> None:
    """Until the server holds no WebSocket connection (the healthy source's goes once it is closed)."""
    async with asyncio.timeout(timeout):
        while h.app.server.all_connections:
            await asyncio.sleep(0.01)


async def exchange(h: Harness, data: bytes, end: str = "complete") -> Reply:
    """Send `data` on a fresh connection; `end`: "complete" (then read), "eof" (half-close, then
    read) or "abort" (RST right after sending; no reply expected). Reads the response (head,
    Content-Length body) and then the server's close, all within READ_S. A 101 is answered by
    dropping the connection, then waiting until the server has forgotten it."""
    h.connections += 1
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    me = writer.get_extra_info("sockname")[:2]
    upgraded = False
    try:
        writer.write(data)
        if end == "abort":
            writer.transport.abort()
            return Reply(None, {}, b"")
        if end == "eof":
            writer.write_eof()
        with suppress(ConnectionError):
            await writer.drain()  # the server may answer (414, 431) and close before reading it all
        async with asyncio.timeout(READ_S):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                assert e.partial == b"", f"a truncated response: {e.partial[:300]!r}"
                return Reply(None, {}, b"")  # closed without a word: fine for a request it cannot read
            except asyncio.LimitOverrunError:
                raise AssertionError("a response head over 64 KiB") from None
            status, headers = parse_head(head)
            if status == 101:
                upgraded = True
                return Reply(status, headers, b"")
            (length,) = headers["content-length"]
            body = await reader.readexactly(int(length))
            rest = await reader.read()  # the server closes after any response but a 101
            assert rest == b"", f"bytes after the body: {rest[:200]!r}"
            return Reply(status, headers, body)
    finally:
        writer.transport.abort()
        if upgraded:
            await forgotten(h, me)


def static_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


def well_formed(reply: Reply) -> None:
    """Never a 500; JSON when it says JSON; metrics a Prometheus scraper reads; a 200 that is neither
    JSON nor metrics is a static file."""
    if reply.status is None:
        return
    assert 100 <= reply.status < 500 or reply.status in (503, 505), reply
    ctype = reply.header("Content-Type") or ""
    if ctype.startswith("application/json"):
        json.loads(reply.body)
    if ctype == Metrics.content_type:
        assert scraped(reply.body.decode())["emostream_sessions_total"] >= 0
    if reply.status == 200 and not ctype.startswith("application/json") and ctype != Metrics.content_type:
        assert reply.body in static_files().values(), f"a 200 that is no static file: {reply.body[:200]!r}"
        assert ctype == CONTENT_TYPES[next(Path(n).suffix for n, b in static_files().items() if b == reply.body)]


# ---- strategies: well-formed requests with a known expected status -------------------------------
@dataclass(frozen=True)
class Req:
    kind: str  # health, metrics, page, static, sessions, events, no_route, unknown, stream, subscribe, twilio, any
    path: str  # the target's path, sent as is (ASCII)
    pairs: tuple[tuple[str, str | None], ...] = ()  # query parameters, sent percent-encoded (None: a bare name)
    raw_query: str | None = None  # else this query, sent as is
    plus: bool = False  # encode spaces in the query as '+'
    fragment: str = ""
    method: str = "GET"
    version: str = "HTTP/1.1"
    authorization: str | None = None
    origin: str | None = None
    extra: tuple[tuple[str, str], ...] = ()  # upgrade headers and others
    name: str = ""  # static: the file name asked for; events: the session id

    def bind(self, live: str) -> Req:
        """LIVE (the healthy session's id) filled in."""
        if LIVE not in self.name and not any(v and LIVE in v for _, v in self.pairs):
            return self
        return replace(self, path=self.path.replace(quote(LIVE, safe=""), quote(live, safe="")).replace(LIVE, live),
                       name=self.name.replace(LIVE, live),
                       pairs=tuple((k, v.replace(LIVE, live) if v else v) for k, v in self.pairs))

    def query(self) -> str:
        if self.raw_query is not None:
            return self.raw_query
        enc = (lambda s: quote_plus(s, safe="")) if self.plus else (lambda s: quote(s, safe=""))
        return "&".join(enc(k) if v is None else f"{enc(k)}={enc(v)}" for k, v in self.pairs)

    def target(self) -> str:
        q = self.query()
        return self.path + (f"?{q}" if q or self.pairs else "") + (f"#{self.fragment}" if self.fragment else "")

    def encode(self, port: int) -> bytes:
        headers = [*([("Authorization", self.authorization)] if self.authorization is not None else []),
                   *([("Origin", self.origin)] if self.origin is not None else []), *self.extra]
        return request(self.method, self.target(), headers, port=port, version=self.version)

    def param(self, name: str, first: bool = False) -> str | None:
        """What the server reads for `name`: the last (token: the first) non-blank value."""
        if self.raw_query is not None:
            return None
        values = [v for k, v in self.pairs if k == name and v]
        return (values[0] if first else values[-1]) if values else None


# Authorization header -> the token it carries (NOPE: one the server does not know), or QUERY (no
# bearer token at all: the server then looks at ?token=).
QUERY, NOPE = "?", "nope-nope-nope"
AUTHORIZATIONS = {
    f"Bearer {ADMIN}": ADMIN, f"bearer {ADMIN}": ADMIN, f"BEARER   {ADMIN}": ADMIN, f"Bearer {SUB}": SUB,
    f"Bearer {SRC}": SRC, "Bearer": QUERY, f"Basic {base64.b64encode(b'admin:pw').decode()}": QUERY,
    f"Bearer\t{ADMIN}": QUERY, f"{ADMIN}": QUERY, "": QUERY, "Bearer nope-nope-nope": NOPE,
    f"Bearer {ADMIN[:-1]}": NOPE, f"Bearer {ADMIN}x": NOPE, "Bearer ÿÿÿÿÿÿÿÿÿ": NOPE, f"Bearer {ADMIN} {ADMIN}": NOPE,
}
authorizations = st.one_of(st.just(f"Bearer {ADMIN}"), st.none(), st.sampled_from(sorted(AUTHORIZATIONS)))
origins = st.one_of(st.none(), st.none(), st.sampled_from([ORIGIN, "https://evil.example", "null", "", ORIGIN + ".evil",
                                                           ORIGIN.upper(), ORIGIN + "/", "https://ops.example.com:443"]))
methods = st.one_of(st.just("GET"), st.just("GET"), st.just("GET"),
                    st.sampled_from(["POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "CONNECT", "X-Y"]))
KEY = base64.b64encode(b"0123456789abcdef").decode()
UPGRADE = (("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"))
upgrade_variants = st.fixed_dictionaries({}, optional={
    "Connection": st.sampled_from(["Upgrade", "upgrade", "keep-alive, Upgrade", "close", "", "Upgrade, Upgrade"]),
    "Upgrade": st.sampled_from(["websocket", "WebSocket", "h2c", "", "websocket, h2c"]),
    "Sec-WebSocket-Key": st.sampled_from([KEY, "", "not base64!", base64.b64encode(b"short").decode(), KEY + KEY]),
    "Sec-WebSocket-Version": st.sampled_from(["13", "8", "", "garbage", "13, 8", "99999999999999999999"]),
}).map(lambda d: tuple(d.items()))
upgrade_headers = st.one_of(st.just(()), st.just(UPGRADE), upgrade_variants)
other_headers = st.lists(st.sampled_from([
    ("Content-Length", "0"), ("X-Forwarded-For", "10.0.0.1"), ("Accept", "*/*"), ("Cookie", "a=b; c=d"),
    ("X-Latin", "ÿé"), ("Host", "evil.example"), ("Accept-Encoding", "gzip"), ("Connection", "keep-alive"),
    ("Authorization", f"Bearer {ADMIN}"), ("Origin", ORIGIN),  # a second one when the request has its own
]), max_size=3).map(tuple)

query_names = st.one_of(st.sampled_from(["limit", "offset", "after_seq", "run", "token", "session", "interim"]),
                        st.sampled_from(["LIMIT", "limit ", " limit", "li mit", "", "x", "offset[]", "ümit", "limit\x00"]),
                        st.text(max_size=8))
query_values = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "5", "100", "10000", "-1", "-2", LIVE, ADMIN, SUB, SRC, "*"]),
    st.sampled_from(["", "10001", str(MAX_SQL_INT), str(MAX_SQL_INT + 1), str(-MAX_SQL_INT - 2), "9" * 30, "9" * 5000,
                     "1e3", "1.5", "٣", "1_000", " 7 ", "+3", "0x10", "abc", "\x00", "%", "%41", "ü", "∞", "NaN"]),
    st.integers(-(10**20), 10**20).map(str),
    st.text(max_size=10),
)
paging = st.lists(st.tuples(st.sampled_from(["limit", "offset", "after_seq", "after_seq", "limit", "run"]),  # mostly valid
                            st.sampled_from(["0", "1", "2", "3", "4", "5", "100", "-1", "9999"])), max_size=3).map(tuple)
query_pairs = st.one_of(
    paging,
    st.lists(st.tuples(query_names, query_values | st.none()), max_size=5),
).map(tuple)
raw_queries = st.text(max_size=40).map(lambda t: quote(t, safe="=&;/?%+#"))  # raw garbage, percent-encoded where it must be
fragments = st.one_of(st.just(""), st.just(""), st.sampled_from(["x", "limit=0", "/../..", "%00"]))

ABSOLUTE = [f"/{STATIC_DIR}/app.js"] if re.fullmatch(r"[\x21-\x7e]+", str(STATIC_DIR)) else []  # Path("/abs") wins
static_names = st.one_of(
    st.sampled_from(["app.js", "index.html", "style.css", "./app.js", "x/../style.css", "app.js/", "app.js/.",
                     "app.js/../index.html", "../static/app.js", *ABSOLUTE]),  # all inside: served
    st.sampled_from(["../server.py", "../../../../../../etc/passwd", "/etc/passwd", "..", ".", "", "/", "../",
                     "..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "....//....//etc/passwd",
                     "../assets/SOURCE.txt", "../static", "nope.js", "app.JS", "static/app.js", "app.js\x00.png",
                     "app.js\x00", "\x00", "a" * 300, "x/" + "a" * 300 + "/../../app.js", "..\\..\\etc\\passwd",
                     "app.js%00", "%61pp.js", "app.js;.png", "app.js?x", ".." + "/.." * 40 + "/etc/passwd"]),
    st.lists(st.sampled_from(["..", ".", "%2e%2e", "etc", "passwd", "app.js", "static", "a\x00b", "", "x" * 256]),
             min_size=1, max_size=6).map("/".join),
)
session_ids = st.one_of(st.sampled_from([*STORED, LIVE]), st.sampled_from([*STORED, LIVE]),
                        st.sampled_from(["nobody", "desk/3", "DESK/3 Ü", "*", ".."]), st.text(max_size=12))
api_junk = st.sampled_from(["x/bogus", "/events", "events", "a/b/events", "x/events/", "x/events/x", "%2Fevents", "x/Events",
                            "x/events%2F", "x//events", "x/events/.."])
unknown_paths = st.sampled_from([
    "/v1", "/v1/", "/v1/streams", "/healthz/", "/HEALTHZ", "/metrics/x", "/favicon.ico", "/static", "/index.htm",
    "/v1/%73essions", "/%2e%2e/etc/passwd", "/../etc/passwd", "/..", "/v1/sessions/../../etc/passwd", "*", "/.%2e/",
    "/v1/stream/", "/v1/subscribe/x", "/%00", "/\x00", "/a\x01b", "/" + "a" * 7000,
])


def _req(kind: str, path: Any, **kw: Any) -> st.SearchStrategy[Req]:
    """Requests for one route: half of them with everything but the path and query fuzzed, half
    clean around those (GET, the admin token, no Origin), so most reach the route's own checks."""
    fuzzed = {"method": methods, "authorization": authorizations, "origin": origins, "fragment": fragments,
              "version": st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]), "plus": st.booleans(),
              "extra": st.tuples(upgrade_headers, other_headers).map(lambda t: t[0] + t[1])}
    clean = {**fuzzed, "method": st.just("GET"), "authorization": st.just(f"Bearer {ADMIN}"), "origin": st.none(),
             "extra": upgrade_headers}
    path = path if isinstance(path, st.SearchStrategy) else st.just(path)
    return st.one_of(*(st.builds(Req, kind=st.just(kind), path=path, **{**base, **kw}) for base in (clean, fuzzed)))


def _events_req(sid: str, enc_slash: bool, **kw: Any) -> st.SearchStrategy[Req]:
    path = f"/v1/sessions/{quote(sid, safe='' if enc_slash else '/')}/events"
    kind = "events" if sid and (enc_slash or "/" not in sid) else "no_route"
    return _req(kind, path, name=st.just(sid), **kw)


route_requests = st.one_of(  # the fixed routes, unknown paths, paths from anywhere
    _req("health", P.HEALTH_PATH, pairs=query_pairs),
    _req("metrics", P.METRICS_PATH),
    _req("page", st.sampled_from(["/", "/index.html"])),
    _req("unknown", unknown_paths),
    _req("bad_target", st.sampled_from(["//[", "//[::1/healthz", "http://[x/v1/sessions", "//[/static/app.js", "//]"])),
    _req("any", st.text(st.characters(min_codepoint=0, max_codepoint=127, blacklist_characters=" \r\n?#"), max_size=30)
         .map(lambda t: "/" + t), pairs=query_pairs),
)
static_requests = static_names.flatmap(lambda name: _req("static", "/static/" + name, name=st.just(name)))
api_requests = st.one_of(  # /v1/sessions and /v1/sessions/{id}/events
    _req("sessions", st.sampled_from(["/v1/sessions", "/v1/sessions/"]), pairs=query_pairs),
    _req("sessions", st.sampled_from(["/v1/sessions", "/v1/sessions/"]), pairs=query_pairs, raw_query=raw_queries),
    st.tuples(session_ids, st.sampled_from([True, True, False])).flatmap(lambda t: _events_req(*t, pairs=query_pairs)),
    st.tuples(session_ids, st.sampled_from([True, True, False])).flatmap(lambda t: _events_req(*t, pairs=query_pairs)),
    session_ids.flatmap(lambda sid: _events_req(sid, True, pairs=query_pairs, raw_query=raw_queries)),
    st.sampled_from([*STORED, LIVE]).flatmap(lambda sid: _events_req(sid, True, pairs=paging)),  # paging through
    _req("no_route", api_junk.map(lambda j: f"/v1/sessions/{j}"), pairs=query_pairs),
)
ws_headers = st.one_of(st.just(UPGRADE), upgrade_variants,
                       st.tuples(upgrade_headers, other_headers).map(lambda t: t[0] + t[1]))
ws_requests = st.one_of(
    _req("stream", P.STREAM_PATH, extra=ws_headers),
    _req("twilio", P.TWILIO_PATH, extra=ws_headers),
    _req("subscribe", P.SUBSCRIBE_PATH, pairs=query_pairs, extra=ws_headers),
)


# ---- the oracle -------------------------------------------------------------------------------------
NEEDS = {"health": None, "page": None, "static": None, "metrics": auth.ADMIN, "stream": auth.SOURCE,
         "twilio": auth.SOURCE, "subscribe": auth.SUBSCRIBER, "sessions": auth.SUBSCRIBER, "events": auth.SUBSCRIBER,
         "no_route": auth.SUBSCRIBER, "unknown": auth.SUBSCRIBER}


def _int(value: str | None, default: int | None, low: int, high: int) -> int | None | str:
    """The parameter as the API reads it: default if absent, else an int in low..high, else 'bad'."""
    if value is None:
        return default
    try:
        v = int(value)
    except ValueError:
        return "bad"
    return v if low <= v <= high else "bad"


def expected(h: Harness, req: Req) -> tuple[set[int], Callable[[Reply], None] | None]:
    """The statuses `req` may get, and a check of the body where the route's contract gives one."""
    if req.kind == "any":  # a path from anywhere: no route is certain, but never a 500
        return {101, 200, 400, 401, 403, 404, 405, 426, 505}, None
    if req.kind == "bad_target":  # urlsplit() cannot split it
        return {400}, None
    if sum(n == "Authorization" for n, _ in req.extra) + (req.authorization is not None) > 1 or \
            sum(n == "Origin" for n, _ in req.extra) + (req.origin is not None) > 1:
        return {400}, None  # one credential, one origin: two are ambiguous
    if req.origin is not None and req.origin != ORIGIN:
        return {403}, None
    need = NEEDS[req.kind]
    if need is not None:
        authorization = next((v for n, v in (("Authorization", req.authorization), *req.extra)
                              if n == "Authorization" and v is not None), None)
        token = AUTHORIZATIONS[authorization] if authorization is not None else QUERY
        if token == QUERY:
            token = req.param("token", first=True)
        if not (req.kind == "twilio" and token is None):  # Twilio's token may come with its start message
            roles = ROLES.get(token or "")
            if roles is None:
                return {401}, None
            if need not in roles and auth.ADMIN not in roles:
                return {403}, None
    if req.method != "GET":
        return {405}, None
    if req.kind == "health":
        return {200}, lambda r: assert_(json.loads(r.body)["status"] == "ok")
    if req.kind == "metrics":
        return {200}, lambda r: assert_(b"emostream_sessions_active" in r.body)
    if req.kind == "page":
        return {200}, lambda r: assert_(r.body == (STATIC_DIR / "index.html").read_bytes())
    if req.kind == "static":
        name = re.split("[?#]", req.name)[0]  # the rest is the query or fragment
        target = os.path.normpath(os.path.join(STATIC_DIR, name))
        inside = os.path.dirname(target) == str(STATIC_DIR) and Path(target).suffix in CONTENT_TYPES
        if "\x00" in name or not inside or not os.path.isfile(target):
            return {404}, None
        return {200}, lambda r: assert_(r.body == Path(target).read_bytes())
    if req.kind in ("no_route", "unknown"):
        return {404}, None
    if req.kind in ("stream", "twilio", "subscribe"):
        if req.version == "HTTP/1.1" and dict(req.extra[:4]) == dict(UPGRADE) and not req.extra[4:]:
            return {101}, None
        return {101, 400, 426, 505}, None
    if req.raw_query is not None:  # garbage query: whatever it parses to, a 200, 400 or 404
        return {200, 400, 404}, None
    if req.kind == "sessions":
        limit, offset = _int(req.param("limit"), 100, 1, 10_000), _int(req.param("offset"), 0, 0, MAX_SQL_INT)
        if "bad" in (limit, offset):
            return {400}, lambda r: assert_(json.loads(r.body)["error"] == "bad_query")

        def sessions(r: Reply) -> None:
            got = json.loads(r.body)
            assert isinstance(got, list) and len(got) <= limit and all(isinstance(s["id"], str) for s in got), got
            if offset == 0 and limit >= 100:
                assert {(s["id"], s["run"]) for s in got} >= {(sid, run) for sid, runs in h.known.items() for run in runs}
        return {200}, sessions
    assert req.kind == "events", req
    after, limit, run = (_int(req.param("after_seq"), -1, -1, MAX_SQL_INT), _int(req.param("limit"), 1000, 1, 10_000),
                         _int(req.param("run"), None, 1, MAX_SQL_INT))
    if "bad" in (after, limit, run):
        return {400}, lambda r: assert_(json.loads(r.body)["error"] == "bad_query")
    sid = req.name
    if sid.startswith(HEALTHY):  # the live session (or one that ran before): in the store, still growing
        def live(r: Reply) -> None:
            got = json.loads(r.body)
            assert len(got) <= limit and all(e["session_id"] == sid and e["seq"] > after for e in got), got
            assert [e["seq"] for e in got] == sorted({e["seq"] for e in got})
        return ({200} if run is None else {200, 404}), live
    runs = h.known.get(sid, {})
    if not runs or (run is not None and run not in runs):
        return {404}, lambda r: assert_(json.loads(r.body)["error"] == "unknown_session")
    events = runs[run if run is not None else max(runs)]
    want = [e for e in events if e["seq"] > after][:limit]
    return {200}, lambda r: assert_(json.loads(r.body) == want, want)


def assert_(ok: bool, *why: Any) -> None:
    assert ok, why


def check(h: Harness, req: Req, reply: Reply) -> None:
    statuses, body_check = expected(h, req)
    line = len(f"{req.method} {req.target()} {req.version}\r\n")  # websockets reads at most 8192 bytes a line
    if line > 8_192 + 2:
        statuses, body_check = {414}, None
    elif line >= 8_192 - 2:
        statuses = statuses | {414}
        body_check = None if reply.status == 414 else body_check
    assert reply.status in statuses, (req.target(), reply.status, statuses, reply.body[:300])
    well_formed(reply)
    if reply.status == 401:
        assert reply.header("WWW-Authenticate") == 'Bearer realm="emostream"'
    if reply.status == 405:
        assert reply.header("Allow") == "GET", reply.headers
    if body_check is not None:
        body_check(reply)


def fuzz_requests(h: Harness, strategy: st.SearchStrategy[Req], max_examples: int) -> None:
    @settings(FUZZ, max_examples=max_examples)
    @given(req=strategy)
    def fuzz(req: Req) -> None:
        req = req.bind(h.live)
        before = len(h.errors.records)
        reply = h.call(exchange(h, req.encode(h.port)))
        assert len(h.errors.records) == before, h.errors.report(before)
        h.seen[f"{req.kind} {reply.status}"] += 1
        check(h, req, reply)

    fuzz()


def test_http_routes_fuzz(harness: Harness, transcripts: dict[str, str]) -> None:
    """Fuzzed paths, queries, methods and headers on every HTTP route: the contract's status,
    well-formed bodies, nothing outside streamer/static served, while a real session streams."""
    with healthy_session(harness, transcripts[HEALTHY_FILE]):
        fuzz_requests(harness, route_requests, 80)
        fuzz_requests(harness, static_requests, 60)
        fuzz_requests(harness, api_requests, 140)
    server_is_fine(harness)
    print(sorted(harness.seen.items()))
    harness.seen.clear()


def test_websocket_handshakes_fuzz(harness: Harness, transcripts: dict[str, str]) -> None:
    """The WebSocket routes asked over raw HTTP, with missing or garbage upgrade headers: 101 only
    for a valid handshake (the connection then dropped: the server forgets it), else 400/426."""
    with healthy_session(harness, transcripts[HEALTHY_FILE]):
        fuzz_requests(harness, ws_requests, 100)
    server_is_fine(harness)
    print(sorted(harness.seen.items()))
    harness.seen.clear()


# ---- strategies: malformed requests -----------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """A valid request, then one to three faults."""

    method: bytes = b"GET"
    target: bytes = b"/healthz"
    version: bytes = b"HTTP/1.1"
    headers: tuple[bytes, ...] = (b"Host: 127.0.0.1", b"Authorization: Bearer " + ADMIN.encode())
    nl: bytes = b"\r\n"  # line ends
    cut: int | float | None = None  # truncation: bytes kept, or a fraction of them
    after: bytes = b""  # after the head: a body, a pipelined request
    end: str = "complete"  # then: read (complete), half-close and read (eof), or RST (abort)

    def encode(self) -> bytes:
        data = self.nl.join([self.method + b" " + self.target + b" " + self.version, *self.headers]) + self.nl * 2 + self.after
        if self.cut is None:
            return data
        return data[: self.cut if isinstance(self.cut, int) else int(len(data) * self.cut)]

    def fault(self, what: str, value: Any) -> Raw:
        if what == "header":  # one more line, anywhere
            i, line = value
            return replace(self, headers=(*self.headers[:i], line, *self.headers[i:]))
        return replace(self, **{what: value})


raw_targets = st.sampled_from([b"/healthz", b"/v1/sessions", b"/v1/sessions?limit=1", b"/static/app.js", b"/",
                               b"/v1/stream", b"/v1/subscribe?session=*", b"/metrics", b"/v1/sessions/plain/events"])
raw_faults = st.one_of(
    st.sampled_from([b"get", b"POST", b"", b"G\x00T", b"G\xc9T", b"GET\t", b"\x16\x03\x01", b"GET GET", b"\r"])
    .map(lambda v: ("method", v)),
    st.one_of(st.sampled_from([b"*", b"", b"/\xc3\xbc", b"/\xff", b"/a b", b"/\x00", b"http://127.0.0.1/healthz", b"//[",
                               b"/static/../../etc/passwd", b"/static/%2e%2e/%2e%2e/etc/passwd", b"/static/a\x00b",
                               b"/" + b"a" * 9_000, b"/static/" + b"a" * 8_100]), st.binary(max_size=20))
    .map(lambda v: ("target", v)),
    st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.10", b"", b"HTTP/1.1 ", b"HTTP/1.1\x00",
                     b"HTTPS/1.1", b"HTTP/1", b"HTTP/1.1\r"]).map(lambda v: ("version", v)),
    st.tuples(st.integers(0, 2), st.one_of(
        st.sampled_from([b"NoColon", b"Bad Name: v", b": empty name", b"X: \x01ctl", b"X-Long: " + b"a" * 9_000, b"X:",
                         b"Transfer-Encoding: chunked", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: x",
                         b"Content-Length: 0", b"X-Latin: \xff\xfe", b" folded: continuation", b"\tX: tab", b"X\x00: nul",
                         b"Origin: \xff", b"Origin: " + ORIGIN.encode(), b"Authorization: Bearer " + SUB.encode(),
                         b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
                         b"Sec-WebSocket-Key: " + KEY.encode(), b"Sec-WebSocket-Key: " + b"A" * 8_000]),
        st.binary(max_size=24))).map(lambda v: ("header", v)),
    st.just(("headers", (b"X-A: 1",) * 130)),  # over websockets' 128
    st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]).map(lambda v: ("nl", v)),
    st.one_of(st.integers(0, 60), st.floats(0, 1)).map(lambda v: ("cut", v)),
    st.sampled_from([b"hello", b"GET /healthz HTTP/1.1\r\n\r\n", b"\x88\x80", b"\r\n" * 3]).map(lambda v: ("after", v)),
    st.sampled_from(["eof", "abort"]).map(lambda v: ("end", v)),
)
malformed = st.builds(lambda t, faults: functools.reduce(lambda r, f: r.fault(*f), faults, Raw(target=t)),
                      raw_targets, st.lists(raw_faults, min_size=1, max_size=3))


def test_malformed_requests_fuzz(harness: Harness, transcripts: dict[str, str]) -> None:
    """Bad request lines and versions, headers without a colon or too long or too many, missing
    CRLF, bodies, truncated requests, half-closes and aborts: a well-formed response (never a 500)
    or a clean close, in time, while a real session streams."""

    @settings(FUZZ, max_examples=200)
    @given(raw=malformed)
    def fuzz(raw: Raw) -> None:
        data, end = raw.encode(), raw.end
        if end == "complete" and not data.endswith(b"\r\n\r\n"):
            end = "eof"  # an incomplete request: the server must see its end (else it waits open_timeout)
        before = len(harness.errors.records)
        reply = harness.call(exchange(harness, data, end))
        assert len(harness.errors.records) == before, harness.errors.report(before)
        well_formed(reply)
        harness.seen[f"{end} {reply.status}"] += 1
        assert reply.status in {None, 101, 200, 400, 401, 403, 404, 405, 414, 426, 431, 505}, (data[:200], reply)

    with healthy_session(harness, transcripts[HEALTHY_FILE]):
        fuzz()
    server_is_fine(harness)
    print(sorted(harness.seen.items()))
    harness.seen.clear()


# ---- bugs the fuzzing found, fixed: their minimal examples stay as regression tests ---------------
ADMIN_AUTH = [("Authorization", f"Bearer {ADMIN}")]
HTTP_BUGS = {  # each was a 500 ("process_request failed" logged) before its fix
    "repeated_authorization": (request("GET", P.HEALTH_PATH, ADMIN_AUTH * 2), 400),  # Headers.get: MultipleValuesError
    "repeated_origin": (request("GET", "/v1/sessions", [*ADMIN_AUTH, ("Origin", ORIGIN), ("Origin", ORIGIN)]), 400),
    "unsplittable_target": (request("GET", "//["), 400),  # urlsplit: ValueError("Invalid IPv6 URL")
    "static_nul_byte": (request("GET", "/static/app.js\x00"), 404),  # Path.resolve: ValueError("embedded null byte")
    "static_name_too_long": (request("GET", "/static/" + "a" * 300), 404),  # Path.is_file: OSError(ENAMETOOLONG)
    "offset_over_sqlite": (request("GET", "/v1/sessions?offset=9223372036854775808", ADMIN_AUTH), 400),  # OverflowError
    "after_seq_over_sqlite": (request("GET", "/v1/sessions/plain/events?after_seq=9223372036854775808", ADMIN_AUTH), 400),
    "run_over_sqlite": (request("GET", "/v1/sessions/plain/events?run=9223372036854775808", ADMIN_AUTH), 400),
    "post_served_as_get": (request("POST", "/v1/sessions", ADMIN_AUTH), 405),  # was a 200 with the list, not a 500
}


@pytest.mark.parametrize("name", list(HTTP_BUGS))
def test_http_bug_regressions(harness: Harness, name: str) -> None:
    data, status = HTTP_BUGS[name]
    before = len(harness.errors.records)
    reply = harness.call(exchange(harness, data))
    assert not harness.errors.records[before:], harness.errors.report(before)
    assert reply.status == status, reply
    well_formed(reply)


@pytest.mark.parametrize("after", [b"hello", b"\r\n", request("GET", P.HEALTH_PATH)])
def test_bytes_after_the_request_close_cleanly(harness: Harness, after: bytes) -> None:
    """A body or a pipelined request in the same packet as the request: websockets parsed it as
    frames, failed the connection, then asserted while sending the response ("unexpected internal
    error" logged, nothing sent). Now: a clean close, nothing logged."""
    before = len(harness.errors.records)
    end = "complete" if after.endswith(b"\r\n\r\n") else "eof"
    reply = harness.call(exchange(harness, request("GET", P.HEALTH_PATH) + after, end))
    assert reply.status in (None, 200), reply  # 200: the extra bytes came in a later packet, after the response
    assert not harness.errors.records[before:], harness.errors.report(before)


def test_subscribe_after_seq_over_sqlite(harness: Harness) -> None:
    """A replay from the store (the session ran before this process) with after_seq past SQLite's
    INTEGER: the bad_request error and a policy close, like any other bad after_seq."""
    async def subscribe() -> tuple[list[dict[str, Any]], int | None]:
        got: list[dict[str, Any]] = []
        async with connect(f"{harness.url}{P.SUBSCRIBE_PATH}?session=plain&after_seq={MAX_SQL_INT + 1}&token={SUB}") as ws:
            with suppress(Exception):
                async for msg in ws:
                    got.append(json.loads(msg))
        await forgotten(harness, ws.local_address[:2])
        return got, ws.close_code

    before = len(harness.errors.records)
    events, code = harness.call(subscribe())
    assert not harness.errors.records[before:], harness.errors.report(before)
    assert code == P.CLOSE_POLICY and [e.get("code") for e in events] == [P.E_BAD_REQUEST], (code, events)
