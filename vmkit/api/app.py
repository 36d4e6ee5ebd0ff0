"""The FastAPI application: routers plus the mapping from vmkit errors to HTTP answers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmkit import __version__
from vmkit.api import (
    clones,
    cloudinit,
    consoles,
    images,
    metrics,
    migrations,
    networks,
    pools,
    remotes,
    snapshots,
    system,
    tokens,
    ui,
    vms,
    vmsave,
    volumes,
)
from vmkit.api.deps import STOPPING_MESSAGE, Services
from vmkit.errors import VmkitError

log = logging.getLogger(__name__)

_ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {"error": {"title": "Error", "type": "string"}},
    "required": ["error"],
}
_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def _document_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """Say in the OpenAPI document what the handlers below answer: a bad request is 400, not FastAPI's 422, and
    every error (404 unknown, 409 wrong state, 502 QEMU or guest agent failed, 504 timed out, ...) is {"error"}."""
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for item in doc.get("paths", {}).values():
        for method, op in item.items():
            if method not in _METHODS:
                continue
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {"description": "Invalid request", "content": ref}
            responses.setdefault("default", {"description": "Error", "content": ref})
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = _ERROR_SCHEMA
    return doc


class _App(FastAPI):
    def openapi(self) -> dict[str, Any]:
        if not self.openapi_schema:
            self.openapi_schema = _document_errors(super().openapi())
        return self.openapi_schema


class _CancelledAtStop:
    """When the daemon stops, uvicorn cancels the requests still running after its grace period. Answer those
    503 (if nothing was sent yet) instead of letting the cancellation end up as a logged traceback and a bare 500."""

    def __init__(self, app: ASGIApp, stopping: asyncio.Event) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                raise
            # The task ends here either way; a response already under way is cut short by uvicorn.
            if not started:
                await JSONResponse({"error": STOPPING_MESSAGE}, status_code=503)(scope, receive, send)


def create_app(svc: Services) -> FastAPI:
    app = _App(title="vmkit", version=__version__, docs_url=None, redoc_url=None)
    app.state.services = svc
    # Set by the daemon when it starts to stop (see vmkit.api.deps.unless_stopping).
    app.state.stopping = stopping = asyncio.Event()
    app.add_middleware(_CancelledAtStop, stopping=stopping)

    @app.exception_handler(VmkitError)
    async def _vmkit_error(_: Request, exc: VmkitError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (unknown path, wrong method) in the same shape as every other error.
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: keep the daemon up, log the traceback, give the client something readable.
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=400)

    app.include_router(system.router)
    app.include_router(vms.router)
    app.include_router(snapshots.router)
    app.include_router(vmsave.router)
    app.include_router(clones.router)
    app.include_router(cloudinit.router)
    # Before any mount at /ui: its /ui/vendor/ route must be matched first.
    app.include_router(consoles.router)
    app.include_router(images.router)
    app.include_router(pools.router)
    app.include_router(networks.router)
    app.include_router(volumes.router)
    app.include_router(metrics.router)
    app.include_router(tokens.router)
    app.include_router(remotes.router)
    app.include_router(migrations.router)
    app.include_router(ui.router)
    ui.mount_static(app)  # last: a mount at /ui takes every path below it
    return app
