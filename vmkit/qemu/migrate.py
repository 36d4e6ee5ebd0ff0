"""QMP sequences of a live migration between two QEMUs (vmkit/services/migrations.py drives them from both
daemons), with the disks copied while the guest runs (libvirt's --copy-storage-all):

- destination: QEMU started with `-incoming defer` (paused); `nbd-server-start` on a listening socket the
  daemon made (its port known before QEMU gets it) and `nbd-server-add` of each new, empty disk; then
  `migrate-incoming tcp:HOST:0`, its port read back from query-migrate.
- source: each disk's top node mirrored (`blockdev-mirror sync=full`) into an NBD client node of the
  destination's export; once every mirror is ready (and stays in step), `migrate`; when the migration has
  completed, each mirror is cancelled (a ready mirror cancelled leaves the source on its own disk, which it
  keeps until the destination has taken over).
- destination again: `nbd-server-stop`, then `cont` (if the guest ran).

Both streams are encrypted: a `tls-creds-psk` object on each side with a per-migration key. QEMU opens no path
of vmkit's: the key's directory is handed over as a descriptor (add-fd) and named `/proc/self/fd/N`; QEMU
reads `keys.psk` through it (the directory and file belong to the VM's identity).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.qemu.monitor import EV_JOB_STATUS_CHANGE, Monitor
from vmkit.qemu.savevm import EV_MIGRATION, MigrationFailed, enable_events, ended, wait_end

TLS_ID = "vmkit-mig-tls"
NBD_FD = "vmkit-nbd"
PSK_USER = "vmkit"
MIRROR_READY_TIMEOUT_S = 24 * 3600.0


def write_psk(directory: Path, key_hex: str, uid: int) -> None:
    """The files QEMU's tls-creds-psk reads, in a directory of the VM's identity: `keys.psk` (USER:HEXKEY) and
    `dh-params.pem`. Without the latter the server side generates 2048-bit Diffie-Hellman parameters when its
    object is added, which took 0.03-1.5 s here (bench/migration.py); RFC 7919's ffdhe2048 group is public and
    as good as any freshly made."""
    directory.mkdir(mode=0o700)
    for name, data in (("keys.psk", f"{PSK_USER}:{key_hex}\n".encode()), ("dh-params.pem", ffdhe2048_pem())):
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fchown(fd, uid, uid)
        finally:
            os.close(fd)
    os.chown(directory, uid, uid)


@functools.cache
def ffdhe2048_pem() -> bytes:
    """RFC 7919's ffdhe2048 group (PKCS #3 DHParameter, PEM): p = 2^2048 - 2^1984 + (floor(2^1918 e) + 560316)
    2^64 - 1, g = 2. floor(2^1918 e) is summed from the series of e in integers, with guard bits."""
    guard = 64
    total, term, k = 0, 1 << (1918 + guard), 0
    while term:
        total += term
        k += 1
        term //= k
    p = 2**2048 - 2**1984 + ((total >> guard) + 560316) * 2**64 - 1

    def der(tag: int, body: bytes) -> bytes:
        n = len(body)
        length = (
            bytes([n])
            if n < 128
            else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
        )
        return bytes([tag]) + length + body

    seq = der(0x30, der(0x02, b"\0" + p.to_bytes(256, "big")) + der(0x02, b"\x02"))
    b64 = base64.b64encode(seq).decode()
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN DH PARAMETERS-----\n{lines}\n-----END DH PARAMETERS-----\n".encode()


async def add_tls(mon: Monitor, directory: Path, *, endpoint: str) -> None:
    """Create the TLS credentials object (server: destination, client: source) from the key in directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ret = await mon.add_fd(fd, opaque=TLS_ID)
    finally:
        os.close(fd)
    # add-fd answers with the descriptor's number in QEMU: a path QEMU can open without any of ours.
    qemu_fd = await _fd_of(mon, ret)
    args = {"qom-type": "tls-creds-psk", "id": TLS_ID, "endpoint": endpoint, "dir": f"/proc/self/fd/{qemu_fd}"}
    if endpoint == "client":
        args["username"] = PSK_USER  # the server finds the key by the name the client gives
    await mon.execute("object-add", args)


async def _fd_of(mon: Monitor, fdset_id: int) -> int:
    for s in await mon.query_fdsets():
        if int(s["fdset-id"]) == fdset_id and s.get("fds"):
            return int(s["fds"][0]["fd"])
    raise LookupError(f"fdset {fdset_id} is gone")


async def serve_disks(mon: Monitor, listener: socket.socket, exports: dict[str, str]) -> None:
    """Destination: an NBD server (TLS) on the daemon's listening socket, exporting node → name, writable."""
    await mon.getfd(listener.fileno(), NBD_FD)
    addr = {"type": "fd", "data": {"str": NBD_FD}}
    await mon.execute("nbd-server-start", {"addr": addr, "tls-creds": TLS_ID})
    for node, name in exports.items():
        await mon.execute("nbd-server-add", {"device": node, "name": name, "writable": True})


