"""Access to the page: loopback by default, a token elsewhere, CSRF on every action.

- Bound to a loopback address with no token, the page answers only requests
  whose ``Host`` names a loopback address (so a web page elsewhere cannot
  reach it through DNS rebinding).
- Bound anywhere else, a token is required (``[ui] token`` or
  ``EXCHANGE_UI_TOKEN``); the server refuses to start without one. A
  configured token is always required, whatever the address. It is accepted
  as ``Authorization: Bearer <token>``, as ``X-Exchange-Token: <token>``, or
  as the session cookie that signing in (a POST of ``/login``) sets (the cookie holds an
  HMAC of the token, never the token itself).
- Every action is a POST carrying a CSRF token from a hidden form field: a
  timestamp and an HMAC of it (and of the session) under a secret made when
  the process starts. A missing, wrong or stale token gets 403.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time

from exchange.errors import ConfigError

COOKIE = "exchange_ui"
TOKEN_ENV = "EXCHANGE_UI_TOKEN"
MIN_TOKEN_LENGTH = 16
CSRF_MAX_AGE = 24 * 3600


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a (long enough) token."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"the page's token is too short ({len(token)} characters, at least "
                          f"{MIN_TOKEN_LENGTH} needed)",
                          hint='Make one with: python -c "import secrets; print(secrets.token_urlsafe())"')
    if not is_loopback(host) and not token:
        raise ConfigError(f"refusing to serve the Data Exchange page on {host} without a token",
                          hint=f"Set [ui] token in exchange.toml or {TOKEN_ENV}, or serve on 127.0.0.1.")


def host_allowed(host_header: str) -> bool:
    """For a loopback-bound page: the request's Host must be a loopback name too."""
    h = host_header.strip()
    if h.startswith("["):
        name = h[1:h.find("]")] if "]" in h else h[1:]
    else:
        name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return is_loopback(name)


class Guard:
    """The token check and the CSRF tokens of one server process."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.secret = secrets.token_bytes(32)

    # ------------------------------------------------------------ access token

    def session_value(self) -> str:
        """The cookie value that proves the token was given (an HMAC of it)."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"exchange-ui-session", hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return bool(self.token) and given is not None and hmac.compare_digest(
            given.encode(), (self.token or "").encode())

    def authorized(self, headers: dict[str, str], cookie: str | None) -> bool:
        if not self.token:
            return True
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self.token_ok(auth[7:].strip()):
            return True
        if self.token_ok(headers.get("x-exchange-token")):
            return True
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.session_value().encode())

    # ------------------------------------------------------------ CSRF

    def _mac(self, stamp: str, session: str) -> str:
        return hmac.new(self.secret, f"{stamp}|{session}".encode(), hashlib.sha256).hexdigest()

    def csrf_token(self, session: str = "") -> str:
        stamp = str(int(time.time()))
        return f"{stamp}.{self._mac(stamp, session)}"

    def csrf_ok(self, given: str | None, session: str = "") -> bool:
        if not given or "." not in given:
            return False
        stamp, mac = given.split(".", 1)
        if not stamp.isdigit() or time.time() - int(stamp) > CSRF_MAX_AGE:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(stamp, session).encode())
