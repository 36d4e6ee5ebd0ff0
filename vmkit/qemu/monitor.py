"""The one QMP monitor: a thin typed layer over qemu.qmp (QEMU's own client library).

Each QMP command is a short method. Events are delivered to one callback, apart from replies: QEMU may send
SHUTDOWN before the reply to `quit`, and the caller must see both. All traffic is appended to a per-VM log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.message import Message

# QMP event names vmkit reacts to.
EV_SHUTDOWN = "SHUTDOWN"
EV_RESET = "RESET"
EV_STOP = "STOP"
EV_RESUME = "RESUME"
EV_POWERDOWN = "POWERDOWN"
EV_SUSPEND = "SUSPEND"
EV_WAKEUP = "WAKEUP"
EV_GUEST_PANICKED = "GUEST_PANICKED"
EV_VSERPORT_CHANGE = "VSERPORT_CHANGE"

EventHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class _LoggingClient(QMPClient):
    """QMPClient that appends every message to a file (the per-VM QMP log)."""

    def __init__(self, name: str, log_path: Path | None) -> None:
        super().__init__(name)
        self._log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - closed in close()

    def _write(self, arrow: str, msg: Message) -> None:
        if self._log and not self._log.closed:
            self._log.write(f"{time.time():.6f} {arrow} {json.dumps(dict(msg), separators=(',', ':'))}\n")

    def _cb_outbound(self, msg: Message) -> Message:
        self._write("->", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        self._write("<-", msg)
        return msg

    def close_log(self) -> None:
        if self._log:
            self._log.close()


class Monitor:
    """A connected QMP session to one QEMU."""

    def __init__(self, name: str, *, log_path: Path | None = None) -> None:
        self._client = _LoggingClient(name, log_path)
        self._event_task: asyncio.Task[None] | None = None
        # QEMU keeps only the last descriptor received until a `getfd` names it: one hand-over at a time.
        self._fd_lock = asyncio.Lock()
        self._fd_names = itertools.count()

    async def connect(self, sock: Path, on_event: EventHandler, *, timeout_s: float = 5.0) -> None:
        """Connect and negotiate capabilities, then start delivering events to on_event."""
        await asyncio.wait_for(self._client.connect(str(sock)), timeout_s)
        self._event_task = asyncio.create_task(self._pump(on_event))

    async def _pump(self, on_event: EventHandler) -> None:
        async for event in self._client.events:
            data: dict[str, Any] = event.get("data", {})  # type: ignore[assignment]
            result = on_event(str(event["event"]), dict(data))
            if result is not None:
                await result

    async def close(self) -> None:
        if self._event_task:
            self._event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._event_task
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        self._client.close_log()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float = 10.0) -> Any:
        return await asyncio.wait_for(self._client.execute(cmd, args), timeout_s)

    async def query_status(self) -> str:
        """QEMU's run state: 'running', 'paused', 'prelaunch', 'shutdown', 'internal-error', …"""
        return str((await self.execute("query-status"))["status"])

    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def system_powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def system_reset(self) -> None:
        await self.execute("system_reset")

    async def quit(self) -> None:
        await self.execute("quit")

    async def chardev_frontend_open(self, chardev_id: str) -> bool:
        """Whether the guest has the device behind chardev_id open (for qga0: the agent is listening)."""
        for dev in await self.execute("query-chardev"):
            if dev.get("label") == chardev_id:
                return bool(dev.get("frontend-open"))
        return False

    async def block_set_io_throttle(self, qdev: str, *, iops_total: int, bps_total: int, group: str) -> None:
        """Throttle a disk's block backend (0 = unlimited), as a member of throttle group `group`."""
        args = {"id": qdev, "iops": iops_total, "bps": bps_total, "group": group}
        await self.execute("block_set_io_throttle", args | dict.fromkeys(_UNUSED_THROTTLE, 0))

    async def query_block(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-block"))

    async def query_blockstats(self, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """I/O counters per block backend: each entry has `qdev` (the device's QOM path), `node-name` and
        `stats` (rd_bytes, wr_bytes, rd_operations, wr_operations, flush_operations, *_total_time_ns, ...)."""
        return list(await self.execute("query-blockstats", timeout_s=timeout_s))

    async def add_vnc_client(self, sock: socket.socket, *, timeout_s: float = 10.0) -> None:
        """Make `sock` (one end of a connected pair) a client of QEMU's VNC server, which has no listener of its
        own. The daemon has authenticated the caller, so QEMU skips VNC auth. QEMU keeps a duplicate: the caller
        still closes its copy."""
        async with self._fd_lock:
            fdname = f"vnc{next(self._fd_names)}"
            await self._send_fd(sock.fileno())
            await self.execute("getfd", {"fdname": fdname}, timeout_s=timeout_s)
            try:
                args = {"protocol": "vnc", "fdname": fdname, "skipauth": True}
                await self.execute("add_client", args, timeout_s=timeout_s)
            except BaseException:
                # add_client consumes the named fd only when it succeeds.
                with contextlib.suppress(Exception):
                    await self.execute("closefd", {"fdname": fdname}, timeout_s=timeout_s)
                raise

    async def _send_fd(self, fd: int) -> None:
        """Pass fd by SCM_RIGHTS. send_fd_scm writes one byte straight to the socket, beside asyncio's buffer:
        wait until no earlier command is still half-written there, so the byte never lands inside one."""
        writer = self._client._writer  # qemu.qmp offers no public flush
        while writer is not None and writer.transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        self._client.send_fd_scm(fd)


# block_set_io_throttle requires the read/write split even when only totals are used.
_UNUSED_THROTTLE = ("bps_rd", "bps_wr", "iops_rd", "iops_wr")
