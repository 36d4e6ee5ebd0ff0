"""VM lifecycle: create, start, stop, pause, reboot, delete; re-attach on daemon start; watch QEMU.

Who decides a VM's state: QEMU does, while it runs (QMP events and query-status); the process's exit does
when it ends (pidfd); the store only remembers the last state so that a VM whose QEMU vanished while the
daemon was away can be reported as crashed rather than shut off.

All methods run on the daemon's event loop. A per-VM lock serialises commands on one VM; QMP events and
process exits update state without taking it (they only record facts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.errors import Conflict, InvalidInput, NotFound, Timeout, VmkitError
from vmkit.host import identity
from vmkit.host.cgroups import Cgroups, VmCgroup
from vmkit.model.cloudinit import CloudInitSummary
from vmkit.model.network import DEFAULT_NETWORK
from vmkit.model.storage import DEFAULT_POOL, CloneVolume, CreateVolume, provisioning
from vmkit.model.vm import CdromSpec, CreateVm, DiskSpec, NicSpec, SetVm, VmInfo, VmSpec, VmState
from vmkit.net import links
from vmkit.qemu import monitor as qmp
from vmkit.qemu import process, savevm
from vmkit.qemu.agent import Agent, ExecResult
from vmkit.qemu.argv import HostConfig, RuntimePaths, cold, is_network, machine_ports, qemu_argv
from vmkit.qemu.handover import open_handover
from vmkit.services import limits
from vmkit.services.events import EventBus
from vmkit.services.networks import NetworkService, tap_name
from vmkit.services.reverter import Reverter
from vmkit.services.volumes import VolumeService
from vmkit.store.db import Store
from vmkit.util.crash import crashpoint
from vmkit.util.tasks import TaskSet

log = logging.getLogger(__name__)

# QEMU run states (query-status) and what virsh calls them.
_QEMU_STATES = {
    "running": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "debug": VmState.PAUSED,
    "inmigrate": VmState.PAUSED,
    "postmigrate": VmState.PAUSED,
    "finish-migrate": VmState.PAUSED,
    "restore-vm": VmState.PAUSED,
    "save-vm": VmState.PAUSED,
    "prelaunch": VmState.PAUSED,
    "io-error": VmState.PAUSED,
    "watchdog": VmState.PAUSED,
    "colo": VmState.PAUSED,
    "suspended": VmState.PMSUSPENDED,
    "shutdown": VmState.SHUTDOWN,
    "internal-error": VmState.CRASHED,
    "guest-panicked": VmState.CRASHED,
}


# Connect and negotiate QMP with a QEMU this daemon has just spawned (see _launch).
START_QMP_TIMEOUT_S = 60.0

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# shutdown, mode auto: how long a guest has to react to ACPI before its agent is asked (systemd powers off at
# once; a guest that ignores its power button never does).
AGENT_AFTER_S = 10.0


class QmpFailed(VmkitError):
    status = 502


@dataclass
class VmRuntime:
    """In-memory state of one defined VM."""

    spec: VmSpec
    autostart: bool
    state: VmState
    reason: str | None
    paths: RuntimePaths
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    uid: int | None = None  # the VM's own identity (gid = uid); None only until load() assigns one
    cgroup: VmCgroup | None = None  # while QEMU runs in it
    proc: process.QemuProcess | None = None
    popen: subprocess.Popen[bytes] | None = None
    monitor: qmp.Monitor | None = None
    pidfd: int | None = None
    agent: bool = False
    # Facts gathered while QEMU runs, read when it exits to name the reason.
    shutdown_reason: str | None = None
    quit_requested: bool = False
    reboot_pending: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    console_busy: bool = False
    # Disks whose unplug the guest has not acknowledged yet (services/vmdisks.py finishes it when it does).
    pending_detach: set[str] = field(default_factory=set)
    # Set while _launch runs: a QEMU that exits before `cont` is reported by the launch as "failed", not as
    # a crash by the exit watcher.
    launching: bool = False

    @property
    def cgroup_name(self) -> str:
        return f"{self.spec.name}.{self.spec.uuid[:8]}"

    def info(self) -> VmInfo:
        s = self.spec
        running = self.proc is not None and self.state.active
        ident = identity.proc_identity(self.proc.pid) if running and self.proc else None
        if ident is None and self.uid is not None:
            ident = identity.Identity(self.uid, self.uid)
        stats = self.cgroup.stats() if running and self.cgroup else None
        return VmInfo(
            name=s.name,
            uuid=s.uuid,
            state=self.state,
            reason=self.reason,
            memory_mib=s.memory_mib,
            vcpus=s.vcpus,
            image=s.image,
            autostart=self.autostart,
            pid=self.proc.pid if self.proc and self.state.active else None,
            agent=self.agent,
            disks=s.disks,
            cdroms=s.cdroms,
            nics=s.nics,
            kernel=s.kernel,
            initrd=s.initrd,
            cmdline=s.cmdline,
            runtime_dir=str(self.paths.run_dir) if self.state.active else None,
            cpu_weight=s.cpu_weight,
            cpu_max_percent=s.cpu_max_percent,
            memory_max_mib=s.memory_max_mib,
            uid=ident.uid if ident else None,
            gid=ident.gid if ident else None,
            cgroup=self.cgroup.path if running and self.cgroup else None,
            cpu_time_ns=stats.cpu_time_ns if stats else None,
            memory_bytes=stats.memory_bytes if stats else None,
            cloud_init=CloudInitSummary.of(s.cloud_init) if s.cloud_init else None,
        )


async def _no_seed(spec: VmSpec, req: CreateVm, rev: Reverter) -> VmSpec:
    if req.cloud_init is not None:
        raise InvalidInput("cloud-init seeds are not available in this daemon")
    return spec


def _host_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


class VmService:
    def __init__(
        self,
        *,
        store: Store,
        bus: EventBus,
        host: HostConfig,
        state_dir: Path,
        run_dir: Path,
        image_lookup: Callable[[str], dict[str, Any] | None],
        id_range: identity.IdRange,
        cgroups: Cgroups,
        volumes: VolumeService,
        networks: NetworkService,
    ) -> None:
        self._volumes = volumes
        self._networks = networks
        self._ids = id_range
        self._cgroups = cgroups
        # /dev/kvm's group where KVM is used: QEMU's only supplementary group.
        kvm = identity.kvm_gid() if host.accelerator == "kvm" else None
        self._extra_gids = (kvm,) if kvm is not None else ()
        self._store = store
        self._bus = bus
        self._host = host
        self._vm_dir = state_dir / "vms"
        self._run_dir = run_dir / "vms"
        self._image_lookup = image_lookup
        self._vms: dict[str, VmRuntime] = {}
        # Set by services/snapshots.py: the snapshots that need a volume, and the images only a VM's snapshots name.
        self.snapshot_refs: Callable[[str], list[str]] = lambda key: []
        self.snapshot_images: Callable[[str], list[str]] = lambda vm: []
        # Set by services/vmdisks.py: a device the guest let go of (a disk unplug it acknowledged late).
        self.device_deleted: Callable[[VmRuntime, str], Coroutine[Any, Any, None]] | None = None
        # Set by services/vmsave.py: start a `saved` VM from its managed save (called with the VM's lock held),
        # and the save volumes that go with a VM when it is deleted.
        self.resume_saved: Callable[[VmRuntime], Coroutine[Any, Any, None]] | None = None
        self.saved_images: Callable[[VmRuntime], list[str]] = lambda vm: []
        # Set by services/cloudinit.py: a new VM's spec with its cloud-init seed, when asked for (undone by rev).
        self.add_seed: Callable[[VmSpec, CreateVm, Reverter], Awaitable[VmSpec]] = _no_seed
        self._create_lock = asyncio.Lock()
        self._background = TaskSet()
        self._vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ----- queries -------------------------------------------------------------------------------
    def _get(self, name: str) -> VmRuntime:
        try:
            return self._vms[name]
        except KeyError:
            raise NotFound(f"no VM named {name!r}") from None

    def runtime(self, name: str) -> VmRuntime:
        """One VM's in-memory record, for the services that change part of a VM (services/vmdisks.py); they
        hold its lock while they do."""
        return self._get(name)

    def save_spec(self, vm: VmRuntime, spec: VmSpec) -> None:
        vm.spec = spec
        self._store.set_vm_spec(spec)

    def all(self) -> list[VmInfo]:
        return [vm.info() for vm in sorted(self._vms.values(), key=lambda v: v.spec.name)]

    def get(self, name: str) -> VmInfo:
        return self._get(name).info()

    def runtimes(self) -> list[VmRuntime]:
        """Every defined VM's in-memory record, by name, for readers on the event loop such as the stats
        sampler (services/stats.py). Read them; change a VM only through this service's methods."""
        return sorted(self._vms.values(), key=lambda v: v.spec.name)

    def paths(self, name: str) -> RuntimePaths:
        return RuntimePaths(self._run_dir / name, self._vm_dir / name)

    # ----- state bookkeeping ---------------------------------------------------------------------
    def _set_state(self, vm: VmRuntime, state: VmState, reason: str | None = None) -> None:
        if (vm.state, vm.reason) == (state, reason):
            return
        vm.state, vm.reason = state, reason
        self._store.set_vm_state(vm.spec.name, state, reason)
        self._bus.publish("vm-state", vm=vm.spec.name, state=str(state), reason=reason)
        vm.changed.set()
        vm.changed = asyncio.Event()

    def set_state(self, vm: VmRuntime, state: VmState, reason: str | None = None) -> None:
        """Record a state another service brought the VM to (services/vmsave.py: saved, restored); the caller
        holds the VM's lock."""
        self._set_state(vm, state, reason)

    async def _wait_state(self, vm: VmRuntime, ok: Callable[[VmState], bool], timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ok(vm.state):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(vm.changed.wait(), remaining)
        return True

    # ----- daemon start / stop -------------------------------------------------------------------
    async def load(self) -> None:
        """Read every VM from the store and re-attach to the QEMUs still running."""
        rows = self._store.vms()
        known = {r.spec.name for r in rows}
        self._remove_orphans(known)
        # After a host reboot no QEMU can have survived: VMs that were up were shut off with the host, not
        # crashed. The kernel's boot id tells the two apart even when the run dir is not a tmpfs.
        boot_id = _boot_id()
        rebooted = self._store.get_meta("boot_id") not in (None, boot_id)
        self._store.set_meta("boot_id", boot_id)
        for row in rows:
            vm = VmRuntime(row.spec, row.autostart, row.state, row.reason, self.paths(row.spec.name), uid=row.uid)
            self._vms[row.spec.name] = vm
            if rebooted and vm.state.active:
                self._set_state(vm, VmState.SHUTOFF, "host rebooted")
        # VMs defined before isolation (or before the id range changed) get their identity now; one running
        # under another identity keeps it until its next start.
        for vm in self._vms.values():
            if vm.uid not in self._ids:
                vm.uid = self._next_uid()
                self._store.set_vm_uid(vm.spec.name, vm.uid)
        await asyncio.gather(*(self._reattach(vm) for vm in self._vms.values()))
        # Cgroups of our VMs whose QEMU is gone (it ended while the daemon was away).
        ours = {vm.cgroup_name for vm in self._vms.values() if vm.cgroup is None}
        for name in set(self._cgroups.names()) & ours:
            with contextlib.suppress(VmkitError):
                await asyncio.to_thread(self._cgroups.remove, name)

    def _next_uid(self) -> int:
        used = {vm.uid for vm in self._vms.values() if vm.uid is not None}
        last = self._store.get_meta("last_uid")
        uid = identity.allocate(self._ids, used, int(last) if last else None)
        self._store.set_meta("last_uid", str(uid))
        return uid

    def _remove_orphans(self, known: set[str]) -> None:
        """Directories left by a create or delete that crashed half-way have no row: remove them."""
        for parent in (self._vm_dir, self._run_dir):
            for d in parent.iterdir():
                if d.name not in known and not self._pid_alive_in(d):
                    log.info("removing leftover %s", d)
                    shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def _pid_alive_in(d: Path) -> bool:
        paths = RuntimePaths(d, d)
        uuid = process.recorded_uuid(paths)
        proc = process.read_pid(paths, uuid) if uuid else None
        return proc is not None and process.alive(proc)

    async def _reattach(self, vm: VmRuntime) -> None:
        proc = process.read_pid(vm.paths, vm.spec.uuid)
        if proc is None and vm.paths.argv_file.exists() and not vm.paths.pid_file.exists():
            # The daemon died between spawning QEMU and recording its pid.
            proc = await asyncio.to_thread(process.find_by_uuid, vm.spec.uuid)
        if proc is not None and process.alive(proc):
            vm.proc = proc
            vm.cgroup = await asyncio.to_thread(self._find_cgroup, vm, proc)
            try:
                await self._attach(vm)
                status = await vm.monitor.query_status() if vm.monitor else "unknown"
                vm.agent = await vm.monitor.chardev_frontend_open("qga0") if vm.monitor else False
            except Exception as e:  # noqa: BLE001 - reported as the VM's state reason
                log.warning("VM %s: QEMU pid %d alive but QMP unreachable: %s", vm.spec.name, proc.pid, e)
                self._set_state(vm, VmState.CRASHED, f"QEMU (pid {proc.pid}) not answering on QMP")
                return
            if status == "prelaunch":
                # The daemon died between spawning QEMU and `cont`: finish the start the user asked for.
                await vm.monitor.cont()  # type: ignore[union-attr]
                status = "running"
            state = _QEMU_STATES.get(status, VmState.PAUSED)
            if state is VmState.SHUTDOWN or state is VmState.CRASHED:
                # The guest powered off (or died) while the daemon was away; QEMU waited for us.
                vm.shutdown_reason = "guest-shutdown" if state is VmState.SHUTDOWN else "crashed"
                self._set_state(vm, state, status)
                await self._quit(vm)
                return
            self._set_state(vm, state, "reattached" if vm.state != state else vm.reason)
            return
        if vm.state.active:
            # QEMU is gone and nobody saw it go. A SIGTERM/SIGINT leaves its own line in QEMU's log.
            tail = _tail(vm.paths.qemu_log)
            if "terminating on signal" in tail:
                self._set_state(vm, VmState.SHUTOFF, "destroyed")
            else:
                self._set_state(vm, VmState.CRASHED, "QEMU exited while the daemon was not running")
        shutil.rmtree(vm.paths.run_dir, ignore_errors=True)

    def _find_cgroup(self, vm: VmRuntime, proc: process.QemuProcess) -> VmCgroup | None:
        """The cgroup of a QEMU found running. One of ours that the daemon had no time to move in (it died
        between spawn and attach) is moved in now; one started before isolation (as root) stays outside."""
        if self._cgroups.mode == "none":
            return None
        cg = self._cgroups.get(vm.cgroup_name)
        if cg is not None and cg.contains(proc.pid):
            return cg
        ident = identity.proc_identity(proc.pid)
        if ident is None or ident.uid != vm.uid:
            return None
        try:
            cg = self._cgroups.create(vm.cgroup_name, limits.cgroup_limits(vm.spec))
            cg.attach(proc.pid)
        except VmkitError as e:
            log.warning("VM %s: cannot move QEMU into its cgroup: %s", vm.spec.name, e.message)
            return None
        return cg

    async def autostart(self, marker: Path) -> None:
        """Start autostart VMs once per host boot (marker lives on the run dir's tmpfs), as libvirt does,
        so restarting the daemon never revives a VM the user shut down."""
        if marker.exists():
            return
        marker.touch()
        for vm in list(self._vms.values()):
            if vm.autostart and not vm.state.active:
                try:
                    await self.start(vm.spec.name)
                except VmkitError as e:
                    log.error("autostart of %s failed: %s", vm.spec.name, e.message)

    async def close(self) -> None:
        """Detach from every QEMU without stopping it."""
        for vm in self._vms.values():
            self._unwatch(vm)
            if vm.monitor:
                await vm.monitor.close()
                vm.monitor = None

    # ----- watching QEMU -------------------------------------------------------------------------
    async def _attach(self, vm: VmRuntime, *, timeout_s: float = 5.0) -> None:
        """Connect QMP and watch the process. vm.proc must be set."""
        assert vm.proc is not None
        vm.exited = asyncio.Event()
        fd = process.pidfd(vm.proc)
        if fd is None:
            raise QmpFailed("QEMU exited")
        vm.pidfd = fd
        asyncio.get_running_loop().add_reader(fd, self._on_pidfd, vm)
        mon = qmp.Monitor(vm.spec.name, log_path=vm.paths.qmp_log)
        try:
            await mon.connect(vm.paths.qmp_sock, lambda ev, data: self._on_event(vm, ev, data), timeout_s=timeout_s)
        except Exception:
            await mon.close()
            raise
        vm.monitor = mon

    def _unwatch(self, vm: VmRuntime) -> None:
        if vm.pidfd is not None:
            asyncio.get_running_loop().remove_reader(vm.pidfd)
            os.close(vm.pidfd)
            vm.pidfd = None

    def _on_pidfd(self, vm: VmRuntime) -> None:
        self._unwatch(vm)
        if not vm.launching:
            self._background.spawn(self._on_exit(vm))

    async def _on_exit(self, vm: VmRuntime) -> None:
        status = vm.popen.poll() if vm.popen else None  # reaps our own child; None if not ours
        if vm.monitor:
            await vm.monitor.close()
            vm.monitor = None
        if vm.shutdown_reason == "guest-shutdown":
            state, reason = VmState.SHUTOFF, "shutdown"
        elif vm.shutdown_reason == "crashed":
            state, reason = VmState.CRASHED, "crashed"
        elif vm.quit_requested or vm.shutdown_reason in ("host-qmp-quit", "host-signal", "host-ui"):
            state, reason = VmState.SHUTOFF, "destroyed"
        elif status is not None and status < 0:
            state, reason = VmState.CRASHED, f"QEMU killed by signal {-status}"
        elif status is not None:
            state, reason = (
                VmState.CRASHED,
                f"QEMU exited with status {status}: {_tail(vm.paths.qemu_log, 1)}",
            )
        else:
            state, reason = VmState.CRASHED, "QEMU exited unexpectedly"
        vm.proc = vm.popen = None
        vm.agent = False
        vm.shutdown_reason, vm.quit_requested, vm.reboot_pending = None, False, False
        shutil.rmtree(vm.paths.run_dir, ignore_errors=True)
        await self._drop_cgroup(vm)
        self._set_state(vm, state, reason)
        vm.exited.set()

    async def _drop_cgroup(self, vm: VmRuntime) -> None:
        if vm.cgroup is not None:
            vm.cgroup = None
            try:
                await asyncio.to_thread(self._cgroups.remove, vm.cgroup_name)
            except VmkitError as e:
                log.warning("VM %s: %s", vm.spec.name, e.message)

    async def _on_event(self, vm: VmRuntime, event: str, data: dict[str, Any]) -> None:
        if event == qmp.EV_SHUTDOWN:
            if vm.reboot_pending and data.get("guest"):
                # Fake reboot (as libvirt does): the guest powered off on our ACPI request; reset and run it.
                vm.reboot_pending = False
                if vm.monitor:
                    with contextlib.suppress(Exception):
                        await vm.monitor.system_reset()
                        await vm.monitor.cont()
                return
            if vm.shutdown_reason is None:  # the first SHUTDOWN names the cause; our own `quit` follows it
                vm.shutdown_reason = "guest-shutdown" if data.get("guest") else str(data.get("reason", "host"))
                self._set_state(vm, VmState.SHUTDOWN, vm.shutdown_reason)
            if data.get("guest"):
                # -no-shutdown kept QEMU alive so we could record why; now let it go.
                self._background.spawn(self._quit(vm))
        elif event == qmp.EV_STOP:
            if vm.shutdown_reason is None and not vm.reboot_pending:
                self._set_state(vm, VmState.PAUSED, "user")
        elif event in (qmp.EV_RESUME, qmp.EV_WAKEUP):
            self._set_state(vm, VmState.RUNNING, "unpaused" if event == qmp.EV_RESUME else "wakeup")
        elif event == qmp.EV_SUSPEND:
            self._set_state(vm, VmState.PMSUSPENDED, None)
        elif event == qmp.EV_GUEST_PANICKED:
            vm.shutdown_reason = "crashed"
            self._set_state(vm, VmState.CRASHED, "guest panicked")
            self._background.spawn(self._quit(vm))
        elif event == qmp.EV_VSERPORT_CHANGE and data.get("id") == "qga0":
            vm.agent = bool(data.get("open"))
            self._bus.publish("vm-agent", vm=vm.spec.name, connected=vm.agent)
        elif event == qmp.EV_DEVICE_DELETED and self.device_deleted is not None:
            self._background.spawn(self.device_deleted(vm, str(data.get("device") or "")))

    async def _quit(self, vm: VmRuntime, *, timeout_s: float = 1.0) -> None:
        """End QEMU: QMP quit, and SIGKILL if it has not exited within timeout_s."""
        vm.quit_requested = True
        if vm.monitor:
            with contextlib.suppress(Exception):
                await vm.monitor.quit()
        try:
            await asyncio.wait_for(vm.exited.wait(), timeout_s)
        except TimeoutError:
            if vm.proc:
                process.kill(vm.proc)
            await asyncio.wait_for(vm.exited.wait(), 5)

    # ----- create / delete -----------------------------------------------------------------------
    async def create(self, req: CreateVm) -> VmInfo:
        async with self._create_lock:
            if req.name in self._vms:
                raise Conflict(f"a VM named {req.name!r} already exists")
            host_mib = _host_memory_mib()
            if host_mib and req.memory_mib > host_mib:
                raise InvalidInput(f"memory_mib {req.memory_mib} exceeds the host's {host_mib} MiB")
            cpus = os.cpu_count() or 1
            if req.vcpus > cpus:
                raise InvalidInput(f"vcpus {req.vcpus} exceeds the host's {cpus} CPUs")
            kernel, initrd, cmdline, base = req.kernel, req.initrd, req.cmdline, None
            if req.image is not None and "/" in req.image:
                base = self._volumes.row(req.image).key  # a disk image volume: 404 when there is none
            elif req.image is not None:
                img = self._image_lookup(req.image)
                if img is None:
                    raise NotFound(f"no image named {req.image!r} (build the demo guest with `vmkit image demo`)")
                kernel = kernel or img.get("kernel")
                initrd = initrd or img.get("initrd")
                cmdline = cmdline if cmdline is not None else img.get("cmdline")
                if img.get("kind") == "iso":
                    raise InvalidInput(f"image {req.image!r} is install media: give it as --iso")
                base = img.get("disk_volume") or (self._volumes.key_of_path(img["disk"]) if img.get("disk") else None)
            for label, path in (("kernel", kernel), ("initrd", initrd)):
                if path is not None and not os.path.isfile(path):
                    raise InvalidInput(f"{label} {path} does not exist or is not a file")
            if initrd and not kernel:
                raise InvalidInput("an initrd needs a kernel")
            if (req.disk_iops_total or req.disk_bps_total) and not (base or req.disk_size_bytes):
                raise InvalidInput("disk I/O limits need a disk (give --disk SIZE or --image)")
            cdroms = [self.cdrom(req.iso)] if req.iso is not None else []
            with Reverter() as rev:
                spec_disks = await self._new_disks(req, base, rev)
                spec = VmSpec(
                    name=req.name,
                    uuid=str(uuid.uuid4()),
                    memory_mib=req.memory_mib,
                    vcpus=req.vcpus,
                    image=req.image,
                    kernel=kernel,
                    initrd=initrd,
                    cmdline=cmdline,
                    disks=spec_disks,
                    cdroms=cdroms,
                    nics=self._new_nics(req),
                    cpu_weight=req.cpu_weight,
                    cpu_max_percent=req.cpu_max_percent,
                    memory_max_mib=req.memory_max_mib,
                )
                spec = await self.add_seed(spec, req, rev)
                limits.check(spec)
                vm = self._register(spec, req.autostart)
                rev.success()
        await self._nics_changed(spec)
        return vm.info()

    def _register(self, spec: VmSpec, autostart: bool) -> VmRuntime:
        """Record a new VM (its row, with an identity of its own) and make it known; under _create_lock."""
        uid = self._next_uid()
        self._store.add_vm(spec, autostart=autostart, uid=uid)
        vm = VmRuntime(spec, autostart, VmState.SHUTOFF, None, self.paths(spec.name), uid=uid)
        self._vms[spec.name] = vm
        self._bus.publish("vm-created", vm=spec.name)
        return vm

    async def define(self, spec: VmSpec, *, autostart: bool = False) -> VmInfo:
        """Add a VM made elsewhere (a clone, a migrated VM) from its finished spec; its name must be free."""
        async with self._create_lock:
            if spec.name in self._vms:
                raise Conflict(f"a VM named {spec.name!r} already exists")
            vm = self._register(spec, autostart)
        await self._nics_changed(spec)
        return vm.info()

    def new_mac(self) -> str:
        """A MAC no NIC on this host has."""
        taken = {n.mac for vm in self._vms.values() for n in vm.spec.nics}
        mac = _mac()
        while mac in taken:
            mac = _mac()
        return mac

    async def _nics_changed(self, spec: VmSpec) -> None:
        """dnsmasq of each network the VM has a NIC on learns its MAC → name (DNS names of VMs)."""
        for net in {n.network for n in spec.nics if n.network}:
            try:
                await self._networks.hosts_changed(net)
            except VmkitError as e:
                log.warning("network %s: %s", net, e.message)

    def cdrom(self, source: str, drive: str = "cd0") -> CdromSpec:
        """A CD-ROM holding `source`: a volume POOL/NAME (an ISO, or a raw image), or an install-media image."""
        if "/" not in source:
            img = self._image_lookup(source)
            if img is None or not img.get("iso_volume"):
                raise NotFound(f"no install-media image named {source!r} (or give a volume as POOL/NAME)")
            source = str(img["iso_volume"])
        row = self._volumes.row(source)
        if row.format not in ("iso", "raw"):
            raise InvalidInput(f"{source} is a {row.format} image, not something a CD-ROM drive can read")
        return CdromSpec(name=drive, path=str(self._volumes.path(source)), volume=row.key)

    def check_attachable(self, key: str, readonly: bool, vm_name: str) -> None:
        row = self._volumes.row(key)
        if row.format == "iso":
            raise InvalidInput(f"{key} is an ISO image: give it as --iso (a CD-ROM), not as a disk")
        if row.format == "save":
            raise InvalidInput(f"{key} is a saved VM state (vmkit vm restore {key}), not a disk")
        users = [u for u in self.volume_users(key) if u != vm_name]
        if users and not readonly:
            raise Conflict(f"volume {key} is already used by VM(s) {', '.join(users)}")
        if self._volumes.busy(key):
            raise Conflict(f"volume {key} is busy (an operation on it is running)")

    async def _new_disks(self, req: CreateVm, base: str | None, rev: Reverter) -> list[DiskSpec]:
        """The disks of a new VM: an overlay on (or a copy of) its image, then each --disk in order. Volumes made
        here are owned by the VM (deleted with it); existing ones given by name are only attached."""
        disks: list[DiskSpec] = []

        def made(key: str) -> None:
            rev.add(lambda: self._volumes.discard(key))

        def next_name() -> str:
            return f"disk{len(disks)}"

        iops_first, bps_first = req.disk_iops_total, req.disk_bps_total
        first_pool = req.pool or DEFAULT_POOL
        if base is not None:
            base_row = self._volumes.row(base)
            ext = ".qcow2" if base_row.format == "qcow2" else ".raw"
            name = self._volumes.free_name(first_pool, f"{req.name}-disk0", ext if req.image_copy else ".qcow2")
            if req.image_copy:
                info = await self._volumes.clone(base, CloneVolume(target=f"{first_pool}/{name}"))
            else:
                info = await self._volumes.create_overlay(first_pool, name, base, req.disk_size_bytes)
            made(info.key)
            disks.append(
                DiskSpec(name=next_name(), path=info.path, format=info.format, volume=info.key,  # type: ignore[arg-type]
                         backing_image=req.image, iops_total=iops_first, bps_total=bps_first)
            )  # fmt: skip
        elif req.disk_size_bytes:
            name = self._volumes.free_name(first_pool, f"{req.name}-disk0", ".qcow2")
            info = await self._volumes.create(first_pool, CreateVolume(name=name, size_bytes=req.disk_size_bytes))
            made(info.key)
            disks.append(
                DiskSpec(name=next_name(), path=info.path, format="qcow2", volume=info.key,
                         iops_total=iops_first, bps_total=bps_first)
            )  # fmt: skip
        for d in req.disks:
            if d.volume is not None:
                self.check_attachable(d.volume, False, req.name)
                if any(x.volume == d.volume for x in disks):
                    raise InvalidInput(f"volume {d.volume} is given twice")
                row = self._volumes.row(d.volume)
                disks.append(
                    DiskSpec(name=next_name(), path=self._volumes.location(row.key), format=row.format,  # type: ignore[arg-type]
                             volume=row.key, owned=False, iops_total=d.iops_total, bps_total=d.bps_total)
                )  # fmt: skip
                continue
            pool = d.pool or first_pool
            name = self._volumes.free_name(pool, f"{req.name}-{next_name()}", f".{d.format}")
            assert d.size_bytes is not None  # DiskRequest: a size or a volume
            info = await self._volumes.create(
                pool, CreateVolume(name=name, size_bytes=d.size_bytes, format=d.format, prealloc=d.prealloc)
            )
            made(info.key)
            disks.append(
                DiskSpec(name=next_name(), path=info.path, format=d.format, volume=info.key,
                         iops_total=d.iops_total, bps_total=d.bps_total)
            )  # fmt: skip
        return disks

    def _new_nics(self, req: CreateVm) -> list[NicSpec]:
        """NICs of a new VM. None asked for: one on `default` when it exists (as virt-install does), else QEMU's
        restricted user networking. MACs are unique on this host."""
        taken = {n.mac for vm in self._vms.values() for n in vm.spec.nics}

        def mac(given: str | None) -> str:
            if given is not None and given in taken:
                raise Conflict(f"MAC {given} is already used on this host")
            new = given or _mac()
            while new in taken:
                new = _mac()
            taken.add(new)
            return new

        if not req.nic:
            if req.networks:
                raise InvalidInput("nic false and networks given: choose one")
            return []
        if not req.networks:
            if self._networks.exists(DEFAULT_NETWORK):
                return [NicSpec(kind="network", network=DEFAULT_NETWORK, mac=mac(None))]
            return [NicSpec(mac=mac(None))]
        nics = []
        for r in req.networks:
            if r.network == "user":
                nics.append(NicSpec(mac=mac(r.mac), model=r.model))
                continue
            if not self._networks.exists(r.network):
                raise NotFound(f"no network named {r.network!r} (vmkit network list)")
            self._networks.check_nic(r.network, r.vlan, r.trunks)
            nics.append(
                NicSpec(kind="network", network=r.network, mac=mac(r.mac), model=r.model, vlan=r.vlan, trunks=r.trunks)
            )
        return nics

    def _open_taps(self, vm: VmRuntime, stack: contextlib.ExitStack) -> tuple[int | None, ...]:
        """A tap per network NIC, on its network's bridge, open for QEMU (closed here once it has its copy)."""
        fds: list[int | None] = []
        for nic in vm.spec.nics:
            if nic.kind != "network" or nic.network is None:
                fds.append(None)
                continue
            fds.append(self.open_tap(vm.spec.name, nic, stack))
        return tuple(fds)

    def open_tap(self, vm: str, nic: NicSpec, stack: contextlib.ExitStack) -> int:
        """A tap for `nic`, a port of its network's bridge (closed by stack once QEMU has its copy). Named after
        the NIC (netN → …-N), at start as at hot-plug: the stats sampler maps taps back by it."""
        assert nic.network is not None
        bridge = self._networks.bridge_for_start(nic.network)
        ovs_port = self._networks.spec(nic.network).mode == "ovs"
        name = tap_name(vm, int(nic.name.removeprefix("net")), links.link_exists)
        fd = links.open_tap(name, bridge=None if ovs_port else bridge)
        stack.callback(os.close, fd)
        if ovs_port:
            self._networks.plug(nic.network, name, vlan=nic.vlan, trunks=nic.trunks)
        return fd

    def network_users(self, name: str) -> list[str]:
        return [vm.spec.name for vm in self.runtimes() if any(n.network == name for n in vm.spec.nics)]

    def network_running_users(self, name: str) -> list[str]:
        return [n for n in self.network_users(name) if self._vms[n].state.active or self._vms[n].proc is not None]

    def network_hosts(self, name: str) -> list[tuple[str, str]]:
        """(MAC, VM name) of every NIC on network `name`: dnsmasq names the leases after their VMs."""
        out = []
        for vm in self.runtimes():
            on_it = [n for n in vm.spec.nics if n.network == name]
            # The VM's name for its first NIC there, NAME-netN for more (one name per address in DNS).
            out += [(n.mac, vm.spec.name if k == 0 else f"{vm.spec.name}-{n.name}") for k, n in enumerate(on_it)]
        return out

    async def ifaddr(self, name: str, *, source: str) -> list[dict[str, Any]]:
        """The guest's addresses like `virsh domifaddr`: from the networks' DHCP leases, or from its agent."""
        vm = self._get(name)
        if source == "agent":
            if vm.state is not VmState.RUNNING or not vm.agent:
                raise Conflict(f"the guest agent of {name!r} is not connected")
            ifaces = await self.agent_execute(vm, "guest-network-get-interfaces")
            out = []
            for iface in ifaces:
                for a in iface.get("ip-addresses") or []:
                    if iface.get("name") != "lo":
                        out.append({"interface": iface.get("name"), "mac": iface.get("hardware-address"),
                                    "address": f"{a.get('ip-address')}/{a.get('prefix')}",
                                    "family": a.get("ip-address-type"), "source": "agent"})  # fmt: skip
            return out
        out = []
        for i, nic in enumerate(vm.spec.nics):
            if nic.network is None:
                continue
            for lease in self._networks.leases(nic.network):
                if lease.mac == nic.mac:
                    out.append({"interface": f"net{i}", "mac": nic.mac, "address": lease.ip, "family": "ipv4",
                                "network": nic.network, "source": "lease"})  # fmt: skip
        return out

    def volume_users(self, key: str) -> list[str]:
        """VMs whose disks or CD-ROMs are volume `key`, then 'VM (snapshot S)' for snapshots that need it and
        'VM (base)' for a VM it is a base of (a linked clone froze it)."""
        bases = [f"{vm.spec.name} (base)" for vm in self.runtimes() if key in vm.spec.bases]
        return self._vm_users(key) + self.snapshot_refs(key) + bases

    def _vm_users(self, key: str) -> list[str]:
        return [
            vm.spec.name
            for vm in sorted(self._vms.values(), key=lambda v: v.spec.name)
            if any(d.volume == key for d in vm.spec.disks) or any(c.volume == key for c in vm.spec.cdroms)
        ]

    def volume_running_users(self, key: str) -> list[str]:
        return [n for n in self._vm_users(key) if self._vms[n].state.active or self._vms[n].proc is not None]

    def owned_volumes(self, vm: VmRuntime, *, leave_shared: bool = False) -> list[str]:
        """The volumes that are the VM's own (deleted with it): its disks vmkit made, the images only its snapshots
        name (services/snapshots.py) and its bases. leave_shared: not those on shared pools."""
        owned = [
            d.volume for d in vm.spec.disks
            if d.owned and d.volume and not (leave_shared and is_network(d.path))
        ]  # fmt: skip
        return owned + [k for k in [*self.snapshot_images(vm.spec.name), *vm.spec.bases] if k not in owned]

    async def delete(self, name: str, *, keep_disks: bool = False, leave_shared: bool = False) -> None:
        """Forget a VM and delete the volumes it owns (unless keep_disks). leave_shared: its volumes on shared
        pools stay (it runs on another host now, or never came here: a migration's end)."""
        vm = self._get(name)
        async with vm.lock:
            if vm.state.active:
                raise Conflict(f"VM {name!r} is {vm.state}; stop it first")
            owned = self.owned_volumes(vm, leave_shared=leave_shared)
            if not keep_disks:
                for key in owned:
                    deps = [k for k in self._volumes.dependents(key) if k not in owned]
                    if deps:
                        raise Conflict(
                            f"disk {key} of {name!r} backs volume(s) {', '.join(deps)}: delete them first, "
                            "or keep the disks (--keep-disks)"
                        )
            # The row goes first: a crash after it leaves the disks as volumes of no VM (kept), never a VM
            # whose disks are gone.
            for d in vm.spec.disks:
                if d.owned and not is_network(d.path):
                    with contextlib.suppress(OSError):
                        os.chown(d.path, 0, 0)  # its identity may go to another VM later
            saves = self.saved_images(vm)  # its managed save: useless without the VM, whatever keep_disks says
            self._store.delete_vm(name)
            del self._vms[name]
            for key in saves:
                try:
                    await self._volumes.delete(key)
                except VmkitError as e:
                    log.warning("VM %s deleted, but not its saved state %s: %s", name, key, e.message)
            if not keep_disks:
                # Overlays before the images below them.
                for key in sorted(owned, key=lambda k: -self._volumes.depth(k, owned)):
                    try:
                        await self._volumes.delete(key)
                    except VmkitError as e:
                        log.warning("VM %s deleted, but not its disk %s: %s", name, key, e.message)
            shutil.rmtree(vm.paths.vm_dir, ignore_errors=True)
            shutil.rmtree(vm.paths.run_dir, ignore_errors=True)
            self._bus.publish("vm-deleted", vm=name)
        await self._networks.vm_gone(name)
        await self._nics_changed(vm.spec)

    async def set_limits(self, name: str, req: SetVm) -> VmInfo:
        """Change limits; a running VM gets them at once, a stopped one at its next start."""
        vm = self._get(name)
        async with vm.lock:
            spec = limits.updated(vm.spec, req)
            if vm.state.active and vm.proc is not None:
                if limits.has_cgroup_limits(spec) and vm.cgroup is None:
                    raise Conflict(
                        f"VM {name!r} runs outside a cgroup (started before isolation, or cgroups are unusable "
                        "here): restart it to apply CPU and memory limits"
                    )
                if vm.cgroup is not None:
                    await asyncio.to_thread(vm.cgroup.apply, limits.cgroup_limits(spec))
                if req.disks:
                    mon = self._need_monitor(vm, VmState.RUNNING, VmState.PAUSED)
                    for d in req.disks:
                        disk = spec.disk(d.name)
                        if disk is not None:  # limits.updated() refused unknown names
                            await _qmp(limits.apply_disk(mon, disk))
            vm.spec = spec
            self._store.set_vm_spec(spec)
            return vm.info()

    async def disks(self, name: str) -> list[dict[str, Any]]:
        """The VM's drives like `virsh domblklist --details`, with the I/O limits QEMU enforces right now
        (query-block) while it runs."""
        vm = self._get(name)
        live: dict[str, dict[str, Any]] = {}
        if vm.monitor is not None and vm.state.active:
            for dev in await _qmp(vm.monitor.query_block()):
                ins = dev.get("inserted") or {}
                live[str(dev.get("qdev", ""))] = {k: ins.get(k) for k in ("iops", "bps", "group")}
        out: list[dict[str, Any]] = []
        for d in vm.spec.disks:
            row = self._volume_row(d.volume)
            out.append(
                {"name": d.name, "device": "disk", "path": d.path, "volume": d.volume, "format": d.format,
                 "provisioning": provisioning(row.format, row.prealloc) if row else None,
                 "backing": row.backing if row else None, "readonly": d.readonly, "owned": d.owned,
                 "iops_total": d.iops_total, "bps_total": d.bps_total, "live": live.get(limits.qdev(d.name)),
                 "cloud_init": d.cloud_init}
            )  # fmt: skip
        for c in vm.spec.cdroms:
            row = self._volume_row(c.volume)
            out.append(
                {"name": c.name, "device": "cdrom", "path": c.path, "volume": c.volume,
                 "format": row.format if row else ("raw" if c.path else None), "readonly": True}
            )  # fmt: skip
        return out

    def _volume_row(self, key: str | None) -> Any:
        if key is None:
            return None
        try:
            return self._volumes.row(key)
        except VmkitError:
            return None

    async def set_autostart(self, name: str, enabled: bool) -> VmInfo:
        vm = self._get(name)
        self._store.set_autostart(name, enabled)
        vm.autostart = enabled
        return vm.info()

    # ----- lifecycle -----------------------------------------------------------------------------
    async def start(self, name: str) -> VmInfo:
        vm = self._get(name)
        async with vm.lock:
            if vm.state.active:
                raise Conflict(f"VM {name!r} is already {vm.state}")
            if vm.proc is not None and process.alive(vm.proc):
                raise Conflict(f"QEMU of {name!r} (pid {vm.proc.pid}) is still there; `vm stop --force` it first")
            if vm.state is VmState.SAVED and self.resume_saved is not None:
                await self.resume_saved(vm)  # where its managed save left it (then that save is deleted)
                return vm.info()
            await self.boot(vm)
            return vm.info()

    async def boot(
        self,
        vm: VmRuntime,
        *,
        loadvm: str | None = None,
        incoming_fd: int | None = None,
        incoming: Callable[[qmp.Monitor], Awaitable[None]] | None = None,
    ) -> None:
        """Start QEMU for vm, whose lock the caller holds (start; a snapshot's revert with loadvm, its tag; a
        restore with incoming_fd, a descriptor of a save file positioned at its state, which QEMU loads before
        any guest code runs: the VM is left paused, and the caller decides whether to `cont`; an incoming live
        migration with `incoming`, which readies the paused QEMU to receive it: services/migrations.py)."""
        for label, path in (("kernel", vm.spec.kernel), ("initrd", vm.spec.initrd)):
            if path and not os.path.isfile(path):
                raise Conflict(f"cannot start {vm.spec.name!r}: its {label} {path} is missing")
        if loadvm is None and incoming_fd is None and incoming is None:
            fresh = cold(vm.spec)  # a fresh machine: hot-plugged devices on ports of their own again
            if fresh is not vm.spec:
                self.save_spec(vm, fresh)
        vm.launching = True
        try:
            await self._launch(vm, loadvm=loadvm, incoming_fd=incoming_fd, incoming=incoming)
        finally:
            vm.launching = False
        if vm.pidfd is None and vm.proc is not None:
            # It exited during the last step of a launch that succeeded: report it as any exit.
            self._background.spawn(self._on_exit(vm))

    async def halt(self, vm: VmRuntime) -> None:
        """Hard stop of vm's QEMU, if it has one; the caller holds the VM's lock."""
        if vm.proc is not None and process.alive(vm.proc):
            await self._quit(vm)

    async def _launch(
        self,
        vm: VmRuntime,
        *,
        loadvm: str | None = None,
        incoming_fd: int | None = None,
        incoming: Callable[[qmp.Monitor], Awaitable[None]] | None = None,
    ) -> None:
        paths = vm.paths
        longest = max(len(str(p)) for p in (paths.qmp_sock, paths.serial_sock, paths.qga_sock))
        if longest > MAX_SOCKET_PATH:
            raise Conflict(
                f"cannot start {vm.spec.name!r}: its socket paths under {paths.run_dir} would be {longest} bytes, "
                f"over the kernel's {MAX_SOCKET_PATH}; use a shorter run dir or VM name"
            )
        vm.shutdown_reason, vm.quit_requested, vm.reboot_pending, vm.agent = None, False, False, False
        if vm.uid is None:
            raise Conflict(f"cannot start {vm.spec.name!r}: it has no identity yet")
        ident = identity.Identity(vm.uid, vm.uid)
        try:
            shutil.rmtree(paths.run_dir, ignore_errors=True)
            # Both dirs stay root-only: QEMU reaches nothing in them but through the descriptors it is handed.
            paths.run_dir.mkdir(parents=True, mode=0o700)
            paths.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            paths.qemu_log.write_bytes(b"")  # both logs hold one run: the latest
            paths.qmp_log.write_bytes(b"")
            if self._cgroups.mode != "none":
                vm.cgroup = await asyncio.to_thread(self._cgroups.create, vm.cgroup_name, limits.cgroup_limits(vm.spec))
            elif limits.has_cgroup_limits(vm.spec):
                raise Conflict(f"CPU and memory limits need cgroups, unusable here: {self._cgroups.describe()}")
            busy = [d.volume for d in vm.spec.disks if d.volume and self._volumes.busy(d.volume)]
            if busy:
                raise Conflict(f"volume(s) {', '.join(busy)} are busy (an operation on them is running)")
            with contextlib.ExitStack() as stack:
                taps = await asyncio.to_thread(self._open_taps, vm, stack)  # netlink: off the event loop
                fds = stack.enter_context(
                    open_handover(vm.spec, paths, ident.uid, ident.gid, format_of=self._volumes.format_of, taps=taps)
                )
                defer = "defer" if incoming_fd is not None or incoming is not None else None
                argv = qemu_argv(vm.spec, paths, self._host, fds, loadvm=loadvm, incoming=defer)
                vm.proc, vm.popen = process.spawn(
                    argv,
                    paths,
                    pass_fds=fds.all(),
                    launcher=identity.launcher(ident, extra_gids=self._extra_gids),
                    cgroup=vm.cgroup,
                )
        except (OSError, ValueError, VmkitError) as e:
            shutil.rmtree(paths.run_dir, ignore_errors=True)
            await self._drop_cgroup(vm)
            self._set_state(vm, VmState.SHUTOFF, "failed")
            # Keep the class (and so the HTTP status) of a refusal vmkit made on purpose.
            cls, detail = (type(e), e.message) if isinstance(e, VmkitError) else (VmkitError, str(e))
            raise cls(f"cannot start {vm.spec.name!r}: {detail}") from e
        try:
            # QEMU answers qmp_capabilities once it has built the machine: 20 starting at once under TCG on 2 CPUs
            # took up to 4.4 s, and with other load on the host most of 20 starts failed the 5 s of re-attach. A
            # QEMU that dies meanwhile resets the connection at once, so a longer wait only waits for a slow one.
            await self._attach(vm, timeout_s=START_QMP_TIMEOUT_S)
            await limits.apply_disks(vm.monitor, vm.spec, only_limited=True)  # type: ignore[arg-type]
            if incoming is not None:
                await incoming(vm.monitor)  # type: ignore[arg-type]
            elif incoming_fd is None:
                await vm.monitor.cont()  # type: ignore[union-attr]
            else:
                # No `cont` before the state is loaded: the guest would run from nothing (QEMU would only note
                # it for later, but a paused save must stay paused). QEMU is paused once this returns.
                timeout_s = savevm.timeout_for(vm.spec.memory_mib)
                crashpoint("restore-spawned")
                await savevm.load_state(vm.monitor, incoming_fd, timeout_s=timeout_s)  # type: ignore[arg-type]
        except Exception as e:
            # Stop watching first: this failure is reported as "failed", not as a crash.
            self._unwatch(vm)
            popen = vm.popen
            if vm.proc:
                process.kill(vm.proc)
            if popen:
                await asyncio.to_thread(popen.wait, 5)
            if vm.monitor:
                await vm.monitor.close()
                vm.monitor = None
            vm.proc = vm.popen = None
            detail = _tail(paths.qemu_log, 3) or f"{type(e).__name__}: {e}"
            shutil.rmtree(paths.run_dir, ignore_errors=True)
            await self._drop_cgroup(vm)
            self._set_state(vm, VmState.SHUTOFF, "failed")
            if incoming_fd is not None:  # QEMU could not load a saved state (502: QEMU failed, not vmkit)
                raise QmpFailed(f"QEMU could not load the saved state of {vm.spec.name!r}: {detail}") from e
            if incoming is not None and isinstance(e, VmkitError):
                raise
            raise VmkitError(f"QEMU failed to start {vm.spec.name!r}: {detail}") from e
        if incoming_fd is not None or incoming is not None:
            self._set_state(vm, VmState.PAUSED, "restored" if incoming is None else "incoming migration")
            return
        # RESUME may already have set it; setting again is a no-op.
        self._set_state(vm, VmState.RUNNING, "booted" if loadvm is None else "reverted")

    def _need_monitor(self, vm: VmRuntime, *allowed: VmState) -> qmp.Monitor:
        if vm.state not in allowed or vm.monitor is None:
            want = " or ".join(str(s) for s in allowed)
            raise Conflict(f"VM {vm.spec.name!r} is {vm.state}, must be {want}")
        return vm.monitor

    async def shutdown(self, name: str, *, timeout_s: float = 60.0, force: bool = False, mode: str = "auto") -> VmInfo:
        """Power off through ACPI, the guest agent (mode agent), or ACPI and then the agent when the guest has not
        reacted within AGENT_AFTER_S (auto: a guest that ignores its power button but runs qemu-ga); wait up to
        timeout_s for the guest to turn off, then fail (or hard-stop if force)."""
        vm = self._get(name)
        async with vm.lock:
            if not vm.state.active:
                raise Conflict(f"VM {name!r} is not running")
            asked = vm.state is VmState.RUNNING and vm.monitor is not None
            if asked and mode == "agent" and not vm.agent:
                raise Conflict(f"VM {name!r} has no guest agent connected: shut it down through ACPI")
            vm.reboot_pending = False  # an earlier reboot the guest ignored must not turn this into one
            if asked and mode != "agent":
                await _qmp(vm.monitor.system_powerdown())  # type: ignore[union-attr]
            elif not asked and not force:
                raise Conflict(f"VM {name!r} is {vm.state}; a guest can only power off while running (use --force)")

        def off(s: VmState) -> bool:
            return not s.active

        # Waiting happens outside the lock, so a `stop --force` from elsewhere is not held up by it.
        if asked and mode != "acpi":
            first = 0.0 if mode == "agent" else min(AGENT_AFTER_S, timeout_s / 2)
            if await self._wait_state(vm, off, first):
                return vm.info()
            if vm.agent and vm.state.active:
                with contextlib.suppress(VmkitError, OSError):
                    async with self.agent_session(vm) as agent:
                        await agent.shutdown()
            timeout_s -= first
        if await self._wait_state(vm, off, timeout_s if asked else 0):
            return vm.info()
        if not force:
            raise Timeout(f"VM {name!r} did not shut down within {timeout_s:g} s (use --force to stop it hard)")
        async with vm.lock:
            if vm.proc is not None and process.alive(vm.proc):
                await self._quit(vm)
        return vm.info()

    async def destroy(self, name: str) -> VmInfo:
        """Hard stop, like pulling the plug (virsh destroy)."""
        vm = self._get(name)
        async with vm.lock:
            # Not vm.state: a QEMU that stopped answering QMP is shown crashed but must still be stoppable.
            if vm.proc is None or not process.alive(vm.proc):
                raise Conflict(f"VM {name!r} is not running")
            await self._quit(vm)
            return vm.info()

    async def reboot(self, name: str) -> VmInfo:
        vm = self._get(name)
        async with vm.lock:
            mon = self._need_monitor(vm, VmState.RUNNING)
            vm.reboot_pending = True
            await _qmp(mon.system_powerdown())
            return vm.info()

    async def pause(self, name: str) -> VmInfo:
        vm = self._get(name)
        async with vm.lock:
            mon = self._need_monitor(vm, VmState.RUNNING)
            await _qmp(mon.stop())
            self._set_state(vm, VmState.PAUSED, "user")
            return vm.info()

    async def resume(self, name: str) -> VmInfo:
        vm = self._get(name)
        async with vm.lock:
            mon = self._need_monitor(vm, VmState.PAUSED)
            await _qmp(mon.cont())
            self._set_state(vm, VmState.RUNNING, "unpaused")
            return vm.info()

    async def wait(self, name: str, *, want: str, timeout_s: float) -> VmInfo:
        """Wait until the VM's state is `want` (a state word) or, for want='agent', its guest agent is up."""
        vm = self._get(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if (want == "agent" and vm.agent) or want == str(vm.state):
                return vm.info()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Timeout(f"VM {name!r} is {vm.state} (agent {'up' if vm.agent else 'down'}), not {want}")
            q = self._bus.subscribe()
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(q.get(), min(remaining, 1.0))
            finally:
                self._bus.unsubscribe(q)

    # ----- guest agent, console, log -------------------------------------------------------------
    async def exec(self, name: str, argv: list[str], *, timeout_s: float, input_data: bytes | None) -> ExecResult:
        vm = self._get(name)
        if vm.state is not VmState.RUNNING:
            raise Conflict(f"VM {name!r} is {vm.state}; exec needs it running")
        if not vm.agent:
            raise Conflict(f"the guest agent of {name!r} is not connected (is qemu-ga running in the guest?)")
        async with vm.agent_lock:
            agent = await Agent.connect(vm.paths.qga_sock)
            try:
                return await agent.exec(argv, input_data=input_data, timeout_s=timeout_s)
            finally:
                await agent.close()

    @contextlib.asynccontextmanager
    async def agent_session(self, vm: VmRuntime) -> AsyncIterator[Agent]:
        """A connection to the VM's guest agent, its only client meanwhile. One session for commands that belong
        together (freeze … thaw): qemu-ga takes up to ~0.1 s to accept a client right after one has left."""
        async with vm.agent_lock:
            agent = await Agent.connect(vm.paths.qga_sock)
            try:
                yield agent
            finally:
                await agent.close()

    async def agent_execute(self, vm: VmRuntime, cmd: str, *, timeout_s: float = 10.0) -> Any:
        """One command to the VM's guest agent; AgentError if it fails."""
        async with self.agent_session(vm) as agent:
            return await agent.execute(cmd, timeout_s=timeout_s)

    def serial_log(self, name: str) -> bytes:
        vm = self._get(name)
        try:
            return vm.paths.serial_log.read_bytes()
        except FileNotFoundError:
            return b""

    @contextlib.asynccontextmanager
    async def console(self, name: str) -> Any:
        """Exclusive connection to the VM's serial console socket (QEMU serves one client at a time)."""
        vm = self._get(name)
        if not vm.state.active:
            raise Conflict(f"VM {name!r} is not running")
        if vm.console_busy:
            raise Conflict(f"the console of {name!r} is already in use")
        vm.console_busy = True
        try:
            async with _stream(asyncio.open_unix_connection(str(vm.paths.serial_sock))) as stream:
                yield stream
        finally:
            vm.console_busy = False

    @contextlib.asynccontextmanager
    async def vnc(self, name: str) -> Any:
        """A new client of the VM's VNC server (shared: several at once): a stream QEMU speaks RFB on. QEMU has
        no VNC listener; it is handed one end of a socket pair over QMP, so it needs no path of ours."""
        vm = self._get(name)
        if not vm.state.active or vm.monitor is None:
            raise Conflict(f"VM {name!r} is not running")
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                await _qmp(vm.monitor.add_vnc_client(theirs))
        except BaseException:
            ours.close()
            raise
        async with _stream(asyncio.open_connection(sock=ours)) as stream:
            yield stream


@contextlib.asynccontextmanager
async def _stream(
    opening: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """The stream `opening` gives, closed when the caller is done with it (a console's or a VNC viewer's)."""
    reader, writer = await opening
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def running_machine(vm: VmRuntime) -> VmSpec:
    """vm's spec with its machine's root ports pinned (spec.ports) while QEMU runs: a hot-plug about to change its
    devices must not change the ports a migration, a restore or a RAM snapshot's revert rebuilds."""
    if vm.proc is None or vm.spec.ports is not None:
        return vm.spec
    return vm.spec.model_copy(update={"ports": machine_ports(vm.spec)})


async def _qmp(coro: Any) -> Any:
    try:
        return await coro
    except TimeoutError as e:
        raise QmpFailed("QEMU did not answer on QMP in time") from e
    except VmkitError:
        raise
    except Exception as e:
        raise QmpFailed(f"QMP command failed: {e}") from e


def _tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])
