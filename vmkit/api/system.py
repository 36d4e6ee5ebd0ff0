"""Routes for the host, operations and the event stream."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket

from vmkit import __version__
from vmkit.api.deps import Services, services, unless_stopping, ws_services
from vmkit.api.websocket import receive_until_closed, run_until_first_done
from vmkit.host.usage import usage

router = APIRouter(prefix="/v1", tags=["system"])
Svc = Annotated[Services, Depends(services)]


@router.get("")
async def root(svc: Svc) -> dict[str, Any]:
    listen = None
    if svc.listen_url:  # the TCP listener, for `vmkit ui`'s link
        parts = urlsplit(svc.listen_url)
        listen = {"url": svc.listen_url, "scheme": parts.scheme, "host": parts.hostname, "port": parts.port}
    return {
        "version": __version__,
        "accelerator": svc.host.accelerator,
        "tls_fingerprint": svc.tls_fingerprint,
        "listen": listen,
    }


@router.get("/host")
async def host(svc: Svc) -> dict[str, Any]:
    return svc.host_report


@router.get("/host/usage")
async def host_usage(svc: Svc) -> dict[str, Any]:
    """The host's CPU counters (busy and total clock ticks: compare two readings), memory, and the state
    dir's disk (what the web UI's dashboard shows)."""
    return usage(svc.state_dir)


@router.get("/operations/{op_id}")
async def operation(
    op_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="operation id")],
    svc: Svc,
    request: Request,
    wait_s: Annotated[float, Query(ge=0, le=600)] = 0,
) -> dict[str, Any]:
    op = await unless_stopping(request, svc.ops.wait(op_id, wait_s)) if wait_s else svc.ops.get(op_id)
    return op.to_dict()


@router.websocket("/events")
async def events(ws: WebSocket) -> None:
    svc = ws_services(ws)
    await ws.accept()
    q = svc.bus.subscribe()

    async def forward() -> None:
        while (ev := await q.get()) is not None:  # None: dropped for being too slow
            await ws.send_json(ev)

    try:
        # Also reading lets a client that leaves (or a stopping daemon) end this even while no events flow.
        await run_until_first_done(ws, forward(), receive_until_closed(ws))
    finally:
        svc.bus.unsubscribe(q)
