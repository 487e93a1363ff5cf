"""API tokens with roles, and a browser Origin allow-list, checked before any data flows.

Tokens come from `--token` (role admin), the EMOSTREAM_TOKEN environment variable (admin), or a
token file, one `TOKEN ROLE[,ROLE...]` per line (`#` comments). Clients send
`Authorization: Bearer TOKEN` or, where headers cannot be set (browsers), `?token=TOKEN`.
Twilio cannot send either on its WebSocket: it passes the token as a `<Parameter name="token">`,
checked on the `start` message before any audio is processed.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from streamer import protocol as P

SOURCE, SUBSCRIBER, ADMIN = "source", "subscriber", "admin"
ROLES = (SOURCE, SUBSCRIBER, ADMIN)
OPEN_PATHS = (P.HEALTH_PATH, "/", "/index.html")  # load balancers and the dashboard page itself


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (token, roles); empty: no auth (loopback use)
    allowed_origins: tuple[str, ...] = ()  # empty: any Origin; else browsers must come from one of these
    certfile: Path | None = None  # TLS (wss://, https://)
    keyfile: Path | None = None

    def __post_init__(self) -> None:
        for token, roles in self.tokens:
            if len(token) < 8:
                raise ValueError("API tokens must be at least 8 characters")
            bad = set(roles) - set(ROLES)
            if bad or not roles:
                raise ValueError(f"unknown roles {sorted(bad)}; roles are {', '.join(ROLES)}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("TLS needs both --certfile and --keyfile")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def roles(self, token: str | None) -> tuple[str, ...] | None:
        """The token's roles, or None for an unknown token (constant-time comparison)."""
        if not isinstance(token, str) or not token:  # e.g. a Twilio customParameters token that is not a string
            return None
        found = None
        for known, roles in self.tokens:
            if hmac.compare_digest(known.encode(), token.encode("utf-8", "surrogatepass")):  # JSON may carry lone surrogates
                found = roles
        return found


def load_token_file(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'TOKEN ROLE[,ROLE]'")
        out.append((parts[0], tuple(r.strip() for r in parts[1].split(",") if r.strip())))
    return out


def required_role(path: str) -> str | None:
    """The role a path needs; None for open paths."""
    if path in OPEN_PATHS or path.startswith("/static/"):
        return None
    if path in (P.STREAM_PATH, P.TWILIO_PATH, P.LISTEN_PATH):
        return SOURCE
    if path == P.METRICS_PATH:
        return ADMIN
    return SUBSCRIBER  # /v1/subscribe, /v1/sessions...


def request_token(raw_path: str, authorization: str | None) -> str | None:
    """`Authorization: Bearer TOKEN` (or `Token TOKEN`, Deepgram's scheme), else `?token=`."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() in ("bearer", "token") and token.strip():
        return token.strip()
    return parse_qs(urlsplit(raw_path).query).get("token", [None])[0]


def check(config: AuthConfig, raw_path: str, authorization: str | None, origin: str | None) -> tuple[HTTPStatus, str] | None:
    """None when the request may proceed, else (status, reason). Twilio's route defers a missing
    token to its start message (Twilio cannot send headers)."""
    if origin is not None and config.allowed_origins and origin not in config.allowed_origins:
        return HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed"
    path = urlsplit(raw_path).path
    need = required_role(path)
    if not config.enabled or need is None:
        return None
    token = request_token(raw_path, authorization)
    if token is None and path == P.TWILIO_PATH:
        return None  # checked on `start` (customParameters.token)
    roles = config.roles(token)
    if roles is None:
        return HTTPStatus.UNAUTHORIZED, "missing or unknown API token (Authorization: Bearer TOKEN, or ?token=)"
    if need not in roles and ADMIN not in roles:
        return HTTPStatus.FORBIDDEN, f"this token lacks the '{need}' role"
    return None


def token_allows(config: AuthConfig, token: str | None, role: str) -> bool:
    if not config.enabled:
        return True
    roles = config.roles(token)
    return roles is not None and (role in roles or ADMIN in roles)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