async def listen_migration(mon: Monitor, host: str) -> int:
    """Destination: wait for the migration stream (TLS) on host; returns the port QEMU bound."""
    await enable_events(mon)
    await mon.execute("migrate-set-parameters", {"tls-creds": TLS_ID, "tls-hostname": ""})
    shown = f"[{host}]" if ":" in host else host
    await mon.execute("migrate-incoming", {"uri": f"tcp:{shown}:0"})
    info = await mon.execute("query-migrate")
    for addr in info.get("socket-address") or []:
        if addr.get("port"):
            return int(addr["port"])
    raise LookupError("QEMU did not say which port it listens on for the migration")


async def finish_incoming(mon: Monitor, *, run: bool) -> None:
    """Destination, once the source says the migration completed: stop serving the disks, and run the guest."""
    with contextlib.suppress(Exception):
        await mon.execute("nbd-server-stop")
    if run:
        await mon.cont()


async def mirror(mon: Monitor, disks: dict[str, str], host: str, port: int, exports: dict[str, str]) -> list[str]:
    """Source: mirror each disk's top node (disks: disk → node) into the destination's export for it; returns the
    job ids once every mirror is ready (the copy caught up; from then on every write goes to both)."""
    jobs = []
    for disk in disks:
        target = f"{disk}-mig"
        server = {"type": "inet", "host": host, "port": str(port)}
        await mon.blockdev_add({"driver": "nbd", "node-name": target, "server": server, "export": exports[disk],
                                "tls-creds": TLS_ID})  # fmt: skip
        jobs.append(f"vmkit-mirror-{disk}")
    waiters = []
    with contextlib.ExitStack() as stack:
        for (disk, node), job in zip(disks.items(), jobs, strict=True):
            waiters.append(stack.enter_context(mon.expect_event(EV_JOB_STATUS_CHANGE, _ready_or_end(job))))
            args = {"job-id": job, "device": node, "target": f"{disk}-mig", "sync": "full", "auto-dismiss": False}
            await mon.execute("blockdev-mirror", args)
        for job, w in zip(jobs, waiters, strict=True):
            status = (await w.wait(MIRROR_READY_TIMEOUT_S)).get("status")
            if status != "ready":
                err = next((j.get("error") for j in await mon.query_jobs() if j.get("id") == job), None)
                raise MigrationError(f"copying the disk failed: {err or status}")
    return jobs


@dataclass
class Autopilot:
    """What libvirt leaves to its user: while the guest dirties memory faster than the link carries it (the RAM
    left to send stops shrinking for `patience_s`), allow a longer pause at the switch-over, doubling the downtime
    limit from `start_ms` up to `max_ms`; still stuck at the limit, switch to post-copy when allowed (the guest
    runs on the destination at once, which fetches the pages it lacks), else give up (the caller cancels)."""

    start_ms: int
    max_ms: int
    postcopy: bool = False
    patience_s: float = 2.0
    limit_ms: int = 0
    _best: int | None = None
    _since: float = 0.0

    def __post_init__(self) -> None:
        self.limit_ms = min(self.start_ms, self.max_ms)

    def decide(self, info: dict[str, Any], now: float) -> int | None:
        """A new downtime limit to set, GIVE_UP, or None (nothing to do), from a query-migrate answer."""
        ram = info.get("ram") or {}
        if info.get("status") != "active" or int(ram.get("dirty-sync-count") or 0) < 2:
            self._since = now  # the first pass over RAM sends it all: nothing to judge yet
            return None
        left = int(ram.get("remaining") or 0)
        if self._best is None or left < self._best:  # still converging
            self._best, self._since = left, now
            return None
        if now - self._since < self.patience_s:
            return None
        self._since, self._best = now, left
        if self.limit_ms >= self.max_ms:
            return SWITCH_TO_POSTCOPY if self.postcopy else GIVE_UP
        self.limit_ms = min(self.max_ms, self.limit_ms * 2)
        return self.limit_ms


GIVE_UP = -1
SWITCH_TO_POSTCOPY = -2


def _status_is(status: str, data: dict[str, Any]) -> bool:
    return data.get("status") == status


