"""Shared shape of vmkit's websocket handlers: a few coroutines pumping data, ended together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect


async def receive_until_closed(ws: WebSocket) -> None:
    """Read and drop client messages until the client (or a stopping server) closes the socket."""
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


async def run_until_first_done(ws: WebSocket, *pumps: Coroutine[Any, Any, None]) -> None:
    """Run the pumps until one ends (a side closed, or a stream ran dry), then stop the rest and close ws."""
    tasks = [asyncio.create_task(p) for p in pumps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await ws.close()
