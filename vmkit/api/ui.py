"""The web UI: its static files at /ui/ (served by the daemon itself, no second server) and /v1/session, the
browser's login (a session cookie, see services/sessions.py; the TCP listener's TokenAuth checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmkit.api.auth import AUTH_SCOPE_KEY
from vmkit.api.deps import Services, services
from vmkit.errors import InvalidInput
from vmkit.services.sessions import CSRF_COOKIE, SESSION_COOKIE

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
STATIC_DIR = UI_DIR / "static"
# The pages load nothing from elsewhere and no inline script; the API and websockets are same-origin.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
        b"style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),  # revalidated each load (ETag): an upgraded daemon serves the new UI at once
]

router = APIRouter(tags=["session"])
Svc = Annotated[Services, Depends(services)]


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    token: Annotated[str | None, Field(max_length=512, description="an API token's secret")] = None
    code: Annotated[str | None, Field(max_length=512, description="the one-time code of a `vmkit ui` link")] = None


class SessionInfo(BaseModel):
    via: str = Field(description="unix (the local socket), token (Authorization header) or session (cookie)")
    token: str | None = Field(description="the API token's name; null on the UNIX socket or from a login link")
    read_only: bool


class LoginLinkInfo(BaseModel):
    code: str = Field(description="one use, within five minutes: /ui/#/login?code=CODE on the TCP listener")
    expires_at: float


def caller(request: Request) -> SessionInfo:
    auth: dict[str, Any] | None = request.scope.get("state", {}).get(AUTH_SCOPE_KEY)
    if auth is None:
        return SessionInfo(via="unix", token=None, read_only=False)
    return SessionInfo(**auth)


@router.get("/v1/session")
async def get_session(request: Request) -> SessionInfo:
    """Who the caller is and whether it may change anything (the UI hides what a read-only token cannot do)."""
    return caller(request)


@router.post("/v1/session")
async def login(req: Login, request: Request, svc: Svc) -> JSONResponse:
    """Log a browser in with an API token or a `vmkit ui` login code: sets the session cookie (HttpOnly,
    SameSite=Strict, Secure over TLS) and the CSRF cookie, whose value goes in X-CSRF-Token on every change."""
    if (req.token is None) == (req.code is None):
        raise InvalidInput("give either token or code")
    if req.token is not None:
        token = svc.auth.verify(req.token)
        if token is None:
            return JSONResponse({"error": "wrong token: invalid or revoked"}, status_code=401)
        sid, session = svc.sessions.create(token=token.name, read_only=token.read_only)
    else:
        assert req.code is not None
        if not svc.sessions.redeem(req.code):
            return JSONResponse({"error": "this login link is used up or expired: run `vmkit ui` again"}, 401)
        sid, session = svc.sessions.create(token=None, read_only=False)
    info = SessionInfo(via="session", token=session.token, read_only=session.read_only)
    resp = JSONResponse(info.model_dump())
    secure = request.url.scheme == "https"
    resp.set_cookie(SESSION_COOKIE, sid, path="/", httponly=True, samesite="strict", secure=secure)
    resp.set_cookie(CSRF_COOKIE, session.csrf, path="/", httponly=False, samesite="strict", secure=secure)
    return resp


@router.delete("/v1/session", status_code=204)
async def logout(request: Request, svc: Svc) -> Response:
    """End the browser's session (the cookies are cleared)."""
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        svc.sessions.end(sid)
    resp = Response(status_code=204)
    secure = request.url.scheme == "https"
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=secure)
    resp.delete_cookie(CSRF_COOKIE, path="/", samesite="strict", secure=secure)
    return resp


@router.post("/v1/session/links", status_code=201)
async def login_link(svc: Svc) -> LoginLinkInfo:
    """A one-time login code for the web UI with full rights (what `vmkit ui` prints as a link)."""
    link = svc.sessions.link()
    return LoginLinkInfo(code=link.code, expires_at=link.expires_at)


@router.get("/", include_in_schema=False)
async def root_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui", include_in_schema=False)
async def ui_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


class _Headers:
    """Adds SECURITY_HEADERS to every answer of the static files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_)


def mount_static(app: FastAPI) -> None:
    """The pages at /ui/ (mounted last: api/consoles.py's /ui/vendor/ route is matched before it)."""
    app.mount("/ui", _Headers(StaticFiles(directory=STATIC_DIR, html=True, check_dir=False)), name="ui")
