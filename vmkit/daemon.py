"""`vmkit daemon`: wire the layers together and serve the API on a UNIX socket.

The daemon never owns VM lifetimes: stopping it (or killing it) leaves every QEMU running, and the next
start re-attaches. One daemon per state dir, enforced by a lock file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from vmkit.util.unixsock import listen_unix

log = logging.getLogger("vmkit")

DEFAULT_STATE_DIR = "/var/lib/vmkit"
DEFAULT_RUN_DIR = "/run/vmkit"
DEFAULT_CACHE_DIR = "/var/cache/vmkit"
SOCKET_GROUP = "vmkit"


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    run_dir: Path
    socket: Path
    cache_dir: Path
    id_range: str | None = None  # FIRST-LAST or FIRST:COUNT; None: identity.DEFAULT_*
    id_registry: Path | None = None  # where state dirs on this host record their ranges
    cgroup_parent: str = "vmkit"

    @classmethod
    def from_env(
        cls, state_dir: str | None, run_dir: str | None, sock: str | None, id_range: str | None = None
    ) -> DaemonConfig:
        run = Path(run_dir or os.environ.get("VMKIT_RUN_DIR", DEFAULT_RUN_DIR))
        registry = os.environ.get("VMKIT_ID_REGISTRY")
        return cls(
            state_dir=Path(state_dir or os.environ.get("VMKIT_STATE_DIR", DEFAULT_STATE_DIR)),
            run_dir=run,
            socket=Path(sock or os.environ.get("VMKIT_SOCKET", str(run / "vmkit.sock"))),
            cache_dir=Path(os.environ.get("VMKIT_CACHE_DIR", DEFAULT_CACHE_DIR)),
            id_range=id_range or os.environ.get("VMKIT_ID_RANGE"),
            id_registry=Path(registry) if registry else None,
            cgroup_parent=os.environ.get("VMKIT_CGROUP_PARENT", "vmkit"),
        )


def _bind_api_socket(path: Path) -> socket.socket:
    """Root-only socket (0660, group `vmkit` when that group exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = listen_unix(path, mode=0o660, backlog=128)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
    return sock


async def serve(cfg: DaemonConfig) -> None:
    import uvicorn

    from vmkit.api.app import create_app
    from vmkit.api.deps import Services
    from vmkit.errors import VmkitError
    from vmkit.host import identity
    from vmkit.host.cgroups import Cgroups
    from vmkit.host.check import host_check
    from vmkit.qemu.argv import HostConfig
    from vmkit.services.events import EventBus
    from vmkit.services.images import ImageService
    from vmkit.services.operations import Operations
    from vmkit.services.vms import VmService
    from vmkit.store.db import SchemaTooNew, Store

    # Everything the daemon creates is private unless it says otherwise (the database, logs, disks, runtime
    # dirs): QEMU runs unprivileged and is handed descriptors, so it needs no rights on any of them.
    os.umask(0o077)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The run dir stays traversable so group `vmkit` can reach the API socket; each VM's dir inside is 0700.
    cfg.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    lock = open(cfg.state_dir / "daemon.lock", "w")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"vmkit: another daemon already uses {cfg.state_dir}") from None

    report = await asyncio.to_thread(host_check, cfg.id_range)
    if report.accelerator is None or report.qemu_path is None:
        raise SystemExit("vmkit: no usable QEMU accelerator; run `vmkit host check`")
    if report.accelerator == "tcg":
        log.warning(
            "KVM is not usable here (%s); guests run under TCG emulation",
            report.accelerators["kvm"]["detail"],
        )
    # VMKIT_QEMU swaps the emulator binary (tests use a fake QEMU that speaks QMP to exercise failure paths).
    host = HostConfig(qemu_binary=os.environ.get("VMKIT_QEMU", report.qemu_path), accelerator=report.accelerator)

    try:
        id_range = identity.IdRange.parse(cfg.id_range) if cfg.id_range else identity.DEFAULT_RANGE
        identity.claim(id_range, state_dir=cfg.state_dir, registry=cfg.id_registry or identity.DEFAULT_REGISTRY)
    except VmkitError as e:
        raise SystemExit(f"vmkit: {e.message}") from None
    cgroups = Cgroups.detect(parent=cfg.cgroup_parent)
    if cgroups.mode == "none":
        log.warning("cgroups unusable (%s): VMs run without CPU/memory accounting or limits", cgroups.describe())
    db = cfg.state_dir / "vmkit.db"
    # A database written before isolation may be world-readable; it is the daemon's alone.
    for f in (db, db.with_name("vmkit.db-wal"), db.with_name("vmkit.db-shm")):
        with contextlib.suppress(FileNotFoundError):
            f.chmod(0o600)
    try:
        store = Store(db)
    except SchemaTooNew as e:
        raise SystemExit(f"vmkit: {e}") from None
    bus = EventBus()
    images = ImageService(store=store, state_dir=cfg.state_dir, cache_dir=cfg.cache_dir)
    vms = VmService(
        store=store,
        bus=bus,
        host=host,
        state_dir=cfg.state_dir,
        run_dir=cfg.run_dir,
        image_lookup=images.lookup,
        id_range=id_range,
        cgroups=cgroups,
    )
    await vms.load()
    svc = Services(vms=vms, images=images, ops=Operations(bus), bus=bus, host=host, host_report=report.to_dict())
    app = create_app(svc)
    sock = _bind_api_socket(cfg.socket)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Requests that only wait (vm wait, operation ?wait_s) answer 503 at once rather than holding the
            # stop up for the whole grace period below and then being cancelled.
            app.state.stopping.set()
            await super().shutdown(sockets=sockets)

    server = Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ws="websockets-sansio",
            # Open consoles and event streams must not keep a stopping daemon alive (VMs are unaffected).
            timeout_graceful_shutdown=3,
        )
    )
    # uvicorn re-raises the stop signal once it has shut down; a no-op handler here lets that land without
    # killing the process, so the clean-up below (detach from QEMUs, close the store) runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    autostart = asyncio.create_task(vms.autostart(cfg.run_dir / "autostart.done"))
    log.info("vmkit daemon listening on %s (state %s)", cfg.socket, cfg.state_dir)
    try:
        await server.serve(sockets=[sock])
    finally:
        autostart.cancel()
        await vms.close()
        store.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.socket.unlink()


def main(
    state_dir: str | None, run_dir: str | None, sock: str | None, verbose: bool = False, id_range: str | None = None
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    asyncio.run(serve(DaemonConfig.from_env(state_dir, run_dir, sock, id_range)))
