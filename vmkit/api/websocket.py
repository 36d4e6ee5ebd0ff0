"""Shared shape of vmkit's websocket handlers: a few coroutines pumping data, ended together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from vmkit.errors import VmkitError

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


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


async def bridge(ws: WebSocket, opener: AbstractAsyncContextManager[Stream], *, subprotocol: str | None = None) -> None:
    """Binary frames both ways between ws and the stream `opener` yields (a serial port, a VNC client), until
    either side closes. A VmkitError from opening closes ws with code 4000 + its HTTP status and the reason:
    ws is accepted first, since a refused handshake carries no body."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            reader, writer = await stack.enter_async_context(opener)
        except VmkitError as e:
            await ws.accept(subprotocol=subprotocol)
            await ws.close(code=4000 + e.status, reason=e.message[:120])
            return
        await ws.accept(subprotocol=subprotocol)

        async def to_client() -> None:
            while data := await reader.read(65536):
                await ws.send_bytes(data)

        async def to_stream() -> None:
            while (msg := await ws.receive())["type"] != "websocket.disconnect":
                writer.write(msg.get("bytes") or (msg.get("text") or "").encode())
                await writer.drain()

        await run_until_first_done(ws, to_client(), to_stream())
