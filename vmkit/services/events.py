"""In-process event bus: services publish, websocket clients subscribe.

A slow subscriber never blocks publishers: its queue is bounded and it is dropped when full (its
websocket is then closed, and the client reconnects and re-reads state).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

QUEUE_LEN = 1024


class EventBus:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_LEN)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subs.discard(q)

    def publish(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "timestamp": time.time(), **data}
        for q in list(self._subs):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self._subs.discard(q)
                # Make room for the end-of-stream marker so the reader learns it was dropped.
                q.get_nowait()
                q.put_nowait(None)
