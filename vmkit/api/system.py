"""Routes for the host, operations and the event stream."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, WebSocket, WebSocketDisconnect

from vmkit import __version__
from vmkit.api.deps import Services, services, ws_services

router = APIRouter(prefix="/v1", tags=["system"])
Svc = Annotated[Services, Depends(services)]


@router.get("")
async def root(svc: Svc) -> dict[str, Any]:
    return {"version": __version__, "accelerator": svc.host.accelerator}


@router.get("/host")
async def host(svc: Svc) -> dict[str, Any]:
    return svc.host_report


@router.get("/operations/{op_id}")
async def operation(op_id: str, svc: Svc, wait_s: Annotated[float, Query(ge=0, le=600)] = 0) -> dict[str, Any]:
    op = await svc.ops.wait(op_id, wait_s) if wait_s else svc.ops.get(op_id)
    return op.to_dict()


@router.websocket("/events")
async def events(ws: WebSocket) -> None:
    svc = ws_services(ws)
    await ws.accept()
    q = svc.bus.subscribe()
    try:
        while True:
            ev = await q.get()
            if ev is None:  # dropped for being too slow
                break
            await ws.send_json(ev)
    except (WebSocketDisconnect, asyncio.CancelledError, RuntimeError):
        pass
    finally:
        svc.bus.unsubscribe(q)
        with contextlib.suppress(Exception):
            await ws.close()
