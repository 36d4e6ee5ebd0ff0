"""Token authentication for the TCP listener, as ASGI middleware around the same app.

The UNIX socket serves the app as it is (root-only, no token); the TCP listener serves it wrapped in
TokenAuth, so no route needs to know which way a request came in.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vmkit.services.auth import TokenService

# What a read-only token may do: read over HTTP, and follow the event stream (the console writes to a guest).
READ_METHODS = {"GET", "HEAD"}
READ_WEBSOCKETS = {"/v1/events"}
TOKENS_PATH = "/v1/tokens"


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


class TokenAuth:
    def __init__(self, app: ASGIApp, auth: TokenService) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        secret = _bearer(scope)
        token = self.auth.verify(secret) if secret else None
        if token is None:
            why = "invalid or revoked token" if secret else "a token is needed: Authorization: Bearer TOKEN"
            await self._deny(scope, receive, send, 401, why)
            return
        if token.read_only:
            path = scope["path"]
            if scope["type"] == "http":
                allowed = scope["method"] in READ_METHODS and not path.startswith(TOKENS_PATH)
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
