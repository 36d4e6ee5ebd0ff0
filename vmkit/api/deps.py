"""The services a route may call, reached through the app state (set once at daemon start)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request, WebSocket

from vmkit.errors import VmkitError
from vmkit.qemu.argv import HostConfig
from vmkit.services.auth import TokenService
from vmkit.services.clones import CloneService
from vmkit.services.cloudinit import CloudInitService
from vmkit.services.events import EventBus
from vmkit.services.images import ImageService
from vmkit.services.migrations import MigrationService
from vmkit.services.networks import NetworkService
from vmkit.services.operations import Operations
from vmkit.services.pools import PoolService
from vmkit.services.remotes import RemoteService
from vmkit.services.sessions import Sessions
from vmkit.services.snapshots import SnapshotService
from vmkit.services.stats import StatsService
from vmkit.services.vmdisks import VmDiskService
from vmkit.services.vmnics import VmNicService
from vmkit.services.vms import VmService
from vmkit.services.vmsave import VmSaveService
from vmkit.services.volumes import VolumeService


@dataclass
class Services:
    vms: VmService
    images: ImageService
    ops: Operations
    bus: EventBus
    host: HostConfig
    host_report: dict[str, object]
    stats: StatsService
    auth: TokenService
    pools: PoolService
    volumes: VolumeService
    vmdisks: VmDiskService
    networks: NetworkService
    vmnics: VmNicService
    snapshots: SnapshotService
    saves: VmSaveService
    clones: CloneService
    remotes: RemoteService
    migrations: MigrationService
    cloudinit: CloudInitService
    tls_fingerprint: str | None = None  # of the TCP listener's certificate, when it speaks TLS
    listen_url: str | None = None  # the TCP listener's base URL (http[s]://HOST:PORT), when there is one
    state_dir: str | None = None  # for the dashboard's disk usage
    sessions: Sessions = field(default_factory=Sessions)  # the web UI's logins (services/sessions.py)


def services(request: Request) -> Services:
    return request.app.state.services


def ws_services(ws: WebSocket) -> Services:
    return ws.app.state.services


class DaemonStopping(VmkitError):
    status = 503


STOPPING_MESSAGE = "the vmkit daemon is stopping; ask again once it is back"
T = TypeVar("T")


async def unless_stopping(request: Request, work: Awaitable[T]) -> T:
    """Await work, but answer 503 as soon as the daemon starts to stop (app.state.stopping is set): a request
    that only waits must not hold up a stopping daemon. Only for work that is safe to abandon half-way."""
    stopping: asyncio.Event = request.app.state.stopping
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise DaemonStopping(STOPPING_MESSAGE)
