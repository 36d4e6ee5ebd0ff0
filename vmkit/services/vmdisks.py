"""A VM's drives: attaching and detaching disks, changing CD-ROM media — live while it runs, else for its next
start (virsh attach-disk / detach-disk / change-media, with --live --config at once).

The spec changes only after QEMU has done it, so a refusal or a guest that does not let go leaves the VM as
it was. Files are opened by the daemon and handed over as descriptors (qemu/handover.py), as at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from vmkit.errors import Conflict, InvalidInput, NotFound
from vmkit.model.vm import MAX_CDROMS, MAX_DISKS, AttachDisk, CdromSpec, ChangeMedia, DiskSpec, VmState
from vmkit.qemu import hotplug
from vmkit.qemu.argv import is_network
from vmkit.qemu.handover import open_disk, open_medium
from vmkit.services.vms import VmRuntime, VmService, _qmp, running_machine
from vmkit.services.volumes import VolumeService

log = logging.getLogger(__name__)


class VmDiskService:
    def __init__(self, *, vms: VmService, volumes: VolumeService) -> None:
        self._vms = vms
        self._volumes = volumes
        vms.device_deleted = self._late_unplug

    def _live_monitor(self, vm: VmRuntime) -> Any:
        """The monitor when the change must also happen in QEMU now; None for a stopped VM."""
        if vm.proc is None and not vm.state.active:
            return None
        if vm.state not in (VmState.RUNNING, VmState.PAUSED) or vm.monitor is None:
            raise Conflict(f"VM {vm.spec.name!r} is {vm.state}; its drives change while running, paused or shut off")
        return vm.monitor

    async def attach(self, name: str, req: AttachDisk) -> list[dict[str, Any]]:
        vm = self._vms.runtime(name)
        async with vm.lock:
            self._vms.check_attachable(req.volume, req.readonly, name)
            if any(d.volume == req.volume for d in vm.spec.disks):
                raise Conflict(f"volume {req.volume} is already a disk of {name!r}")
            if len(vm.spec.disks) >= MAX_DISKS:
                raise Conflict(f"VM {name!r} has {MAX_DISKS} disks already")
            taken = {d.name for d in vm.spec.disks}
            node = next(f"disk{i}" for i in range(MAX_DISKS + 1) if f"disk{i}" not in taken)
            disk = DiskSpec(
                name=node,
                path=self._volumes.location(req.volume),
                format=self._volumes.qemu_format(req.volume),  # type: ignore[arg-type]
                volume=self._volumes.row(req.volume).key,
                owned=False,
                readonly=req.readonly,
            )
            mon = self._live_monitor(vm)
            if mon is not None:
                uid = vm.uid if vm.uid is not None else 0
                with contextlib.ExitStack() as stack:
                    fds = open_disk(stack, disk, uid, uid, self._volumes.format_of)
                    port = await _qmp(hotplug.attach_disk(mon, disk, fds))
                disk = disk.model_copy(update={"port": port})
            self._vms.save_spec(vm, running_machine(vm).model_copy(update={"disks": [*vm.spec.disks, disk]}))
        return await self._vms.disks(name)

    async def detach(
        self, name: str, target: str, *, timeout_s: float = hotplug.DETACH_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Detach disk `target` (its node name, disk1, or its volume POOL/NAME). Its volume is kept."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            disk = vm.spec.disk(target) or next((d for d in vm.spec.disks if d.volume == target), None)
            if disk is None:
                names = ", ".join(d.name for d in vm.spec.disks) or "none"
                raise NotFound(f"VM {name!r} has no disk {target!r} (its disks: {names})")
            mon = self._live_monitor(vm)
            if mon is not None:
                if vm.state is VmState.PAUSED:
                    # The guest must acknowledge the unplug, and a paused one cannot.
                    raise Conflict(f"VM {name!r} is paused: resume it first, its guest must let go of {disk.name}")
                try:
                    await _qmp(hotplug.detach_disk(mon, disk.name, timeout_s=timeout_s))
                except hotplug.UnplugTimeout:
                    # The request stays pending in the guest; if it lets go later, _late_unplug finishes the job.
                    vm.pending_detach.add(disk.name)
                    raise
            self._forget(vm, disk)
        return await self._vms.disks(name)

    def _forget(self, vm: VmRuntime, disk: DiskSpec) -> None:
        vm.pending_detach.discard(disk.name)
        spec = running_machine(vm)
        self._vms.save_spec(vm, spec.model_copy(update={"disks": [d for d in spec.disks if d.name != disk.name]}))
        if disk.owned and not is_network(disk.path):
            with contextlib.suppress(OSError):
                os.chown(disk.path, 0, 0)  # no VM's identity keeps a right on a volume it no longer has

    async def _late_unplug(self, vm: VmRuntime, device: str) -> None:
        """The guest acknowledged an unplug after detach_disk gave up waiting: drop the disk now."""
        node = device.removesuffix("-dev")
        if node not in vm.pending_detach:
            return
        async with vm.lock:
            disk = vm.spec.disk(node)
            if disk is None or vm.monitor is None:
                return
            try:
                await hotplug.release_disk(vm.monitor, node)
            except Exception as e:  # noqa: BLE001 - QEMU gone or refusing: the next start drops it anyway
                log.warning("VM %s: releasing %s after a late unplug: %s", vm.spec.name, node, e)
            self._forget(vm, disk)
            log.info("VM %s: the guest let go of %s late; detached", vm.spec.name, node)

    async def change_media(self, name: str, req: ChangeMedia) -> list[dict[str, Any]]:
        """Insert a medium into CD-ROM drive req.drive, or eject it (source null). A stopped VM without that
        drive gets one (for its next start); a running one cannot (IDE drives do not hot-plug)."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            new = self._vms.cdrom(req.source, req.drive) if req.source is not None else CdromSpec(name=req.drive)
            drives = {c.name: c for c in vm.spec.cdroms}
            mon = self._live_monitor(vm)
            if req.drive not in drives:
                if mon is not None:
                    raise Conflict(f"VM {name!r} has no CD-ROM drive {req.drive}; add it while the VM is shut off")
                if req.source is None:
                    raise NotFound(f"VM {name!r} has no CD-ROM drive {req.drive}")
                if len(drives) >= MAX_CDROMS:
                    raise InvalidInput(f"VM {name!r} has {MAX_CDROMS} CD-ROM drives already")
            if mon is not None:
                with contextlib.ExitStack() as stack:
                    fd = open_medium(stack, new.path) if new.path is not None else None
                    await _qmp(hotplug.change_medium(mon, req.drive, fd))
            drives[req.drive] = new
            cdroms = sorted(drives.values(), key=lambda c: c.name)
            self._vms.save_spec(vm, vm.spec.model_copy(update={"cdroms": cdroms}))
        return await self._vms.disks(name)
