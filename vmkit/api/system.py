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

    async def forward() -> None:
        while (ev := await q.get()) is not None:  # None: dropped for being too slow
            await ws.send_json(ev)

    async def until_closed() -> None:
        # Also read, so a client that leaves (or a daemon shutting down) ends this handler even while
        # no events flow.
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass

    tasks = [asyncio.create_task(forward()), asyncio.create_task(until_closed())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        svc.bus.unsubscribe(q)
        with contextlib.suppress(Exception):
            await ws.close()
