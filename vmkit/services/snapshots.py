"""Snapshots: one tree per VM of internal snapshots (disks, plus RAM when the VM ran) and external, disk-only
ones (overlays); revert to any of them and delete any of them, leaf or middle, while the VM runs or not.

How the images relate (see model/snapshot.py): a disk's current image is its volume in the VM's spec. An
external snapshot freezes each disk's current image (read-only backing from then on) under a new overlay. An
internal snapshot lives inside the images that were current when it was taken. So:
- revert to an external snapshot puts fresh overlays on its frozen images (the other branches keep theirs);
- revert to an internal one applies it in place, or, when its image is still needed as it is now (it is frozen
  by an external snapshot too), to a byte copy of that image;
- the images the VM ran on until then are discarded unless a snapshot still needs them (as libvirt, a revert
  drops the unsaved current state);
- deleting an external snapshot merges each of its frozen images into every image above it (block-stream
  live, `qemu-img rebase` offline) and deletes it; deleting an internal one deletes its tag from every image
  holding it (snapshot-delete live, `qemu-img snapshot -d` offline). Every other snapshot stays revertable.

Crash safety: each change first writes its plan to the VM's journal (store), then carries it out; the
next daemon start (`recover`) finishes a revert or a delete from its plan (every step can be run again), and
decides a create by looking at what QEMU or the images say: a snapshot is either in the list with its images,
or gone with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from vmkit.errors import Conflict, InvalidInput, NoSpace, NotFound, VmkitError
from vmkit.model.snapshot import CreateSnapshot, SnapshotInfo, SnapshotRecord
from vmkit.model.storage import DEFAULT_POOL, split_volume
from vmkit.model.vm import DiskSpec, VmInfo, VmSpec, VmState
from vmkit.qemu import blocksnap
from vmkit.qemu.argv import is_network
from vmkit.qemu.monitor import JobFailed, Monitor
from vmkit.services import journal
from vmkit.services.vms import VmRuntime, VmService, _qmp
from vmkit.services.volumes import VolumeService
from vmkit.storage import qemu_img
from vmkit.store.db import Store
from vmkit.util.crash import crashpoint

log = logging.getLogger(__name__)

FULL_BELOW_BYTES = 4 * 1024 * 1024  # a pool with less free is taken as full when QEMU fails to write into it
_STATE_WORD = {VmState.RUNNING: "running", VmState.PAUSED: "paused"}


class SnapshotService:
    def __init__(self, *, store: Store, vms: VmService, volumes: VolumeService) -> None:
        self._store = store
        self._vms = vms
        self._volumes = volumes

    # ----- queries -------------------------------------------------------------------------------
    def _record(self, vm: str, name: str) -> SnapshotRecord:
        rec = next((r for r in self._store.snapshots(vm) if r.name == name), None)
        if rec is None:
            raise NotFound(f"VM {vm!r} has no snapshot {name!r}")
        return rec

    def all(self, vm: str) -> list[SnapshotInfo]:
        self._vms.runtime(vm)  # 404 for an unknown VM
        recs = self._store.snapshots(vm)
        current = self._store.current_snapshot(vm)
        return [self._info(r, recs, current) for r in recs]

    def info(self, vm: str, name: str) -> SnapshotInfo:
        self._vms.runtime(vm)
        rec = self._record(vm, name)
        return self._info(rec, self._store.snapshots(vm), self._store.current_snapshot(vm))

    @staticmethod
    def _info(rec: SnapshotRecord, recs: list[SnapshotRecord], current: str | None) -> SnapshotInfo:
        return SnapshotInfo(
            name=rec.name,
            kind=rec.kind,
            parent=rec.parent,
            children=[r.name for r in recs if r.parent == rec.name],
            current=rec.name == current,
            state=rec.state,
            memory=rec.memory,
            quiesced=rec.quiesced,
            description=rec.description,
            created_at=rec.created_at,
            disks=[{"disk": d.name, "volume": d.volume} for d in rec.spec.disks if not d.readonly],
        )

    def references(self, key: str) -> list[str]:
        """'VM (snapshot S)' for each snapshot that needs volume `key` (it must not be deleted)."""
        return [f"{vm} (snapshot {name})" for vm, name in self._store.snapshots_naming(key)]

    def owned_images(self, vm: str) -> list[str]:
        """The images vmkit made for the VM that only its snapshots still name (deleted with the VM)."""
        keys: list[str] = []
        for r in self._store.snapshots(vm):
            keys += [d.volume for d in r.spec.disks if d.owned and d.volume and d.volume not in keys]
        return keys

    # ----- helpers -------------------------------------------------------------------------------
    def live(self, vm: VmRuntime) -> tuple[Monitor, int] | None:
        """(monitor, QEMU's pid) while the VM runs or is paused; None when it is shut off."""
        if vm.proc is None and not vm.state.active:
            return None
        if vm.state not in (VmState.RUNNING, VmState.PAUSED) or vm.monitor is None or vm.proc is None:
            raise Conflict(f"VM {vm.spec.name!r} is {vm.state}; snapshots need it running, paused or shut off")
        return vm.monitor, vm.proc.pid

    def check_free(self, vm: VmRuntime, *, resume: tuple[str, str] | None = None) -> dict[str, Any] | None:
        """Refuse work on a VM with unfinished work (journaled) or busy volumes. resume (op, snapshot): the same
        work, left unfinished by a failure, is picked up again instead; its journal entry is returned."""
        j = self._store.journal(vm.spec.name)
        if j is not None and (resume is None or (j.get("op"), j.get("snapshot")) != resume):
            raise Conflict(f"VM {vm.spec.name!r} has unfinished work ({j.get('op')}); restart the daemon to finish it")
        busy = [d.volume for d in vm.spec.disks if d.volume and self._volumes.busy(d.volume)]
        if busy:
            raise Conflict(f"volume(s) {', '.join(busy)} are busy (an operation on them is running)")
        return j

    def _full_pools(self, disks: list[DiskSpec]) -> list[str]:
        """The pools of these disks whose filesystem is (nearly) full: what QEMU's vague errors then mean."""
        pools = sorted({split_volume(d.volume)[0] for d in disks if d.volume})
        return [p for p in pools if (self._volumes.pool_info(p).available_bytes or 0) < FULL_BELOW_BYTES]

    def _path(self, key: str) -> str:
        return str(self._volumes.path(key))

    def _commit(self, vm: VmRuntime, *, add: SnapshotRecord | None = None, spec: VmSpec | None = None,
                current: str | None | bool = False, journal: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Record a step's outcome in one transaction (current False: unchanged)."""
        name = vm.spec.name
        with self._store.transaction():
            if add is not None:
                self._store.add_snapshot(name, add)
            if spec is not None:
                self._store.set_vm_spec(spec)
            if current is not False:
                self._store.set_current_snapshot(name, current)  # type: ignore[arg-type]
            self._store.set_journal(name, journal)
        if spec is not None:
            vm.spec = spec

    # ----- create --------------------------------------------------------------------------------
    async def create(self, vm_name: str, req: CreateSnapshot) -> SnapshotInfo:
        vm = self._vms.runtime(vm_name)
        async with vm.lock:
            if any(r.name == req.name for r in self._store.snapshots(vm_name)):
                raise Conflict(f"VM {vm_name!r} already has a snapshot named {req.name!r}")
            self.check_free(vm)
            live = self.live(vm)
            disks = [d for d in vm.spec.disks if not d.readonly]
            missing = [d.name for d in disks if d.volume is None]
            if missing:
                raise Conflict(f"disk(s) {', '.join(missing)} are not volumes yet; restart the daemon to adopt them")
            refuse_shared(vm, "snapshots")
            rec = SnapshotRecord(
                name=req.name,
                kind="external" if req.disk_only else "internal",
                parent=self._store.current_snapshot(vm_name),
                state=_STATE_WORD.get(vm.state, "shut off") if live else "shut off",  # type: ignore[arg-type]
                memory=live is not None and not req.disk_only,
                description=req.description,
                created_at=time.time(),
                spec=vm.spec,
            )
            if req.disk_only:
                if not disks:
                    raise InvalidInput(f"VM {vm_name!r} has no writable disk to snapshot")
                await self._create_external(vm, rec, disks, live, quiesce=req.quiesce)
            else:
                raw = [f"{d.name} ({d.volume})" for d in disks if d.format != "qcow2"]
                if raw:
                    raise InvalidInput(
                        f"internal snapshots need qcow2 disks, and {', '.join(raw)} is raw: take a disk-only "
                        "snapshot (--disk-only) instead, or convert the volume to qcow2"
                    )
                if not disks:
                    raise InvalidInput(f"VM {vm_name!r} has no qcow2 disk to hold an internal snapshot")
                await self._create_internal(vm, rec, disks, live)
        return self.info(vm_name, req.name)

    async def _create_internal(
        self, vm: VmRuntime, rec: SnapshotRecord, disks: list[DiskSpec], live: tuple[Monitor, int] | None
    ) -> None:
        self._commit(vm, journal={"op": "create", "record": rec.model_dump(mode="json")})
        try:
            if live is not None:
                mon = live[0]
                tops = [await _qmp(blocksnap.top_node(mon, d.name)) for d in disks]
                crashpoint("snapshot-create")
                try:
                    await blocksnap.save_internal(mon, rec.name, tops, job_id=_job_id("save", rec.name))
                except JobFailed as e:
                    full = self._full_pools(disks)
                    if full:
                        where = ", ".join(full)
                        raise NoSpace(f"no space left in pool(s) {where} for snapshot {rec.name!r} ({e})") from None
                    raise VmkitError(f"QEMU could not save snapshot {rec.name!r}: {e}") from None
            else:
                for d in disks:
                    await asyncio.to_thread(qemu_img.snapshot, self._volumes.path(d.volume or ""), "create", rec.name)
                    crashpoint("snapshot-create")
        except BaseException:
            await self._drop_tags(vm, rec.name, [d.volume for d in disks if d.volume])
            self._commit(vm, journal=None)
            raise
        self._commit(vm, add=rec, current=rec.name, journal=None)

    async def _create_external(
        self,
        vm: VmRuntime,
        rec: SnapshotRecord,
        disks: list[DiskSpec],
        live: tuple[Monitor, int] | None,
        *,
        quiesce: bool,
    ) -> None:
        new: dict[str, str] = {}
        for d in disks:
            pool = split_volume(d.volume)[0] if d.volume else DEFAULT_POOL
            new[d.name] = f"{pool}/{self._volumes.free_name(pool, f'{vm.spec.name}-{d.name}-{rec.name}', '.qcow2')}"
        spec = vm.spec.model_copy(
            update={"disks": [_repoint(d, new.get(d.name), self._volumes) for d in vm.spec.disks]}
        )
        self._commit(vm, journal={"op": "create", "record": rec.model_dump(mode="json"), "new": new,
                                  "spec": spec.model_dump(mode="json")})  # fmt: skip
        try:
            for d in disks:
                pool, name = split_volume(new[d.name])
                await self._volumes.create_overlay(pool, name, d.volume or "")
            crashpoint("snapshot-external-overlays")
            if live is not None:
                quiesced = await self._switch_live(vm, live[0], new, quiesce=quiesce)
                rec = rec.model_copy(update={"quiesced": quiesced})
            crashpoint("snapshot-external-switched")
        except BaseException:
            for key in new.values():
                self._volumes.discard(key)
            self._commit(vm, journal=None)
            raise
        # The spec's disks are now the overlays; a start opens them with their whole chain.
        self._commit(vm, add=rec, spec=spec,
                     current=rec.name, journal=None)  # fmt: skip

    async def _switch_live(self, vm: VmRuntime, mon: Monitor, new: dict[str, str], *, quiesce: bool) -> bool:
        """Put the new overlays under the running guest, in one transaction, its filesystems frozen if asked and
        its agent answers; whether they were."""
        uid = vm.uid if vm.uid is not None else 0
        with contextlib.ExitStack() as stack:
            fds = []
            for disk, key in new.items():
                fd = os.open(self._path(key), os.O_RDWR | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                os.fchown(fd, uid, uid)  # the VM's own image from now on, like any disk it writes
                fds.append((disk, fd))
            async with self._quiesced(vm, quiesce) as frozen:
                await _qmp(blocksnap.take_external(mon, fds))
        return frozen

    @contextlib.asynccontextmanager
    async def _quiesced(self, vm: VmRuntime, wanted: bool) -> AsyncIterator[bool]:
        """The guest's filesystems frozen for the block (through its agent, in one session), when wanted and the
        agent answers; yields whether they are. A guest whose agent cannot freeze gets its snapshot unfrozen."""
        if not wanted or not vm.agent or vm.state is not VmState.RUNNING:
            yield False
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                agent = await stack.enter_async_context(self._vms.agent_session(vm))
                await agent.execute("guest-fsfreeze-freeze")
            except VmkitError as e:
                log.warning("VM %s: filesystems not frozen for the snapshot: %s", vm.spec.name, e.message)
                await stack.aclose()
                yield False
                return
            try:
                yield True
            finally:
                try:
                    await agent.execute("guest-fsfreeze-thaw")
                except VmkitError as e:
                    log.error("VM %s: thawing its filesystems failed: %s", vm.spec.name, e.message)

    # ----- revert --------------------------------------------------------------------------------
    async def revert(self, vm_name: str, name: str) -> VmInfo:
        """Bring the VM back to snapshot `name`: its disks, spec and (internal with memory) running state."""
        vm = self._vms.runtime(vm_name)
        async with vm.lock:
            rec = self._record(vm_name, name)
            unfinished = self.check_free(vm, resume=("revert", name))
            if vm.state is VmState.SAVED:
                # Its managed save holds a guest that has the current disks in its caches: changing them under it
                # would corrupt them when it resumes.
                raise Conflict(
                    f"VM {vm_name!r} has a managed save: start it (it resumes) and stop it, or discard the saved "
                    f"state (vmkit vm managedsave-remove {vm_name}), before reverting"
                )
            for key in [d.volume for d in rec.spec.disks if d.volume] + [c.volume for c in rec.spec.cdroms if c.volume]:
                self._volumes.row(key)  # 404 now, not half-way: a volume it needs is gone
            plan = unfinished or self._revert_plan(vm, rec)  # a revert that failed half-way goes on as planned
            self._commit(vm, journal=plan)
            await self._vms.halt(vm)
            crashpoint("snapshot-revert")
            await self._run_revert(vm, rec, plan)
            if rec.memory:
                await self._vms.boot(vm, loadvm=rec.name)
                if rec.state == "paused" and vm.monitor is not None:
                    await _qmp(vm.monitor.stop())
            return vm.info()

    def _revert_plan(self, vm: VmRuntime, rec: SnapshotRecord) -> dict[str, Any]:
        recs = self._store.snapshots(vm.spec.name)
        frozen = {d.volume for r in recs if r.kind == "external" for d in r.spec.disks if d.volume}
        needed = {d.volume for r in recs for d in r.spec.disks if d.volume}
        tops = [d.volume for d in vm.spec.disks if d.owned and not d.readonly and d.volume]
        discard = [k for k in tops if k not in needed]
        make: list[dict[str, str]] = []
        disks: dict[str, str] = {}
        apply: list[str] = []
        for d in rec.spec.disks:
            if d.readonly or d.volume is None:
                continue
            pool = split_volume(d.volume)[0]
            # An internal snapshot is applied in place only to an image nothing else needs as it is now: none
            # frozen by an external snapshot, none with overlays on it (but those discarded now).
            shared = d.volume in frozen or any(k not in discard for k in self._volumes.dependents(d.volume))
            if rec.kind == "external" or shared:
                how = "overlay" if rec.kind == "external" else "copy"
                stem = f"{vm.spec.name}-{d.name}-{rec.name}" if how == "overlay" else f"{vm.spec.name}-{d.name}"
                key = f"{pool}/{self._volumes.free_name(pool, stem, '.qcow2')}"
                make.append({"key": key, "how": how, "src": d.volume})
            else:
                key = d.volume
            disks[d.name] = key
            if rec.kind == "internal":
                apply.append(key)
        discard = [k for k in discard if k not in disks.values()]
        return {"op": "revert", "snapshot": rec.name, "make": make, "disks": disks, "apply": apply,
                "discard": discard}  # fmt: skip

    async def _run_revert(self, vm: VmRuntime, rec: SnapshotRecord, plan: dict[str, Any]) -> None:
        """Carry out a revert's plan; every step can run again (recover() re-runs it after a crash)."""
        for m in plan["make"]:
            pool, name = split_volume(m["key"])
            if self._store.volume(pool, name) is not None:
                continue
            if m["how"] == "overlay":
                await self._volumes.create_overlay(pool, name, m["src"])
            else:
                await self._volumes.copy_image(m["src"], pool, name)
        for key in plan["apply"]:
            await asyncio.to_thread(qemu_img.snapshot, self._volumes.path(key), "apply", rec.name)
        made = {m["key"] for m in plan["make"]}
        disks = [
            _repoint(d, plan["disks"].get(d.name), self._volumes, owned=plan["disks"].get(d.name) in made or d.owned)
            for d in rec.spec.disks
        ]
        # Bases shared with linked clones made since the snapshot stay the VM's.
        bases = vm.spec.bases + [b for b in rec.spec.bases if b not in vm.spec.bases]
        spec = rec.spec.model_copy(update={"disks": disks, "name": vm.spec.name, "uuid": vm.spec.uuid, "bases": bases})
        self._commit(vm, spec=spec, current=rec.name,
                     journal={"op": "discard", "discard": plan["discard"]})  # fmt: skip
        crashpoint("snapshot-revert-committed")
        await self._discard(vm, plan["discard"])

    async def _discard(self, vm: VmRuntime, keys: list[str]) -> None:
        for key in keys:
            if self._volumes.dependents(key) or self.references(key):
                continue  # something came to need it after all
            self._volumes.discard(key)
        self._commit(vm, journal=None)

    # ----- delete --------------------------------------------------------------------------------
    async def delete(self, vm_name: str, name: str) -> None:
        vm = self._vms.runtime(vm_name)
        async with vm.lock:
            rec = self._record(vm_name, name)
            self.check_free(vm, resume=("delete", name))
            live = self.live(vm)
            self._commit(vm, journal={"op": "delete", "snapshot": name})
            try:
                await self._run_delete(vm, rec, live)
            except Exception:
                # Each merge done leaves a whole chain: the snapshot is still there, and deleting it again
                # goes on from where this stopped.
                self._commit(vm, journal=None)
                raise

    async def _run_delete(self, vm: VmRuntime, rec: SnapshotRecord, live: tuple[Monitor, int] | None) -> None:
        """Carry out a delete; every step can run again (recover() re-runs it after a crash). The snapshot's
        tag goes from every image (internal); then each image vmkit made that nothing needs any more (no other
        snapshot names it, the VM does not run on it) is merged into the images above it, and deleted."""
        recs = [r for r in self._store.snapshots(vm.spec.name) if r.name != rec.name]
        if rec.kind == "internal":
            await self._drop_tags(vm, rec.name, self._images_of(vm, recs + [rec]), live)
        needed = {d.volume for r in recs for d in r.spec.disks} | {d.volume for d in vm.spec.disks} | set(vm.spec.bases)
        for d in rec.spec.disks:
            image = d.volume
            if d.readonly or not d.owned or image is None or image in needed:
                continue
            if self._store.volume(*split_volume(image)) is None:
                continue  # merged and deleted already (a re-run after a crash)
            parent = self._volumes.row(image).backing
            for child in self._volumes.dependents(image):
                await self._merge(child, image, parent, live)
                crashpoint("snapshot-delete-merged")
            if live is not None:
                await _qmp(blocksnap.drop_image(live[0], live[1], self._path(image)))
            self._volumes.discard(image)
        current = self._store.current_snapshot(vm.spec.name)
        with self._store.transaction():
            for r in recs:
                if r.parent == rec.name:
                    self._store.put_snapshot(vm.spec.name, r.model_copy(update={"parent": rec.parent}))
            self._store.delete_snapshot(vm.spec.name, rec.name)
            if current == rec.name:
                self._store.set_current_snapshot(vm.spec.name, rec.parent)
            self._store.set_journal(vm.spec.name, None)

    async def _merge(self, child: str, image: str, parent: str | None, live: tuple[Monitor, int] | None) -> None:
        """Make `child` (an overlay on `image`) an overlay on `parent` with the same content, copying image's
        data into it: block-stream when QEMU has it open, else qemu-img rebase."""
        if self._volumes.row(child).backing != image:
            return  # done already
        if live is not None:
            mon, pid = live
            nodes = await _qmp(blocksnap.nodes(mon, pid))
            node = blocksnap.node_of(nodes, self._path(child))
            if node is not None:
                base = blocksnap.node_of(nodes, self._path(parent)) if parent else None
                below = blocksnap.node_of(nodes, self._path(image))
                if below is None or (parent is not None and base is None):
                    raise Conflict(f"QEMU does not read {child}'s chain as recorded; stop the VM to delete it")
                job = _job_id("merge", child)
                if not await _qmp(mon.await_job(job, timeout_s=blocksnap.STREAM_TIMEOUT_S)):
                    await _qmp(
                        blocksnap.stream(mon, node, below.name, base.name if base else None,
                                         self._path(parent) if parent else None, job_id=job)
                    )  # fmt: skip
                self._volumes.set_backing(child, parent)
                return
        parent_path = self._volumes.path(parent) if parent else None
        parent_fmt = self._volumes.qemu_format(parent) if parent else None
        await asyncio.to_thread(qemu_img.rebase, self._volumes.path(child), parent_path, parent_fmt)
        self._volumes.set_backing(child, parent)

    def _images_of(self, vm: VmRuntime, recs: list[SnapshotRecord]) -> list[str]:
        """Every qcow2 image the VM or its snapshots use, with their backing chains (where internal snapshots
        may live)."""
        keys: list[str] = []
        todo = [d.volume for d in vm.spec.disks if d.volume] + [
            d.volume for r in recs for d in r.spec.disks if d.volume
        ]
        while todo:
            key = todo.pop()
            if key in keys:
                continue
            row = self._store.volume(*split_volume(key))
            if row is None or row.format != "qcow2":
                continue
            keys.append(key)
            if row.backing:
                todo.append(row.backing)
        return keys

    async def _drop_tags(
        self, vm: VmRuntime, tag: str, images: list[str], live: tuple[Monitor, int] | None = None
    ) -> None:
        """Delete internal snapshot `tag` from each of images that holds it."""
        nodes = await _qmp(blocksnap.nodes(*live)) if live is not None else []
        for key in images:
            path = self._volumes.path(key)
            try:
                tags = await asyncio.to_thread(qemu_img.snapshot_tags, path)
            except VmkitError:
                continue
            if tag not in tags:
                continue
            node = blocksnap.node_of(nodes, path)
            if node is None:
                await asyncio.to_thread(qemu_img.snapshot, path, "delete", tag)
            elif live is not None and not node.read_only:
                await _qmp(blocksnap.delete_internal(live[0], tag, [node.name], job_id=_job_id("del", tag)))
            elif live is not None:
                # Below the top (an external snapshot froze it): QEMU reopens it read-write for the deletion.
                backing = self._volumes.row(key).backing
                below = blocksnap.node_of(nodes, self._path(backing)) if backing else None
                if backing is not None and below is None:
                    raise Conflict(f"QEMU does not read {backing} below {key}; stop the VM to delete {tag!r}")
                below_name = below.name if below else None
                job = _job_id("del", tag)
                await _qmp(blocksnap.delete_internal_below(live[0], node, below_name, tag, job_id=job))

    # ----- crash recovery ------------------------------------------------------------------------
    async def recover(self) -> None:
        """Finish or undo what a crash cut short (see the module's docstring). Run once VMs are loaded."""

        async def finish(vm: VmRuntime, entry: dict[str, Any]) -> None:
            async with vm.lock:
                await self._recover(vm, entry)

        await journal.recover(self._store, self._vms, ("create", "revert", "discard", "delete"), finish)

    async def _recover(self, vm: VmRuntime, j: dict[str, Any]) -> None:
        try:
            live = self.live(vm)
        except Conflict:
            live = None  # QEMU is there but not answering: treat its images as it left them
        op = j.get("op")
        if op == "create":
            rec = SnapshotRecord.model_validate(j["record"])
            if rec.kind == "internal":
                await self._recover_internal(vm, rec, live)
            else:
                await self._recover_external(vm, rec, j, live)
        elif op == "revert":
            rec = self._record(vm.spec.name, j["snapshot"])
            await self._vms.halt(vm)
            await self._run_revert(vm, rec, j)
        elif op == "discard":
            await self._discard(vm, j["discard"])
        elif op == "delete":
            rec = self._record(vm.spec.name, j["snapshot"])
            await self._run_delete(vm, rec, live)
        # Other ops (a clone's, a save's) are their services' to finish.

    async def _recover_internal(self, vm: VmRuntime, rec: SnapshotRecord, live: tuple[Monitor, int] | None) -> None:
        if live is not None:
            with contextlib.suppress(JobFailed):
                await live[0].await_job(_job_id("save", rec.name), timeout_s=blocksnap.SNAPSHOT_JOB_TIMEOUT_S)
        images = rec.images()
        have = []
        for key in images:
            with contextlib.suppress(VmkitError):
                if rec.name in await asyncio.to_thread(qemu_img.snapshot_tags, self._volumes.path(key)):
                    have.append(key)
        if images and len(have) == len(images):
            self._commit(vm, add=rec, current=rec.name, journal=None)
        else:
            await self._drop_tags(vm, rec.name, have, live)
            self._commit(vm, journal=None)

    async def _recover_external(
        self, vm: VmRuntime, rec: SnapshotRecord, j: dict[str, Any], live: tuple[Monitor, int] | None
    ) -> None:
        new: dict[str, str] = j["new"]
        ready = all(self._store.volume(*split_volume(k)) is not None for k in new.values())
        if live is not None and ready:
            nodes = await _qmp(blocksnap.nodes(*live))
            tops = {d: await _qmp(blocksnap.top_node(live[0], d)) for d in new}
            switched = all(
                (n := blocksnap.node_of(nodes, self._path(k))) is not None and n.name == tops[d] for d, k in new.items()
            )
        else:
            # QEMU is gone: its last writes are in the old images or in the overlays, and the overlays on the
            # old images hold all of it either way, so the snapshot stands.
            switched = ready
        if switched:
            spec = VmSpec.model_validate(j["spec"])
            self._commit(vm, add=rec, spec=spec, current=rec.name, journal=None)
        else:
            for key in new.values():
                self._volumes.discard(key)
            self._commit(vm, journal=None)


def _job_id(what: str, name: str) -> str:
    """A QEMU job id: letters, digits, '-', '.' and '_', a letter first (names may start with a digit, and a
    volume's POOL/NAME has a slash)."""
    return f"vmkit-{what}-{name.replace('/', '.')}"


def _repoint(d: DiskSpec, key: str | None, volumes: VolumeService, *, owned: bool = True) -> DiskSpec:
    """d with its image replaced by volume `key` (None: unchanged)."""
    if key is None:
        return d
    return d.model_copy(update={"volume": key, "path": str(volumes.path(key)), "format": "qcow2", "owned": owned})


def refuse_shared(vm: VmRuntime, what: str) -> None:
    """Snapshots and VM clones make overlays beside a disk, and a shared pool holds standalone images only
    (services/sharedpools.py): refused, naming the disks (a volume clone makes a full copy instead)."""
    shared = [f"{d.name} ({d.volume})" for d in vm.spec.disks if is_network(d.path)]
    if shared:
        raise Conflict(f"{what} are not supported for disks on shared pools yet: {', '.join(shared)}")
