"""The one QMP monitor: a thin typed layer over qemu.qmp (QEMU's own client library).

Each QMP command is a short method. Events are delivered to one callback, apart from replies: QEMU may send
SHUTDOWN before the reply to `quit`, and the caller must see both. A caller may also await one event
(`expect_event`, e.g. DEVICE_DELETED after device_del): waiters see each event before the callback does.
All traffic is appended to a per-VM log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
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
EV_DEVICE_DELETED = "DEVICE_DELETED"  # data: device (its id, when it has one) and path (QOM path)
EV_DEVICE_TRAY_MOVED = "DEVICE_TRAY_MOVED"
EV_JOB_STATUS_CHANGE = "JOB_STATUS_CHANGE"  # data: id, status (created, running, …, concluded, null)

EventHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]
EventMatch = Callable[[dict[str, Any]], bool]


class EventWaiter:
    """One awaited event, registered before the command that causes it is sent (see Monitor.expect_event)."""

    def __init__(self, name: str, match: EventMatch | None, future: asyncio.Future[dict[str, Any]]) -> None:
        self.name = name
        self.match = match
        self.future = future

    async def wait(self, timeout_s: float) -> dict[str, Any]:
        """The event's data; TimeoutError when it has not come within timeout_s."""
        return await asyncio.wait_for(asyncio.shield(self.future), timeout_s)


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
        self._waiters: list[EventWaiter] = []

    async def connect(self, sock: Path, on_event: EventHandler, *, timeout_s: float = 5.0) -> None:
        """Connect and negotiate capabilities, then start delivering events to on_event."""
        await asyncio.wait_for(self._client.connect(str(sock)), timeout_s)
        self._event_task = asyncio.create_task(self._pump(on_event))

    async def _pump(self, on_event: EventHandler) -> None:
        async for event in self._client.events:
            name = str(event["event"])
            data: dict[str, Any] = event.get("data", {})  # type: ignore[assignment]
            self._deliver(name, dict(data))
            result = on_event(name, dict(data))
            if result is not None:
                await result

    def _deliver(self, name: str, data: dict[str, Any]) -> None:
        for w in list(self._waiters):
            if w.name != name or w.future.done():
                continue
            try:
                matched = w.match is None or w.match(data)
            except Exception as e:  # a broken predicate fails its own waiter, not the event pump
                w.future.set_exception(e)
                continue
            if matched:
                w.future.set_result(data)

    @contextlib.contextmanager
    def expect_event(self, name: str, match: EventMatch | None = None) -> Iterator[EventWaiter]:
        """Register for the next event `name` whose data satisfies match, for the duration of the block.
        Register before sending the command that triggers it, so a quick event is never missed:

            with mon.expect_event(EV_DEVICE_DELETED, lambda d: d.get("device") == "disk1-dev") as ev:
                await mon.device_del("disk1-dev")
                await ev.wait(30)
        """
        waiter = EventWaiter(name, match, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            yield waiter
        finally:
            self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()

    async def wait_event(self, name: str, match: EventMatch | None = None, *, timeout_s: float) -> dict[str, Any]:
        """Await the next matching event from now on (TimeoutError after timeout_s). To await the effect of a
        command, use expect_event around it instead."""
        with self.expect_event(name, match) as waiter:
            return await waiter.wait(timeout_s)

    async def close(self) -> None:
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(ConnectionError("the QMP connection was closed"))
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

    # ----- hot-plug: descriptors, block nodes, devices, removable media ---------------------------------
    async def getfd(self, fd: int, fdname: str, *, timeout_s: float = 10.0) -> None:
        """Pass fd to QEMU under the name fdname (for netdev_add fd=…). QEMU keeps a duplicate."""
        async with self._fd_lock:
            await self._send_fd(fd)
            await self.execute("getfd", {"fdname": fdname}, timeout_s=timeout_s)

    async def closefd(self, fdname: str) -> None:
        await self.execute("closefd", {"fdname": fdname})

    async def netdev_add(self, args: dict[str, Any]) -> None:
        await self.execute("netdev_add", args)

    async def netdev_del(self, netdev_id: str) -> None:
        await self.execute("netdev_del", {"id": netdev_id})

    async def add_fd(self, fd: int, *, opaque: str, fdset_id: int | None = None, timeout_s: float = 10.0) -> int:
        """Pass fd to QEMU into a new fdset (opened later as /dev/fdset/N), or into fdset `fdset_id`; returns N.
        opaque labels the fdset in query-fdsets (vmkit writes the node name that opens it). QEMU keeps a
        duplicate. QEMU picks a set's descriptor by access mode: a read-write one added to the set of a read-only
        image lets QEMU reopen that image read-write (block-stream into it)."""
        args: dict[str, Any] = {"opaque": opaque}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        async with self._fd_lock:
            await self._send_fd(fd)
            ret = await self.execute("add-fd", args, timeout_s=timeout_s)
        return int(ret["fdset-id"])

    async def remove_fd(self, fdset_id: int) -> None:
        """Drop an fdset; QEMU closes its descriptors once no block node uses them any more."""
        await self.execute("remove-fd", {"fdset-id": fdset_id})

    async def query_fdsets(self) -> list[dict[str, Any]]:
        """[{"fdset-id": N, "fds": [{"fd": M, "opaque": "disk1"}, …]}, …]"""
        return list(await self.execute("query-fdsets"))

    async def blockdev_add(self, args: dict[str, Any]) -> None:
        await self.execute("blockdev-add", args)

    async def blockdev_del(self, node: str) -> None:
        await self.execute("blockdev-del", {"node-name": node})

    async def query_named_block_nodes(self) -> list[dict[str, Any]]:
        """Every named block node, each once (flat): the nodes behind each node are listed on their own."""
        return list(await self.execute("query-named-block-nodes", {"flat": True}))

    async def device_add(self, args: dict[str, Any]) -> None:
        await self.execute("device_add", args)

    async def device_del(self, qdev_id: str) -> None:
        """Ask for the device's removal. For a PCIe device the guest must acknowledge first: QEMU answers at
        once and sends DEVICE_DELETED when the device is gone (expect_event before calling this)."""
        await self.execute("device_del", {"id": qdev_id})

    async def query_pci(self) -> list[dict[str, Any]]:
        """PCI buses as the guest numbered them (devices behind a bridge are listed once its bus has a number)."""
        return list(await self.execute("query-pci"))

    async def qom_list(self, path: str) -> list[dict[str, Any]]:
        """The properties of a QOM object: [{"name": …, "type": "child<virtio-blk-pci>" | "link<…>" | …}]."""
        return list(await self.execute("qom-list", {"path": path}))

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def blockdev_open_tray(self, qdev_id: str, *, force: bool = True) -> None:
        """Open a drive's tray. force opens it even when the guest has locked it (otherwise QEMU only asks the
        guest to eject)."""
        await self.execute("blockdev-open-tray", {"id": qdev_id, "force": force})

    async def blockdev_remove_medium(self, qdev_id: str) -> None:
        """Take the medium out of an open tray (nothing to do for an empty one)."""
        await self.execute("blockdev-remove-medium", {"id": qdev_id})

    async def blockdev_insert_medium(self, qdev_id: str, node: str) -> None:
        """Put node into the drive's open, empty tray."""
        await self.execute("blockdev-insert-medium", {"id": qdev_id, "node-name": node})

    async def blockdev_close_tray(self, qdev_id: str) -> None:
        await self.execute("blockdev-close-tray", {"id": qdev_id})

    # ----- snapshots and block jobs -------------------------------------------------------------------
    async def transaction(self, actions: list[dict[str, Any]]) -> None:
        """Run the actions ({"type": …, "data": …}) all or none."""
        await self.execute("transaction", {"actions": actions})

    async def run_job(self, cmd: str, args: dict[str, Any], *, timeout_s: float) -> None:
        """Start a job (snapshot-save, block-stream, …; args carry its job-id) and wait until it has concluded,
        then dismiss it. Raises JobFailed with QEMU's reason when it failed; TimeoutError after timeout_s (the
        job goes on in QEMU: `await_job` can wait for it again)."""
        job_id = str(args["job-id"])
        with self.expect_event(EV_JOB_STATUS_CHANGE, _concluded(job_id)) as done:
            await self.execute(cmd, {**args, "auto-dismiss": False} if cmd.startswith("block-") else args)
            await done.wait(timeout_s)
        await self._dismiss(job_id)

    async def run_active_commit(self, args: dict[str, Any], *, timeout_s: float) -> None:
        """block-commit of the active layer (args carry job-id, device, base-node): once the base has caught up
        (the job is ready) the job is completed, so the base becomes the disk's active layer again. Raises
        JobFailed or TimeoutError as run_job."""
        job_id = str(args["job-id"])
        with (
            self.expect_event(EV_JOB_STATUS_CHANGE, lambda d: d.get("id") == job_id and d.get("status") in
                              ("ready", "concluded")) as ready,
            self.expect_event(EV_JOB_STATUS_CHANGE, _concluded(job_id)) as done,
        ):  # fmt: skip
            await self.execute("block-commit", {**args, "auto-dismiss": False})
            if (await ready.wait(timeout_s)).get("status") == "ready":
                await self.execute("job-complete", {"id": job_id})
            await done.wait(timeout_s)
        await self._dismiss(job_id)

    async def await_job(self, job_id: str, *, timeout_s: float) -> bool:
        """Wait for a job started earlier (by a daemon that died since) to conclude and dismiss it; False when
        QEMU has no such job. Raises JobFailed as run_job."""
        with self.expect_event(EV_JOB_STATUS_CHANGE, _concluded(job_id)) as done:
            job = next((j for j in await self.query_jobs() if j.get("id") == job_id), None)
            if job is None:
                return False
            if job.get("status") != "concluded":
                await done.wait(timeout_s)
        await self._dismiss(job_id)
        return True

    async def _dismiss(self, job_id: str) -> None:
        job = next((j for j in await self.query_jobs() if j.get("id") == job_id), None)
        if job is None:  # dismissed already (a job QEMU dismisses itself)
            return
        await self.execute("job-dismiss", {"id": job_id})
        if job.get("error"):
            raise JobFailed(str(job["error"]))

    async def query_jobs(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-jobs"))

    async def _send_fd(self, fd: int) -> None:
        """Pass fd by SCM_RIGHTS. send_fd_scm writes one byte straight to the socket, beside asyncio's buffer:
        wait until no earlier command is still half-written there, so the byte never lands inside one."""
        writer = self._client._writer  # qemu.qmp offers no public flush
        while writer is not None and writer.transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        self._client.send_fd_scm(fd)


class JobFailed(Exception):
    """A QEMU job ended with an error (its text is QEMU's)."""


def _concluded(job_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d.get("id") == job_id and d.get("status") == "concluded"


# block_set_io_throttle requires the read/write split even when only totals are used.
_UNUSED_THROTTLE = ("bps_rd", "bps_wr", "iops_rd", "iops_wr")
