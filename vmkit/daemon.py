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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import InvalidInput
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
    listen: str | None = None  # HOST:PORT of the TCP listener (token required), none by default
    tls: bool | None = None  # True/False when asked (--tls/--no-tls); None: TLS unless on loopback
    tls_cert: str | None = None  # None (with tls_key None): a self-signed pair in STATE/tls/
    tls_key: str | None = None

    @classmethod
    def from_env(
        cls,
        state_dir: str | None,
        run_dir: str | None,
        sock: str | None,
        id_range: str | None = None,
        *,
        listen: str | None = None,
        tls: bool | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> DaemonConfig:
        run = Path(run_dir or os.environ.get("VMKIT_RUN_DIR", DEFAULT_RUN_DIR))
        registry = os.environ.get("VMKIT_ID_REGISTRY")
        tls_env = os.environ.get("VMKIT_TLS")
        return cls(
            state_dir=Path(state_dir or os.environ.get("VMKIT_STATE_DIR", DEFAULT_STATE_DIR)),
            run_dir=run,
            socket=Path(sock or os.environ.get("VMKIT_SOCKET", str(run / "vmkit.sock"))),
            cache_dir=Path(os.environ.get("VMKIT_CACHE_DIR", DEFAULT_CACHE_DIR)),
            id_range=id_range or os.environ.get("VMKIT_ID_RANGE"),
            id_registry=Path(registry) if registry else None,
            cgroup_parent=os.environ.get("VMKIT_CGROUP_PARENT", "vmkit"),
            listen=listen or os.environ.get("VMKIT_LISTEN") or None,
            tls=tls if tls is not None else (tls_env not in ("0", "no", "off") if tls_env else None),
            tls_cert=tls_cert or os.environ.get("VMKIT_TLS_CERT") or None,
            tls_key=tls_key or os.environ.get("VMKIT_TLS_KEY") or None,
        )


def _bind_api_socket(path: Path) -> socket.socket:
    """Root-only socket (0660, group `vmkit` when that group exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = listen_unix(path, mode=0o660, backlog=128)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
    return sock


@dataclass(frozen=True)
class TcpListener:
    sock: socket.socket
    url: str
    cert: Path | None  # None: plain HTTP (loopback only)
    key: Path | None
    fingerprint: str | None  # SHA-256 of the certificate (DER), hex


def _bind_tcp(cfg: DaemonConfig) -> TcpListener | None:
    """The TCP listener, bound, with its TLS pair (made once when none is given), or None when not asked for."""
    from vmkit.host import tls

    if not cfg.listen:
        return None
    host, port = tls.parse_listen(cfg.listen)
    cert = key = fp = None
    if tls.use_tls(host, tls=cfg.tls, cert=cfg.tls_cert, key=cfg.tls_key):
        if cfg.tls_cert and cfg.tls_key:
            cert, key = Path(cfg.tls_cert), Path(cfg.tls_key)
        else:
            cert, key = tls.ensure_self_signed(cfg.state_dir / "tls", host)
        tls.check_pair(cert, key)
        fp = tls.fingerprint(cert)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise InvalidInput(f"cannot listen on {cfg.listen}: {e.strerror or e}") from None
    shown = f"[{host}]" if ":" in host else host
    return TcpListener(sock, f"{'https' if cert else 'http'}://{shown}:{port}", cert, key, fp)


async def serve(cfg: DaemonConfig) -> None:
    import uvicorn
    from starlette.types import ASGIApp

    from vmkit.api.app import create_app
    from vmkit.api.auth import TokenAuth
    from vmkit.api.deps import Services
    from vmkit.errors import VmkitError
    from vmkit.host import identity
    from vmkit.host.cgroups import Cgroups
    from vmkit.host.check import host_check
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
    from vmkit.services.sharedpools import SharedPools, host_id, iscsi_initiator
    from vmkit.services.snapshots import SnapshotService
    from vmkit.services.stats import StatsService
    from vmkit.services.upgrade import take_over
    from vmkit.services.vmdisks import VmDiskService
    from vmkit.services.vmnics import VmNicService
    from vmkit.services.vms import VmService
    from vmkit.services.vmsave import VmSaveService
    from vmkit.services.volumes import VolumeService
    from vmkit.store.db import SchemaTooNew, Store

    # Everything the daemon creates is private unless it says otherwise (the database, logs, disks, runtime
    # dirs): QEMU runs unprivileged and is handed descriptors, so it needs no rights on any of them.
    os.umask(0o077)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The run dir stays traversable (0755 whatever the umask) so group `vmkit` can reach the API socket and
    # dnsmasq, under its own user, its networks' files; each VM's dir inside is 0700.
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir.chmod(0o755)
    lock = open(cfg.state_dir / "daemon.lock", "w")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"vmkit: another daemon already uses {cfg.state_dir}") from None
    try:
        tcp = _bind_tcp(cfg)
    except VmkitError as e:
        raise SystemExit(f"vmkit: {e.message}") from None

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
    shared = SharedPools(store=store, host_id=host_id(store), initiator=iscsi_initiator(store))
    pools = PoolService(store=store, state_dir=cfg.state_dir, shared=shared)
    try:
        moved = await asyncio.to_thread(take_over, store, pools, cfg.state_dir)
    except (VmkitError, OSError) as e:
        raise SystemExit(f"vmkit: cannot move this state dir's disks and images into pools: {e}") from None
    if moved:
        log.info("took %d disk and image files of the earlier layout over as volumes", moved)
    volumes = VolumeService(store=store, pools=pools, shared=shared)
    volumes.recover()
    images = ImageService(store=store, volumes=volumes, cache_dir=cfg.cache_dir)
    # VMKIT_DEFAULT_NETWORK=off: no `default` network on first start (test daemons outside a network namespace).
    networks = NetworkService(
        store=store,
        run_dir=cfg.run_dir,
        default_network=os.environ.get("VMKIT_DEFAULT_NETWORK", "on") not in ("off", "0", "no"),
    )
    vms = VmService(
        store=store,
        bus=bus,
        host=host,
        state_dir=cfg.state_dir,
        run_dir=cfg.run_dir,
        image_lookup=images.lookup,
        id_range=id_range,
        cgroups=cgroups,
        volumes=volumes,
        networks=networks,
    )
    saves = VmSaveService(store=store, vms=vms, volumes=volumes)
    # A volume's users: VMs (disks, CD-ROMs), their snapshots, and a `saved` VM its managed save.
    volumes.set_users(lambda key: vms.volume_users(key) + saves.references(key), vms.volume_running_users)
    networks.set_users(vms.network_users, vms.network_running_users, vms.network_hosts)
    # Networks first: VMs still running from before need their bridges back (after a crash, say).
    await networks.load()
    try:
        said = await networks.ensure_default()
    except VmkitError as e:
        said = f"network default not created: {e.message}"
    if said:
        log.warning(said) if "not" in said or "in use" in said else log.info(said)
    await vms.load()
    snapshots = SnapshotService(store=store, vms=vms, volumes=volumes)
    vms.snapshot_refs, vms.snapshot_images = snapshots.references, snapshots.owned_images
    await snapshots.recover()
    await saves.recover()
    clones = CloneService(store=store, vms=vms, volumes=volumes, snapshots=snapshots)
    # Before clones.recover(): a clone it finishes gets a seed of its own.
    cloudinit = CloudInitService(store=store, vms=vms, volumes=volumes, clones=clones)
    await clones.recover()
    await cloudinit.recover()
    remotes = RemoteService(store=store)
    migrations = MigrationService(store=store, vms=vms, volumes=volumes, networks=networks, remotes=remotes)
    await migrations.recover()
    # dnsmasq was (re)started before the VMs were known: tell it their names now.
    await networks.refresh_hosts()
    stats = StatsService(vms)
    stats.start()
    svc = Services(
        vms=vms,
        images=images,
        ops=Operations(bus),
        bus=bus,
        host=host,
        host_report=report.to_dict(),
        stats=stats,
        auth=TokenService(store=store),
        pools=pools,
        volumes=volumes,
        vmdisks=VmDiskService(vms=vms, volumes=volumes),
        networks=networks,
        vmnics=VmNicService(vms=vms, networks=networks),
        snapshots=snapshots,
        saves=saves,
        clones=clones,
        remotes=remotes,
        migrations=migrations,
        cloudinit=cloudinit,
        tls_fingerprint=tcp.fingerprint if tcp else None,
        listen_url=tcp.url if tcp else None,
        state_dir=str(cfg.state_dir),
    )
    app = create_app(svc)
    sock = _bind_api_socket(cfg.socket)

    servers: list[uvicorn.Server] = []

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Requests that only wait (vm wait, operation ?wait_s) answer 503 at once rather than holding the
            # stop up for the whole grace period below and then being cancelled.
            app.state.stopping.set()
            for other in servers:  # the UNIX socket and the TCP listener stop together
                other.should_exit = True
            await super().shutdown(sockets=sockets)

    class TcpServer(Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Signals are the UNIX socket's server's to catch (one handler per signal); it stops this one.
            yield

    def config(asgi: ASGIApp, cert: Path | None = None, key: Path | None = None) -> uvicorn.Config:
        return uvicorn.Config(
            asgi,
            log_level="warning",
            lifespan="off",
            access_log=False,
            proxy_headers=False,
            ws="websockets-sansio",
            ssl_certfile=cert,
            ssl_keyfile=key,
            # Open consoles and event streams must not keep a stopping daemon alive (VMs are unaffected).
            timeout_graceful_shutdown=3,
        )

    server = Server(config(app))
    servers.append(server)
    tcp_server = None
    if tcp is not None:
        # The same app (one state), wrapped so that every request over TCP must carry a token (or a UI session).
        tcp_server = TcpServer(config(TokenAuth(app, svc.auth, svc.sessions), tcp.cert, tcp.key))
        servers.append(tcp_server)
    # uvicorn re-raises the stop signal once it has shut down; a no-op handler here lets that land without
    # killing the process, so the clean-up below (detach from QEMUs, close the store) runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    autostart = asyncio.create_task(vms.autostart(cfg.run_dir / "autostart.done"))
    log.info("vmkit daemon listening on %s (state %s)", cfg.socket, cfg.state_dir)
    tcp_task = None
    if tcp is not None and tcp_server is not None:
        tls_note = f"TLS certificate SHA-256 fingerprint {tcp.fingerprint}" if tcp.fingerprint else "plain HTTP"
        log.info("vmkit daemon listening on %s (token required; %s)", tcp.url, tls_note)
        tcp_task = asyncio.create_task(tcp_server.serve(sockets=[tcp.sock]))

        def tcp_ended(task: asyncio.Task[None]) -> None:
            # The listeners live and stop together: a TCP listener that fails takes the daemon down, said why.
            if not task.cancelled() and task.exception() is not None:
                log.error("the TCP listener failed: %s", task.exception())
            server.should_exit = True

        tcp_task.add_done_callback(tcp_ended)
    try:
        await server.serve(sockets=[sock])
    finally:
        if tcp_task is not None and tcp_server is not None:
            tcp_server.should_exit = True
            with contextlib.suppress(Exception):
                await tcp_task
        autostart.cancel()
        await stats.stop()
        await vms.close()
        store.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.socket.unlink()


def main(
    state_dir: str | None,
    run_dir: str | None,
    sock: str | None,
    verbose: bool = False,
    id_range: str | None = None,
    *,
    listen: str | None = None,
    tls: bool | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its DEBUG lines would drown -v
    cfg = DaemonConfig.from_env(
        state_dir, run_dir, sock, id_range, listen=listen, tls=tls, tls_cert=tls_cert, tls_key=tls_key
    )
    asyncio.run(serve(cfg))
