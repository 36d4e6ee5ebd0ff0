"""Save and restore (virsh save / restore / managedsave): a VM's RAM and device state into a volume and back.

- `save` stops a running or paused VM keeping its state in a new save volume (format "save": a header naming the
  VM, then QEMU's migration stream, see storage/savefile.py); the VM is shut off afterwards (reason "saved").
  `restore` starts the VM a save volume belongs to from it, running or paused as it was; the volume is kept, as
  virsh keeps the file.
- A managed save (`vm stop --save`) is a save volume the VM owns: the VM's state is `saved`, its next start
  resumes from it and then deletes it, deleting the VM deletes it, and `managedsave-remove` discards it (the
  next start boots afresh). A `volume delete` of it is refused while it is the VM's.
- QEMU must rebuild the very machine it saved to load the stream: a restore compares the VM's spec now with the
  spec in the header (memory, vCPUs, kernel, devices, and each disk's image) and refuses, naming the change,
  when they differ. A disk now on an overlay whose backing chain holds the saved image passes: it reads the
  same until the guest writes (a linked clone or a disk-only snapshot of the shut-off VM puts one there).
- Saving writes at disk speed: the guest is stopped first (each page is written once), QEMU's bandwidth cap is
  lifted, and QEMU writes straight into the volume's file through a descriptor (qemu/savevm.py).

Crash safety: the VM's journal (store) says {"op": "save"|"restore", "volume", "managed", "state"} before
anything changes, and the save volume is reserved and written like any new volume (VolumeService: a row in
state `creating`, a hidden temporary file renamed into place once the state is complete and on disk). The next
daemon start (`recover`, after VolumeService.recover has removed unfinished volumes and VMs are re-attached)
looks at what there is:
- save: the volume is ready → the state is complete: the QEMU still there is ended and the VM recorded saved;
  otherwise the save did not happen: a migration still under way is cancelled and the VM resumed as it was.
- restore: QEMU is there with the state loaded → it is resumed as it was saved (and a managed save deleted);
  otherwise QEMU is ended and the VM is back where it was: `saved` (managed) or shut off, the volume intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from vmkit.errors import Conflict, InvalidInput, NoSpace, NotFound, Timeout, VmkitError
from vmkit.model.names import valid_name
from vmkit.model.save import SaveInfo, SaveVm
from vmkit.model.storage import DEFAULT_POOL, split_volume
from vmkit.model.vm import VmInfo, VmSpec, VmState
from vmkit.qemu import process, savevm
from vmkit.qemu.monitor import Monitor
from vmkit.services import journal
from vmkit.services.vms import QmpFailed, VmRuntime, VmService, _qmp
from vmkit.services.volumes import VolumeService
from vmkit.storage import files, savefile
from vmkit.storage.savefile import SaveHeader
from vmkit.store.db import Store
from vmkit.util.crash import crashpoint

log = logging.getLogger(__name__)

SAVE_EXT = ".save"
MANAGED_EXT = ".managedsave"


class VmSaveService:
    def __init__(self, *, store: Store, vms: VmService, volumes: VolumeService) -> None:
        self._store = store
        self._vms = vms
        self._volumes = volumes
        vms.resume_saved = self._resume_managed
        vms.saved_images = lambda vm: [key for key, _ in self._managed(vm)]

    # ----- queries -------------------------------------------------------------------------------
    def _read(self, key: str) -> SaveHeader:
        """The header of save volume `key`: 404 for no such volume, 400 for a volume that is no save."""
        row = self._volumes.row(key)
        if row.format != "save":
            raise InvalidInput(f"{key} is a {row.format} volume, not a saved VM state")
        try:
            return savefile.read_header_at(self._volumes.path(key))
        except (OSError, savefile.BadSaveFile) as e:
            raise Conflict(f"{key} cannot be read as a saved VM state: {e}") from None

    def _info(self, key: str, h: SaveHeader) -> SaveInfo:
        try:
            size = os.stat(self._volumes.path(key)).st_size
        except (OSError, VmkitError):
            size = 0
        return SaveInfo(volume=key, vm=h.vm, uuid=h.uuid, state=h.state, managed=h.managed, saved_at=h.saved_at,
                        size_bytes=size)  # fmt: skip

    def _saves(self) -> Iterator[tuple[str, SaveHeader]]:
        """Every readable save volume with its header (one that cannot be read is no VM's)."""
        for row in self._store.volumes():
            if row.format != "save" or row.state != "ready":
                continue
            try:
                yield row.key, savefile.read_header_at(self._volumes.path(row.key))
            except (OSError, savefile.BadSaveFile, VmkitError):
                continue

    def all(self) -> list[SaveInfo]:
        return [self._info(key, h) for key, h in self._saves()]

    def info(self, key: str) -> SaveInfo:
        return self._info(key, self._read(key))

    def _managed(self, vm: VmRuntime) -> list[tuple[str, SaveHeader]]:
        """The VM's managed saves, newest first (one, unless a crash left an older one: recover drops it)."""
        found = [(k, h) for k, h in self._saves() if h.managed and h.uuid == vm.spec.uuid]
        return sorted(found, key=lambda kh: -kh[1].saved_at)

    def managed_info(self, name: str) -> SaveInfo:
        vm = self._vms.runtime(name)
        found = self._managed(vm) if vm.state is VmState.SAVED else []
        if not found:
            raise NotFound(f"VM {name!r} has no managed save")
        return self._info(*found[0])

    def references(self, key: str) -> list[str]:
        """'VM (managed save)' when volume `key` is the managed save of a `saved` VM: it must not be deleted."""
        try:
            row = self._store.volume(*split_volume(key))
        except ValueError:
            return []
        if row is None or row.format != "save":
            return []
        try:
            h = savefile.read_header_at(self._volumes.path(key))
        except (OSError, savefile.BadSaveFile, VmkitError):
            return []
        if not h.managed:
            return []
        return [f"{vm.spec.name} (managed save)" for vm in self._vms.runtimes()
                if vm.spec.uuid == h.uuid and vm.state is VmState.SAVED]  # fmt: skip

    # ----- save ----------------------------------------------------------------------------------
    async def save(self, name: str, req: SaveVm) -> SaveInfo:
        """virsh save: the VM's state into a new volume; the VM is shut off afterwards."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            if req.volume is None:
                pool, vol = DEFAULT_POOL, self._volumes.free_name(DEFAULT_POOL, _stem(name, SAVE_EXT), SAVE_EXT)
            else:
                pool, vol = split_volume(req.volume)
            key = await self._save(vm, pool, vol, managed=False)
        return self.info(key)

    async def managed_save(self, name: str) -> VmInfo:
        """virsh managedsave (vm stop --save): the VM's state into a volume it owns; its next start resumes."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            vol = self._volumes.free_name(DEFAULT_POOL, _stem(name, MANAGED_EXT), MANAGED_EXT)
            await self._save(vm, DEFAULT_POOL, vol, managed=True)
            return vm.info()

    def _live(self, vm: VmRuntime) -> tuple[Monitor, str]:
        if vm.state not in (VmState.RUNNING, VmState.PAUSED) or vm.monitor is None or vm.proc is None:
            raise Conflict(f"VM {vm.spec.name!r} is {vm.state}; only a running or paused VM can be saved")
        return vm.monitor, "running" if vm.state is VmState.RUNNING else "paused"

    def _check_free(self, vm: VmRuntime) -> None:
        if self._store.journal(vm.spec.name) is not None:
            raise Conflict(f"VM {vm.spec.name!r} has unfinished work; restart the daemon to finish it")

    async def _save(self, vm: VmRuntime, pool: str, vol: str, *, managed: bool) -> str:
        mon, was = self._live(vm)
        self._check_free(vm)
        self._volumes.check_free(pool, vol)  # 404 for no such pool, 409 for a taken name: before anything changes
        name, key = vm.spec.name, f"{pool}/{vol}"
        header = SaveHeader(vm=name, uuid=vm.spec.uuid, state=was, managed=managed,  # type: ignore[arg-type]
                            saved_at=time.time(), spec=vm.spec.model_dump(mode="json"))  # fmt: skip
        self._store.set_journal(name, {"op": "save", "volume": key, "managed": managed, "state": was})
        try:
            with self._volumes.reserve_file(pool, vol, fmt="save") as (tmp, _):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    files.write_all(fd, savefile.encode(header), tmp)  # one page; QEMU appends after it
                    await self._write_state(vm, mon, fd, was, pool)
                finally:
                    os.close(fd)
        except BaseException:
            self._store.set_journal(name, None)
            raise
        # Complete and on disk under its name: from here on the save stands, whatever happens (see recover).
        crashpoint("save-written")
        await self._vms.halt(vm)
        self._saved(vm, managed)
        log.info("VM %s saved to %s", name, key)
        return key

    async def _write_state(self, vm: VmRuntime, mon: Monitor, fd: int, was: str, pool: str) -> None:
        """QEMU writes the stopped guest's state after the header; on any failure the guest goes on as it was."""
        if was == "running":
            await _qmp(mon.stop())
        crashpoint("save-stopped")
        try:
            await savevm.save_state(mon, fd, timeout_s=savevm.timeout_for(vm.spec.memory_mib))
            crashpoint("save-migrated")
            await asyncio.to_thread(os.fdatasync, fd)  # on disk before the rename makes it a volume
        except BaseException as e:
            with contextlib.suppress(Exception):
                await savevm.cancel(mon)
            if was == "running":
                with contextlib.suppress(Exception):
                    await mon.cont()  # also takes back the disks a completed migration handed off
            err = _save_error(vm.spec.name, pool, e)
            if err is e:
                raise
            raise err from e

    def _saved(self, vm: VmRuntime, managed: bool) -> None:
        with self._store.transaction():
            if managed:
                self._vms.set_state(vm, VmState.SAVED, "managed save")
            else:
                self._vms.set_state(vm, VmState.SHUTOFF, "saved")
            self._store.set_journal(vm.spec.name, None)

    # ----- restore -------------------------------------------------------------------------------
    async def restore(self, key: str) -> VmInfo:
        """virsh restore: the VM of save volume `key` runs again where it was (or is paused, if it was)."""
        h = self._read(key)
        vm = self._vm_of(key, h)
        async with vm.lock:
            if h.managed:
                # A managed save is the VM's own: restoring it is starting the VM (it is deleted afterwards).
                current = self._managed(vm) if vm.state is VmState.SAVED else []
                if not current or current[0][0] != key:
                    raise Conflict(f"{key} is a managed save {vm.spec.name!r} no longer resumes from")
                await self._restore(vm, key, managed=True)
                return vm.info()
            if vm.state is VmState.SAVED:
                raise Conflict(
                    f"VM {vm.spec.name!r} has a managed save: start it (it resumes from that), or discard it "
                    f"(vmkit vm managedsave-remove {vm.spec.name}) before restoring {key}"
                )
            if vm.state.active or (vm.proc is not None and process.alive(vm.proc)):
                raise Conflict(f"VM {vm.spec.name!r} is {vm.state}; a restore needs it shut off")
            await self._restore(vm, key, managed=False)
            return vm.info()

    def _vm_of(self, key: str, h: SaveHeader) -> VmRuntime:
        try:
            vm = self._vms.runtime(h.vm) if valid_name(h.vm) else None
        except NotFound:
            vm = None
        if vm is None or vm.spec.uuid != h.uuid:
            raise NotFound(f"{key} holds the state of VM {h.vm!r} (UUID {h.uuid}), which no longer exists")
        return vm

    async def _resume_managed(self, vm: VmRuntime) -> None:
        """`vm start` of a `saved` VM (VmService.start, the VM's lock held)."""
        found = self._managed(vm)
        if found:
            await self._restore(vm, found[0][0], managed=True)
            return
        log.warning("VM %s: its managed save is gone; booting it afresh", vm.spec.name)
        self._vms.set_state(vm, VmState.SHUTOFF, "managed save missing")
        await self._vms.boot(vm)

    async def _restore(self, vm: VmRuntime, key: str, *, managed: bool) -> None:
        self._check_free(vm)
        name = vm.spec.name
        fd = os.open(self._volumes.path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # The header of the very file QEMU reads (not one read earlier by path).
            try:
                h = savefile.read_header(fd)
            except (OSError, savefile.BadSaveFile) as e:
                raise Conflict(f"{key} cannot be read as a saved VM state: {e}") from None
            self._check_machine(vm, key, h, managed=managed)
            os.lseek(fd, h.stream_offset, os.SEEK_SET)  # QEMU reads from here: it never sees the header
            self._store.set_journal(name, {"op": "restore", "volume": key, "managed": managed, "state": h.state})
            try:
                await self._vms.boot(vm, incoming_fd=fd)
            except BaseException:
                # boot left it shut off ("failed"); a managed save stays what the VM resumes from.
                with self._store.transaction():
                    if managed:
                        self._vms.set_state(vm, VmState.SAVED, "restore failed")
                    self._store.set_journal(name, None)
                raise
        finally:
            os.close(fd)
        crashpoint("restore-loaded")
        await self._resumed(vm, key, h.state, managed=managed)

    async def _resumed(self, vm: VmRuntime, key: str, state: str, *, managed: bool) -> None:
        """The state is loaded (QEMU paused): run the guest if it ran, drop a managed save, close the journal."""
        try:
            if state == "running" and vm.monitor is not None and await _qmp(vm.monitor.query_status()) != "running":
                await _qmp(vm.monitor.cont())
            self._vms.set_state(vm, VmState.RUNNING if state == "running" else VmState.PAUSED, "restored")
            if managed:
                crashpoint("restore-resumed")
                self._drop(key)
        finally:
            self._store.set_journal(vm.spec.name, None)

    def _drop(self, key: str) -> None:
        """Delete a managed save nothing will resume from any more (its VM runs, or is gone)."""
        with contextlib.suppress(VmkitError):
            self._volumes.discard(key)

    def _check_machine(self, vm: VmRuntime, key: str, h: SaveHeader, *, managed: bool) -> None:
        try:
            then = VmSpec.model_validate(h.spec)
        except ValidationError:
            raise Conflict(f"{key}: the VM configuration in its header cannot be read") from None
        changes = machine_changes(then, vm.spec, self._below)
        if not changes:
            return
        way_out = (
            f"discard the saved state (vmkit vm managedsave-remove {vm.spec.name}; the next start boots afresh)"
            if managed
            else "start the VM afresh instead (vmkit vm start)"
        )
        raise Conflict(
            f"cannot restore {vm.spec.name!r} from {key}: its configuration changed since it was saved "
            f"({'; '.join(changes)}), and QEMU can only load the state into the same machine. Undo the change, "
            f"or {way_out}"
        )

    def _below(self, key: str) -> set[str]:
        """The volumes below `key` in its backing chain."""
        out: set[str] = set()
        try:
            row = self._store.volume(*split_volume(key))
            while row is not None and row.backing and row.backing not in out:
                out.add(row.backing)
                row = self._store.volume(*split_volume(row.backing))
        except ValueError:
            pass
        return out

    async def remove_managed(self, name: str) -> VmInfo:
        """virsh managedsave-remove: forget the saved state; the next start boots afresh."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            if vm.state is not VmState.SAVED:
                raise NotFound(f"VM {name!r} has no managed save")
            self._check_free(vm)
            saves = self._managed(vm)
            # The state first: a crash before the volumes go leaves volumes no VM resumes from (recover drops them).
            self._vms.set_state(vm, VmState.SHUTOFF, "managed save removed")
            for key, _ in saves:
                self._drop(key)
            return vm.info()

    # ----- crash recovery ------------------------------------------------------------------------
    async def recover(self) -> None:
        """Finish or undo a save or restore a crash cut short (see the module's docstring), and drop managed
        saves no VM resumes from. Run once VMs are loaded and VolumeService.recover has run."""

        async def finish(vm: VmRuntime, j: dict[str, Any]) -> None:
            async with vm.lock:
                await (self._recover_save if j["op"] == "save" else self._recover_restore)(vm, j)

        await journal.recover(self._store, self._vms, ("save", "restore"), finish)
        for vm in self._vms.runtimes():
            if self._store.journal(vm.spec.name) is not None:
                continue
            stale = self._managed(vm)[1 if vm.state is VmState.SAVED else 0 :]
            for key, _ in stale:
                log.info("VM %s: removing %s, a managed save it no longer resumes from", vm.spec.name, key)
                self._drop(key)

    @staticmethod
    def _alive(vm: VmRuntime) -> Monitor | None:
        if vm.proc is not None and process.alive(vm.proc) and vm.monitor is not None:
            return vm.monitor
        return None

    async def _recover_save(self, vm: VmRuntime, j: dict[str, Any]) -> None:
        row = self._store.volume(*split_volume(str(j["volume"])))
        if row is not None and row.state == "ready":
            await self._vms.halt(vm)
            self._saved(vm, bool(j.get("managed")))
            return
        if row is not None:  # VolumeService.recover removes unfinished volumes first; this is a second net
            self._volumes.discard(row.key)
        mon = self._alive(vm)
        if mon is not None:
            with contextlib.suppress(Exception):
                await savevm.cancel(mon)  # a migration into the removed temporary file may still run
            if j.get("state") == "running" and await _qmp(mon.query_status()) != "running":
                await _qmp(mon.cont())
                self._vms.set_state(vm, VmState.RUNNING, "save undone")
        self._store.set_journal(vm.spec.name, None)

    async def _recover_restore(self, vm: VmRuntime, j: dict[str, Any]) -> None:
        key, managed = str(j["volume"]), bool(j.get("managed"))
        mon = self._alive(vm)
        loaded = False
        if mon is not None:
            status = await _qmp(mon.query_status())
            if status == "inmigrate" and await _qmp(savevm.status(mon)) in ("setup", "active"):
                # The load was under way when the daemon died: let it end (QEMU exits if it fails).
                with contextlib.suppress(Exception):
                    await savevm.await_end(mon, timeout_s=savevm.timeout_for(vm.spec.memory_mib))
                status = await _qmp(mon.query_status()) if self._alive(vm) else "gone"
            # Still `inmigrate`: the daemon died before it asked QEMU to load anything.
            loaded = status not in ("inmigrate", "gone") and await _qmp(savevm.status(mon)) == "completed"
        if loaded:
            await self._resumed(vm, key, str(j.get("state")), managed=managed)
            return
        await self._vms.halt(vm)
        if vm.proc is not None:  # it ended by itself (a failed load): let the exit be recorded before our state
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vm.exited.wait(), 5)
        with self._store.transaction():
            still = managed and self._store.volume(*split_volume(key)) is not None
            if still:
                self._vms.set_state(vm, VmState.SAVED, "restore interrupted")
            self._store.set_journal(vm.spec.name, None)


def machine_changes(then: VmSpec, now: VmSpec, below: Any) -> list[str]:
    """What differs between the machine a state was saved from (then) and the VM now, in words; [] when QEMU can
    load that state into the VM. below(key) gives the volumes under volume key (its backing chain)."""
    out = []
    for label, a, b in (("memory (MiB)", then.memory_mib, now.memory_mib), ("vCPUs", then.vcpus, now.vcpus),
                        ("kernel", then.kernel, now.kernel), ("initrd", then.initrd, now.initrd),
                        ("kernel command line", then.cmdline, now.cmdline)):  # fmt: skip
        if a != b:
            out.append(f"{label} {a} → {b}")

    def named(items: list[Any]) -> dict[str, Any]:
        return {i.name: i for i in items}

    for what, a_items, b_items in (("disk", then.disks, now.disks), ("CD-ROM", then.cdroms, now.cdroms),
                                   ("NIC", then.nics, now.nics)):  # fmt: skip
        was, now_ = named(a_items), named(b_items)
        out += [f"{what} {n} added" for n in sorted(set(now_) - set(was))]
        out += [f"{what} {n} removed" for n in sorted(set(was) - set(now_))]
    for n in sorted(set(named(then.disks)) & set(named(now.disks))):
        d0, d1 = named(then.disks)[n], named(now.disks)[n]
        if d0.readonly != d1.readonly:
            out.append(f"disk {n} is now {'read-only' if d1.readonly else 'writable'}")
        same = d0.volume == d1.volume if d0.volume and d1.volume else d0.path == d1.path
        if not same and not (d0.volume and d1.volume and d0.volume in below(d1.volume)):
            out.append(f"disk {n} is now {d1.volume or d1.path} (was {d0.volume or d0.path})")
    for n in sorted(set(named(then.cdroms)) & set(named(now.cdroms))):
        c0, c1 = named(then.cdroms)[n], named(now.cdroms)[n]
        if (c0.volume, c0.path) != (c1.volume, c1.path):
            out.append(f"the medium in {n} changed")
    for n in sorted(set(named(then.nics)) & set(named(now.nics))):
        n0, n1 = named(then.nics)[n], named(now.nics)[n]
        if (n0.mac, n0.model) != (n1.mac, n1.model):
            out.append(f"NIC {n} is now {n1.model} {n1.mac} (was {n0.model} {n0.mac})")
    return out


def _stem(vm: str, ext: str) -> str:
    """The VM's name as a volume name's stem, short enough for free_name's '-N' and ext within 63 characters."""
    return vm[: 63 - len(ext) - 4]


def _save_error(vm: str, pool: str, e: BaseException) -> BaseException:
    """The error a failed save answers with: a full pool is 507 (nothing changed), QEMU's failure 502."""
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in text:
        return NoSpace(f"no space left in pool {pool!r} for the saved state of {vm!r}; the VM goes on as it was")
    if isinstance(e, savevm.MigrationFailed):
        return QmpFailed(f"QEMU could not save the state of {vm!r}: {text}")
    if isinstance(e, TimeoutError):
        return Timeout(f"saving the state of {vm!r} did not finish in time; the VM goes on as it was")
    if isinstance(e, VmkitError | asyncio.CancelledError):
        return e
    return QmpFailed(f"saving the state of {vm!r} failed: {type(e).__name__}: {e}")
