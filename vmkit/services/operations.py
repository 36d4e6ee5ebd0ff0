"""Long-running work as operations: an id returned at once, progress and completion as events.

Operations live in memory: after a daemon restart the work they stood for is either finished (its result
is persisted by the service that did it) or safely re-startable, so nothing needs their records.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vmkit.errors import NotFound, VmkitError
from vmkit.services.events import EventBus
from vmkit.util.tasks import TaskSet

Progress = Callable[[float, str], None]


@dataclass
class Operation:
    id: str
    kind: str
    status: str = "running"  # running | success | failure
    progress: float = 0.0
    message: str = ""
    result: Any = None
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "message": self.message,
            "result": self.result,
            "error": self.error,
        }


class Operations:
    KEEP = 100  # finished operations remembered for late readers

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._ops: dict[str, Operation] = {}
        self._tasks = TaskSet()

    def start(self, kind: str, work: Callable[[Progress], Awaitable[Any]]) -> Operation:
        op = Operation(id=uuid.uuid4().hex, kind=kind)
        self._ops[op.id] = op
        loop = asyncio.get_running_loop()

        def progress(fraction: float, message: str) -> None:
            # May be called from a worker thread.
            loop.call_soon_threadsafe(self._progress, op, fraction, message)

        async def runner() -> None:
            try:
                op.result = await work(progress)
                op.status, op.progress = "success", 1.0
            except VmkitError as e:
                op.status, op.error = "failure", e.message
            except Exception as e:  # noqa: BLE001 - reported to the client, daemon keeps running
                op.status, op.error = "failure", f"{type(e).__name__}: {e}"
            op.done.set()
            self._bus.publish("operation", operation=op.to_dict())
            self._trim()

        self._tasks.spawn(runner())
        self._bus.publish("operation", operation=op.to_dict())
        return op

    def _progress(self, op: Operation, fraction: float, message: str) -> None:
        if op.status == "running":
            op.progress, op.message = fraction, message
            self._bus.publish("operation", operation=op.to_dict())

    def _trim(self) -> None:
        finished = [o for o in self._ops.values() if o.done.is_set()]
        for o in finished[: max(0, len(finished) - self.KEEP)]:
            del self._ops[o.id]

    def get(self, op_id: str) -> Operation:
        try:
            return self._ops[op_id]
        except KeyError:
            raise NotFound(f"no operation {op_id}") from None

    async def wait(self, op_id: str, timeout_s: float) -> Operation:
        op = self.get(op_id)
        try:
            await asyncio.wait_for(asyncio.shield(op.done.wait()), timeout_s)
        except TimeoutError:
            pass
        return op
