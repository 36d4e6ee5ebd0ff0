"""Cloning a VM (virt-manager's "Clone", virt-clone): a new VM with the source's devices, a new UUID, new MACs
and disks of its own.

- Full clone: each writable disk is copied into a standalone image (an overlay's chain flattened). From a
  running source, through a temporary external snapshot: the guest writes into fresh overlays while its images
  are copied, and the overlays are merged back (active block-commit) afterwards, so the source ends as it began.
- Linked clone: the source's current images become read-only bases of both VMs: each VM gets a new overlay on
  them (the source's live, in one transaction, while it runs). The source owns the bases (VmSpec.bases): they
  go when it is deleted, which is refused while a clone still stands on them (as for any volume with overlays).
- Read-only disks (shared volumes) and CD-ROM media are shared, not copied.

Crash safety: the plan is journaled on the source VM first. recover() merges back a temporary snapshot left
under a running (or stopped) source, and either finishes the clone (every new image ready, and for a linked
clone the source switched) or removes what it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from vmkit.errors import Conflict
from vmkit.model.storage import CloneVolume, split_volume
from vmkit.model.vm import CloneVm, VmInfo, VmSpec
from vmkit.qemu import blocksnap
from vmkit.qemu.monitor import Monitor
from vmkit.services import journal
from vmkit.services.operations import Progress
from vmkit.services.reverter import Reverter
from vmkit.services.snapshots import SnapshotService, refuse_shared
from vmkit.services.vms import VmRuntime, VmService, _qmp
from vmkit.services.volumes import VolumeService
from vmkit.storage import qemu_img
from vmkit.store.db import Store
from vmkit.util.crash import crashpoint

log = logging.getLogger(__name__)


def _no_progress(fraction: float, message: str) -> None:
    pass


async def _same_seed(spec: VmSpec, rev: Reverter) -> VmSpec:
    return spec


class CloneService:
    def __init__(self, *, store: Store, vms: VmService, volumes: VolumeService, snapshots: SnapshotService) -> None:
        self._store = store
        self._vms = vms
        self._volumes = volumes
        self._snapshots = snapshots
        # Set by services/cloudinit.py: the clone's spec with a cloud-init seed of its own (undone by the Reverter).
        self.new_seed: Callable[[VmSpec, Reverter], Awaitable[VmSpec]] = _same_seed

    def check(self, src: str, req: CloneVm) -> None:
        """Refuse up front (404/409) what would fail anyway: no source, a taken name."""
        refuse_shared(self._vms.runtime(src), "clones of a VM")
        if any(v.spec.name == req.name for v in self._vms.runtimes()):
            raise Conflict(f"a VM named {req.name!r} already exists")

    async def clone(self, src_name: str, req: CloneVm, progress: Progress = _no_progress) -> VmInfo:
        self.check(src_name, req)
        src = self._vms.runtime(src_name)
        async with src.lock:
            self._snapshots.check_free(src)
            live = self._snapshots.live(src)
            disks = [d for d in src.spec.disks if not d.readonly and d.volume]
            plan: dict[str, Any] = {"op": "clone", "name": req.name, "uuid": str(uuid.uuid4()), "linked": req.linked}
            # New images: the clone's (copies or overlays), and for a linked clone the source's new overlays.
            plan["disks"] = {d.name: self._new_key(d.volume or "", f"{req.name}-{d.name}") for d in disks}
            plan["source"] = (
                {d.name: self._new_key(d.volume or "", f"{src_name}-{d.name}") for d in disks} if req.linked else {}
            )
            plan["temp"] = (
                {d.name: self._new_key(d.volume or "", f"{src_name}-{d.name}-clonetmp") for d in disks}
                if live is not None and not req.linked
                else {}
            )
            plan["frozen"] = {d.name: d.volume for d in disks}
            self._store.set_journal(src_name, plan)
            try:
                if req.linked:
                    await self._linked(src, plan, live)
                else:
                    await self._full(src, plan, live, progress)
            except BaseException:
                await self._undo(src, plan, live)
                raise
            spec = self._clone_spec(src.spec, plan, req)
        crashpoint("clone-made")
        return await self._finish(src, plan, spec)

    def _new_key(self, like: str, stem: str) -> str:
        pool = split_volume(like)[0]
        ext = ".qcow2" if self._volumes.row(like).format == "qcow2" else ".raw"
        return f"{pool}/{self._volumes.free_name(pool, stem, ext)}"

    async def _full(
        self, src: VmRuntime, plan: dict[str, Any], live: tuple[Monitor, int] | None, progress: Progress
    ) -> None:
        if live is not None:
            # A temporary snapshot: the guest writes into new overlays while its images are copied.
            for disk, key in plan["temp"].items():
                pool, name = split_volume(key)
                await self._volumes.create_overlay(pool, name, plan["frozen"][disk])
            await self._switch(src, live[0], plan["temp"])
            crashpoint("clone-temp-snapshot")
        total = len(plan["disks"]) or 1
        for i, (disk, target) in enumerate(plan["disks"].items()):

            def report(f: float, message: str, i: int = i) -> None:
                progress((i + f) / total, message)

            await self._volumes.clone(plan["frozen"][disk], CloneVolume(target=target), report, frozen=True)
        if live is not None:
            await self._merge_back(src, plan, live)

    async def _linked(self, src: VmRuntime, plan: dict[str, Any], live: tuple[Monitor, int] | None) -> None:
        for disk, base in plan["frozen"].items():
            for key in (plan["source"][disk], plan["disks"][disk]):
                pool, name = split_volume(key)
                await self._volumes.create_overlay(pool, name, base)
        if live is not None:
            await self._switch(src, live[0], plan["source"])

    async def _switch(self, src: VmRuntime, mon: Monitor, new: dict[str, str]) -> None:
        uid = src.uid if src.uid is not None else 0
        with contextlib.ExitStack() as stack:
            fds = []
            for disk, key in new.items():
                fd = os.open(self._volumes.path(key), os.O_RDWR | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                os.fchown(fd, uid, uid)
                fds.append((disk, fd))
            await _qmp(blocksnap.take_external(mon, fds))

    async def _merge_back(self, src: VmRuntime, plan: dict[str, Any], live: tuple[Monitor, int]) -> None:
        """Undo the temporary snapshot: each overlay is committed into the image below, which becomes the disk's
        active layer again, and the overlay is deleted. Offline (QEMU gone) by qemu-img commit."""
        mon, pid = live
        nodes = await _qmp(blocksnap.nodes(mon, pid))
        for disk, key in plan["temp"].items():
            if self._store.volume(*split_volume(key)) is None:
                continue
            top = blocksnap.node_of(nodes, self._volumes.path(key))
            base = blocksnap.node_of(nodes, self._volumes.path(plan["frozen"][disk]))
            if top is not None and base is not None:
                if await _qmp(blocksnap.top_node(mon, disk)) == top.name:
                    await _qmp(blocksnap.commit_back(mon, disk, base.name, job_id=f"vmkit-commit-{disk}"))
                await _qmp(blocksnap.drop_image(mon, pid, str(self._volumes.path(key))))
            self._volumes.discard(key)

    def _clone_spec(self, spec: VmSpec, plan: dict[str, Any], req: CloneVm) -> VmSpec:
        disks = []
        for d in spec.disks:
            key = plan["disks"].get(d.name)
            if key is not None:
                fmt = self._volumes.qemu_format(key)
                d = d.model_copy(update={"volume": key, "path": str(self._volumes.path(key)), "format": fmt,
                                         "owned": True})  # fmt: skip
            disks.append(d)
        nics = [n.model_copy(update={"mac": self._vms.new_mac()}) for n in spec.nics]
        return spec.model_copy(
            update={
                "name": req.name,
                "uuid": plan["uuid"],
                "disks": disks,
                "nics": nics,
                "bases": [],
                "memory_mib": req.memory_mib or spec.memory_mib,
                "vcpus": req.vcpus or spec.vcpus,
            }
        )

    async def _finish(self, src: VmRuntime, plan: dict[str, Any], spec: VmSpec) -> VmInfo:
        """Record the clone (and, for a linked one, the source's new overlays and bases)."""
        async with src.lock:
            if plan["linked"]:
                disks = [
                    d.model_copy(update={"volume": k, "path": str(self._volumes.path(k)), "format": "qcow2",
                                         "owned": True}) if (k := plan["source"].get(d.name)) else d
                    for d in src.spec.disks
                ]  # fmt: skip
                owned = {d.volume for d in src.spec.disks if d.owned}
                bases = src.spec.bases + [v for v in plan["frozen"].values() if v in owned and v not in src.spec.bases]
                self._vms.save_spec(src, src.spec.model_copy(update={"disks": disks, "bases": bases}))
            with Reverter() as rev:
                spec = await self.new_seed(spec, rev)
                info = await self._vms.define(spec)
                rev.success()
            self._store.set_journal(src.spec.name, None)
        return info

    async def _undo(self, src: VmRuntime, plan: dict[str, Any], live: tuple[Monitor, int] | None) -> None:
        """Remove what a failed clone made; a temporary snapshot is merged back first."""
        try:
            if plan["temp"]:
                await self._settle_temp(src, plan, live)
            if plan["linked"] and live is not None and self._switched(await _qmp(blocksnap.nodes(*live)), plan):
                return  # the source runs on its new overlays: keep them (finish records them)
            for key in [*plan["disks"].values(), *plan["source"].values()]:
                self._volumes.discard(key)
            self._store.set_journal(src.spec.name, None)
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.error("VM %s: undoing a failed clone: %s", src.spec.name, e)

    async def _settle_temp(self, src: VmRuntime, plan: dict[str, Any], live: tuple[Monitor, int] | None) -> None:
        if live is not None:
            await self._merge_back(src, plan, live)
            return
        for key in plan["temp"].values():
            if self._store.volume(*split_volume(key)) is not None:
                # QEMU is gone: what it wrote into the overlay goes into the image below, offline.
                await asyncio.to_thread(qemu_img.commit, self._volumes.path(key))
                self._volumes.discard(key)

    def _switched(self, nodes: list[blocksnap.Node], plan: dict[str, Any]) -> bool:
        return all(blocksnap.node_of(nodes, self._volumes.path(k)) is not None for k in plan["source"].values())

    # ----- crash recovery ------------------------------------------------------------------------
    async def recover(self) -> None:
        """Finish or undo a clone a crash cut short (see the module's docstring). Run once VMs are loaded."""
        await journal.recover(self._store, self._vms, ("clone",), self._recover)

    async def _recover(self, src: VmRuntime, plan: dict[str, Any]) -> None:
        try:
            live = self._snapshots.live(src)
        except Conflict:
            live = None
        async with src.lock:
            if plan["temp"]:
                await self._settle_temp(src, plan, live)
            new = [*plan["disks"].values(), *plan["source"].values()]
            if any(v.spec.name == plan["name"] and v.spec.uuid == plan["uuid"] for v in self._vms.runtimes()):
                self._store.set_journal(src.spec.name, None)  # finished but for this
                return
            made = all(self._store.volume(*split_volume(k)) is not None for k in new)
            switched = not plan["linked"] or live is None or self._switched(await _qmp(blocksnap.nodes(*live)), plan)
            if not made or not switched or any(v.spec.name == plan["name"] for v in self._vms.runtimes()):
                for key in new:
                    self._volumes.discard(key)
                self._store.set_journal(src.spec.name, None)
                return
            req = CloneVm(name=plan["name"], linked=plan["linked"])
            spec = self._clone_spec(src.spec, plan, req)
        await self._finish(src, plan, spec)
