"""QMP sequences that write a VM's RAM and device state into a file and load it back (virsh save / restore).

Both directions are QEMU migrations to or from a descriptor the daemon opened (`fd:NAME` after `getfd`): QEMU runs
unprivileged under a seccomp sandbox and opens no path of vmkit's, and a file descriptor costs no extra copy (no
pipe, no helper process between QEMU and the file).

Invariants:
- save_state expects a stopped guest (the caller sends `stop` first): each RAM page is then written exactly once,
  and the stream's global state says "paused", so the QEMU that loads it stays paused until told to `cont`.
- The bandwidth cap is lifted first: QEMU's default (128 MiB/s) is meant for a live migration sharing a network,
  and would make a save of 256 MiB take ~0.5 s instead of ~0.1 s.
- load_state runs in a QEMU started with `-incoming defer` (qemu/argv.py), so nothing of the guest runs before
  its state is loaded; QEMU ends paused either way (-S), and the caller decides whether to `cont`.
- Both wait for the MIGRATION event (capability `events`), and poll query-migrate meanwhile, so an event lost
  to a reconnect or a QEMU that has died is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from vmkit.qemu.monitor import EventWaiter, Monitor

EV_MIGRATION = "MIGRATION"  # data: status (setup, active, completed, failed, cancelled, …)
# No cap: QEMU's rate limiter takes bytes per second, up to INT64_MAX (what libvirt sets for a save too).
MAX_BANDWIDTH = 2**63 - 1
# query-migrate statuses after which nothing more happens.
_ENDED = frozenset({"completed", "failed", "cancelled"})
# While the migration runs: polled this often besides awaiting its event.
_POLL_S = 0.5
SAVE_FD = "vmkit-save"
LOAD_FD = "vmkit-restore"


class MigrationFailed(Exception):
    """QEMU could not write or read the state; the text is QEMU's (error-desc)."""


async def save_state(mon: Monitor, fd: int, *, timeout_s: float) -> dict[str, Any]:
    """Write the stopped VM's state to fd, from its current offset on; returns query-migrate's final answer.
    QEMU is left in `postmigrate` (paused, its disks inactive: a `cont` takes them back) on success and paused
    (`cont` to resume) on failure. Raises MigrationFailed, or TimeoutError after timeout_s (the caller then
    cancels: cancel())."""
    await enable_events(mon)
    await mon.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    return await _migrate(mon, fd, SAVE_FD, "migrate", timeout_s)


async def load_state(mon: Monitor, fd: int, *, timeout_s: float) -> dict[str, Any]:
    """Load the state from fd (positioned at the start of the stream) into a QEMU waiting with `-incoming
    defer`; it stays paused afterwards. Raises MigrationFailed (QEMU then exits: a failed incoming migration ends
    it), or TimeoutError."""
    await enable_events(mon)
    return await _migrate(mon, fd, LOAD_FD, "migrate-incoming", timeout_s)


async def _migrate(mon: Monitor, fd: int, fdname: str, cmd: str, timeout_s: float) -> dict[str, Any]:
    """Hand fd to QEMU as fdname and run cmd (migrate, migrate-incoming) on it to the end."""
    await mon.getfd(fd, fdname)
    with mon.expect_event(EV_MIGRATION, ended) as done:
        try:
            await mon.execute(cmd, {"uri": f"fd:{fdname}"})
        except BaseException:
            # QEMU takes the named descriptor only once the migration starts.
            with contextlib.suppress(Exception):
                await mon.closefd(fdname)
            raise
        return await wait_end(mon, done, timeout_s)


async def status(mon: Monitor) -> str:
    """query-migrate's status: none, setup, active, completed, failed, cancelled, …"""
    return str((await mon.execute("query-migrate")).get("status", "none"))


async def cancel(mon: Monitor, *, timeout_s: float = 10.0) -> str:
    """Stop an outgoing migration still under way (a save a daemon crash cut short); returns the final status."""
    if await status(mon) in _ENDED | {"none"}:
        return await status(mon)
    with mon.expect_event(EV_MIGRATION, ended) as done:
        await mon.execute("migrate_cancel")
        with contextlib.suppress(MigrationFailed):
            return str((await wait_end(mon, done, timeout_s)).get("status"))
    return await status(mon)


async def await_end(mon: Monitor, *, timeout_s: float) -> dict[str, Any]:
    """Wait for a migration started earlier (by a daemon that died since) to end, as save_state/load_state do."""
    with mon.expect_event(EV_MIGRATION, ended) as done:
        return await wait_end(mon, done, timeout_s)


async def enable_events(mon: Monitor) -> None:
    await mon.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})


def ended(data: dict[str, Any]) -> bool:
    return data.get("status") in _ENDED


async def wait_end(mon: Monitor, done: EventWaiter, timeout_s: float) -> dict[str, Any]:
    """Wait for the migration to end (its event, or query-migrate says so); its query-migrate answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        event: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError):
            event = await done.wait(max(0.0, min(_POLL_S, deadline - loop.time())))
        if event.get("status") in ("failed", "cancelled"):
            # A failed incoming migration ends QEMU at once: ask for its reason, but do not count on an answer.
            info: dict[str, Any] = {}
            with contextlib.suppress(Exception):
                info = dict(await mon.execute("query-migrate", timeout_s=1.0))
            raise MigrationFailed(str(info.get("error-desc") or f"the migration {event['status']}"))
        info = dict(await mon.execute("query-migrate"))
        state = info.get("status")
        if state == "completed":
            return info
        if state in ("failed", "cancelled"):
            raise MigrationFailed(str(info.get("error-desc") or f"the migration {state}"))
        if loop.time() >= deadline:
            raise TimeoutError(f"the migration is still {state} after {timeout_s:g} s")


def timeout_for(memory_mib: int) -> float:
    """How long a save or a load of a guest of memory_mib may take: at worst 50 MiB/s (a slow, busy disk),
    and a minute for the rest."""
    return 60.0 + memory_mib / 50
