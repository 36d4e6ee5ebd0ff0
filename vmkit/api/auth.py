"""Token authentication for the TCP listener, as ASGI middleware around the same app.

The UNIX socket serves the app as it is (root-only, no token); the TCP listener serves it wrapped in
TokenAuth, so no route needs to know which way a request came in.

A browser (the web UI) logs in once at POST /v1/session and is then known by its session cookie instead of a
header: every request but GET/HEAD must then echo the CSRF cookie in X-CSRF-Token, and a websocket must come
from a page of this same host (Origin), since a browser sends the cookie whoever opened the socket. The login
page and its files (/ui/...), the redirect at / and the login itself are the only things served without auth.
"""

from __future__ import annotations

import hmac
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vmkit.services.auth import TokenService
from vmkit.services.sessions import CSRF_HEADER, SESSION_COOKIE, Sessions

AUTH_SCOPE_KEY = "vmkit_auth"  # scope["state"][...]: who the caller is, for GET /v1/session (api/ui.py)

# What a read-only token may do: read over HTTP, and follow the event stream (the console writes to a guest).
READ_METHODS = {"GET", "HEAD"}
READ_WEBSOCKETS = {"/v1/events"}
TOKENS_PATH = "/v1/tokens"
SESSION_PATH = "/v1/session"


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, secret = value.decode("latin-1").partition(" ")
            return secret.strip() if scheme.lower() == "bearer" else None
    if scope["type"] == "websocket":  # browsers cannot set headers on a websocket: ?token= there only
        for part in scope.get("query_string", b"").decode("latin-1").split("&"):
            key, _, value = part.partition("=")
            if key == "token" and value:
                return value
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _public(scope: Scope) -> bool:
    """What a browser must reach before it has a session: the UI's files and the login."""
    if scope["type"] != "http":
        return False
    path, method = scope["path"], scope["method"]
    if path == SESSION_PATH:
        return method == "POST"
    return method in READ_METHODS and (path in ("/", "/ui") or path.startswith("/ui/"))


def _same_origin(scope: Scope) -> bool:
    """A websocket's Origin names this very host (scheme aside: the listener has one)."""
    origin, host = _header(scope, b"origin"), _header(scope, b"host")
    if not origin or not host:
        return False
    return hmac.compare_digest(urlsplit(origin).netloc.lower().encode(), host.lower().encode())


def is_remote(scope: Scope) -> bool:
    """Whether the request came over the TCP listener (it passed TokenAuth), not the local UNIX socket."""
    return AUTH_SCOPE_KEY in scope.get("state", {})


class TokenAuth:
    def __init__(self, app: ASGIApp, auth: TokenService, sessions: Sessions | None = None) -> None:
        self.app = app
        self.auth = auth
        self.sessions = sessions if sessions is not None else Sessions()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if _public(scope):
            await self.app(scope, receive, send)
            return
        secret = _bearer(scope)
        sid = None if secret else _cookie(scope, SESSION_COOKIE)
        if sid:
            session = self.sessions.get(sid)
            if session is not None and session.token is not None and not self.auth.exists(session.token):
                self.sessions.end(sid)  # its token was revoked
                session = None
            if session is None:
                await self._deny(scope, receive, send, 401, "session expired or ended: log in again")
                return
            changes = scope["type"] == "http" and scope["method"] not in READ_METHODS
            if changes and not session.csrf_ok(_header(scope, CSRF_HEADER.encode())):
                await self._deny(scope, receive, send, 403, "CSRF check failed: send X-CSRF-Token")
                return
            if scope["type"] == "websocket" and not _same_origin(scope):
                await self._deny(scope, receive, send, 403, "websocket from another origin")
                return
            via, name, read_only = "session", session.token, session.read_only
        else:
            token = self.auth.verify(secret) if secret else None
            if token is None:
                why = "invalid or revoked token" if secret else "a token is needed: Authorization: Bearer TOKEN"
                await self._deny(scope, receive, send, 401, why)
                return
            via, name, read_only = "token", token.name, token.read_only
        scope.setdefault("state", {})[AUTH_SCOPE_KEY] = {"via": via, "token": name, "read_only": read_only}
        if read_only:
            path = scope["path"]
            if scope["type"] == "http":
                allowed = scope["method"] in READ_METHODS and not path.startswith(TOKENS_PATH)
                allowed = allowed or (path == SESSION_PATH and scope["method"] == "DELETE")  # logging out
            else:
                allowed = path in READ_WEBSOCKETS
            if not allowed:
                await self._deny(scope, receive, send, 403, "read-only token")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _deny(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        # On a websocket scope Starlette sends this as the handshake's HTTP answer (websocket.http.response).
        await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)