async def enable_postcopy(mon: Monitor) -> None:
    """Allow post-copy on this side (both sides need it, before the migration starts). QEMU refuses it on a
    destination that cannot use userfaultfd; that refusal is raised as MigrationError, with its words."""
    try:
        await mon.execute("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    except Exception as e:  # noqa: BLE001 - QMP's ExecuteError: QEMU's own reason
        raise MigrationError(f"post-copy is not possible: {getattr(e, 'error_desc', None) or e}") from None


async def migrate(
    mon: Monitor,
    host: str,
    port: int,
    *,
    max_bandwidth: int,
    autopilot: Autopilot,
    progress: Callable[[dict[str, Any]], None],
    timeout_s: float,
    on_postcopy: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Source: send the guest's RAM and device state (TLS); returns query-migrate's final answer. Raises
    MigrationError (QEMU's reason) when it fails or is cancelled, or when the autopilot gave up.

    With autopilot.postcopy, a migration that does not converge switches to post-copy: the source stops, the
    destination takes the device state and must run the guest at once (on_postcopy, awaited once QEMU says
    postcopy-active), and the pages still here follow. From the switch on, the guest's memory is split between
    the hosts: a failure then cannot give it back to the source (QEMU pauses both sides, postcopy-paused)."""
    await enable_events(mon)
    params = {"tls-creds": TLS_ID, "tls-hostname": "", "max-bandwidth": max_bandwidth,
              "downtime-limit": autopilot.limit_ms}  # fmt: skip
    await mon.execute("migrate-set-parameters", params)
    shown = f"[{host}]" if ":" in host else host
    gave_up = switched = handed = False
    loop = asyncio.get_running_loop()
    postcopy_active = functools.partial(_status_is, "postcopy-active")
    with mon.expect_event(EV_MIGRATION, ended) as done, mon.expect_event(EV_MIGRATION, postcopy_active) as post:
        await mon.execute("migrate", {"uri": f"tcp:{shown}:{port}"})
        task = asyncio.ensure_future(wait_end(mon, done, timeout_s))
        try:
            while not task.done():
                if post.future.done() and on_postcopy is not None and not handed:
                    # The destination holds the device state and waits: it runs the guest from here on.
                    handed = True
                    try:
                        await on_postcopy()
                    except Exception as e:
                        raise PostcopyFailed(getattr(e, "message", None) or str(e)) from e
                info = {}
                with contextlib.suppress(Exception):
                    info = await mon.execute("query-migrate")
                if info:
                    progress(info)
                    step = autopilot.decide(info, loop.time())
                    with contextlib.suppress(Exception):
                        if step == SWITCH_TO_POSTCOPY and not switched:
                            switched = True
                            await mon.execute("migrate-start-postcopy")
                        elif step == GIVE_UP and not gave_up:
                            gave_up = True
                            await mon.execute("migrate_cancel")
                        elif step is not None and step > 0:
                            await mon.execute("migrate-set-parameters", {"downtime-limit": step})
                await asyncio.wait({task, post.future}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            try:
                info = task.result()
            except MigrationFailed as e:
                info = {"status": "cancelled" if gave_up else "failed", "error-desc": str(e)}
        finally:
            task.cancel()
    if switched and post.future.done() and info.get("status") != "completed":
        raise PostcopyFailed(str(info.get("error-desc") or info.get("status")))
    info["postcopy"] = switched
    info["handed_over"] = handed  # on_postcopy ran: the destination runs the guest already
    if gave_up and info.get("status") != "completed":
        raise MigrationError(
            f"it did not converge: the guest dirties its memory faster than the link carries it, even allowing "
            f"{autopilot.max_ms} ms of downtime (raise --max-downtime-ms or --bandwidth, or quieten the guest)"
        )
    if info.get("status") != "completed":
        raise MigrationError(str(info.get("error-desc") or info.get("status")))
    for _ in range(20):  # QEMU says completed a moment before it has filled in downtime and total-time
        if info.get("downtime"):
            break
        await asyncio.sleep(0.01)
        info = await mon.execute("query-migrate")
    return info


async def stop_mirrors(mon: Monitor, jobs: list[str], disks: list[str]) -> None:
    """Source: cancel the mirrors (a ready one stays on the source's disk) and drop the NBD client nodes."""
    for job in jobs:
        with contextlib.suppress(Exception):
            await mon.execute("block-job-cancel", {"device": job, "force": True})
    await asyncio.sleep(0)
    for job in jobs:
        with contextlib.suppress(Exception):
            await mon.await_job(job, timeout_s=30)
    for disk in disks:
        with contextlib.suppress(Exception):
            await mon.blockdev_del(f"{disk}-mig")


async def drop_tls(mon: Monitor) -> None:
    with contextlib.suppress(Exception):
        await mon.execute("object-del", {"id": TLS_ID})
    for s in await mon.query_fdsets():
        if any(f.get("opaque") == TLS_ID for f in s.get("fds") or []):
            with contextlib.suppress(Exception):
                await mon.remove_fd(int(s["fdset-id"]))


def _ready_or_end(job: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d.get("id") == job and d.get("status") in ("ready", "concluded", "aborting")


class MigrationError(Exception):
    """The migration failed; the text is QEMU's reason."""


class PostcopyFailed(MigrationError):
    """The migration failed after it switched to post-copy: the guest's memory is split between the hosts."""
