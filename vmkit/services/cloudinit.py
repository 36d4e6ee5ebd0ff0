"""A VM's cloud-init NoCloud seed: made with the VM (VmService.add_seed), made anew for a clone (CloneService.new_seed)
and when its settings change (PUT, the VM shut off), and shown as the guest reads it.

The seed is a volume of pool `default`, NAME-cidata.iso: an ISO9660 image labelled `cidata` (images/cloudinit.py),
recorded as format raw (QEMU reads it as a raw disk, never probing it), owned by the VM (deleted with it) and
attached read-only as a virtio disk, marked DiskSpec.cloud_init. VmSpec.cloud_init records its settings and
generation.

Crash safety: a VM's or a clone's new seed is made like its other new disks (the volume is reserved, written,
then the VM is recorded; undone on failure). Making a seed again writes the new image beside the old one,
journals the change on the VM, records the new settings, renames the image into place and clears the journal;
after a crash in between, recover() builds the seed again from what the spec records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from vmkit.errors import Conflict, InvalidInput, NotFound
from vmkit.images import cloudinit as seeds
from vmkit.model.cloudinit import (
    CloudInitConfig,
    CloudInitFiles,
    CloudInitInfo,
    CloudInitRequest,
    CloudInitSettings,
)
from vmkit.model.storage import DEFAULT_POOL
from vmkit.model.vm import MAX_DISKS, CreateVm, DiskSpec, VmSpec, VmState
from vmkit.services import journal
from vmkit.services.clones import CloneService
from vmkit.services.reverter import Reverter
from vmkit.services.vms import VmRuntime, VmService
from vmkit.services.volumes import VolumeService
from vmkit.storage import files
from vmkit.store.db import Store
from vmkit.util.crash import crashpoint

log = logging.getLogger(__name__)

JOURNAL_OP = "cloud-init"
SEED_SUFFIX = "-cidata"
SEED_EXT = ".iso"
# A volume name has at most 63 characters: room for the suffix, the extension and free_name's "-999".
_STEM_MAX = 63 - len(SEED_SUFFIX) - len(SEED_EXT) - 4


class CloudInitService:
    def __init__(self, *, store: Store, vms: VmService, volumes: VolumeService, clones: CloneService) -> None:
        self._store = store
        self._vms = vms
        self._volumes = volumes
        vms.add_seed = self._for_new_vm
        clones.new_seed = self._for_clone

    # ----- queries -------------------------------------------------------------------------------------------
    async def show(self, name: str) -> CloudInitInfo:
        """The seed's files as the guest reads them, with the settings they were made from."""
        spec = self._vms.runtime(name).spec
        if spec.cloud_init is None:
            raise NotFound(
                f"VM {name!r} has no cloud-init seed (make one: vmkit vm cloud-init {name} --set [--ssh-key FILE] …)"
            )
        # YAML work (up to ~50 ms for 64 KiB of user-data) stays off the event loop.
        return await asyncio.to_thread(self._info, spec)

    def _info(self, spec: VmSpec) -> CloudInitInfo:
        cfg = spec.cloud_init
        assert cfg is not None
        settings = cfg.settings()
        disk = _seed_disk(spec)
        return CloudInitInfo(
            vm=spec.name,
            seed=disk.volume if disk else None,
            disk=disk.name if disk else None,
            instance_id=seeds.instance_id(spec.uuid, cfg.generation),
            hostname=seeds.hostname(settings, spec.name),
            user=cfg.user,
            logins=seeds.logins(seeds.merged_user_data(settings)),
            settings=settings,
            files=self._files(spec, settings, cfg.generation),
        )

    @staticmethod
    def _files(spec: VmSpec, settings: CloudInitSettings, generation: int) -> CloudInitFiles:
        return seeds.seed_files(settings, vm_name=spec.name, uuid=spec.uuid, generation=generation)

    async def _build(self, spec: VmSpec, settings: CloudInitSettings, generation: int, out: Path) -> None:
        """Write the seed of spec (made from settings) to the new file out."""
        await asyncio.to_thread(lambda: seeds.build_iso(self._files(spec, settings, generation), out))

    # ----- changes -------------------------------------------------------------------------------------------
    async def set(self, name: str, req: CloudInitRequest) -> CloudInitInfo:
        """Give a shut-off VM a seed made from req (replacing its settings): its next boot is a first boot for
        cloud-init (a new instance-id). A VM without a seed gets one, as its last disk."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            self._check_changeable(vm)
            settings = CloudInitSettings.of(req)
            cfg = vm.spec.cloud_init
            generation = 0 if cfg is None else cfg.generation + 1
            new = CloudInitConfig(**settings.model_dump(), generation=generation)
            if _seed_disk(vm.spec) is not None:
                await self._rewrite(vm, vm.spec.model_copy(update={"cloud_init": new}))
            else:
                # None yet, or its seed was detached (that volume is left as it is).
                with Reverter() as rev:
                    spec = await self._with_new_seed(vm.spec, settings, generation, rev)
                    self._vms.save_spec(vm, spec)
                    rev.success()
        return await self.show(name)

    def _check_changeable(self, vm: VmRuntime) -> None:
        name = vm.spec.name
        if vm.state.active or vm.proc is not None:
            raise Conflict(f"VM {name!r} is {vm.state}: its cloud-init seed changes only while it is shut off")
        if vm.state is VmState.SAVED:
            raise Conflict(
                f"VM {name!r} has a managed save, whose guest may hold the seed as it was: start it (it resumes) and "
                f"shut it down, or discard the saved state (vmkit vm managedsave-remove {name}), first"
            )
        j = self._store.journal(name)
        if j is not None:
            raise Conflict(f"VM {name!r} has unfinished work ({j.get('op')}); restart the daemon to finish it")
        disk = _seed_disk(vm.spec)
        if disk is not None and disk.volume and self._volumes.busy(disk.volume):
            raise Conflict(f"volume {disk.volume} is busy (an operation on it is running)")

    async def _rewrite(self, vm: VmRuntime, spec: VmSpec) -> None:
        """Record spec (its cloud_init changed) and make its seed again in place, crash-safely (module docstring).
        The caller holds the VM's lock."""
        cfg, disk = spec.cloud_init, _seed_disk(spec)
        assert cfg is not None and disk is not None and disk.volume is not None
        path = self._volumes.path(disk.volume)
        tmp = files.temp_path(path.parent, path.name)
        try:
            await self._build(spec, cfg.settings(), cfg.generation, tmp)
            self._store.set_journal(spec.name, {"op": JOURNAL_OP, "seed": disk.volume})
            self._vms.save_spec(vm, spec)
            crashpoint("cloud-init-recorded")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._store.set_journal(spec.name, None)

    # ----- hooks: a new VM, a clone --------------------------------------------------------------------------
    async def _for_new_vm(self, spec: VmSpec, req: CreateVm, rev: Reverter) -> VmSpec:
        if req.cloud_init is None:
            return spec
        return await self._with_new_seed(spec, CloudInitSettings.of(req.cloud_init), 0, rev)

    async def _for_clone(self, spec: VmSpec, rev: Reverter) -> VmSpec:
        """A clone's seed is its own, made for its name and UUID (a new instance-id: cloud-init runs again on its
        first boot); until now its spec names the source's, shared read-only like any read-only disk. The source's
        seed was detached: the clone gets none attached either (its settings stay, for a later --set)."""
        if spec.cloud_init is None or _seed_disk(spec) is None:
            return spec
        return await self._with_new_seed(spec, spec.cloud_init.settings(), 0, rev)

    async def _with_new_seed(self, spec: VmSpec, settings: CloudInitSettings, generation: int, rev: Reverter) -> VmSpec:
        """spec with a new seed volume made from settings: in place of the disk of its current seed when it has
        one, else as a new last disk. The volume is discarded by rev if what follows fails."""
        at = next((i for i, d in enumerate(spec.disks) if d.cloud_init), None)
        if at is None and len(spec.disks) >= MAX_DISKS:
            raise InvalidInput(f"VM {spec.name!r} has {MAX_DISKS} disks already: no room for a cloud-init seed")
        name = self._volumes.free_name(DEFAULT_POOL, spec.name[:_STEM_MAX] + SEED_SUFFIX, SEED_EXT)
        with tempfile.TemporaryDirectory(prefix="vmkit-seed-") as tmp:
            iso = Path(tmp) / "seed.iso"
            await self._build(spec, settings, generation, iso)
            info = await self._volumes.register_file(DEFAULT_POOL, name, iso, fmt="raw")
        rev.add(lambda: self._volumes.discard(info.key))
        disks = list(spec.disks)
        if at is None:
            taken = {d.name for d in disks}
            node = next(f"disk{i}" for i in range(MAX_DISKS + 1) if f"disk{i}" not in taken)
            disks.append(DiskSpec(name=node, path=info.path, format="raw", owned=True, volume=info.key, readonly=True,
                                  cloud_init=True))  # fmt: skip
        else:
            disks[at] = disks[at].model_copy(
                update={"path": info.path, "format": "raw", "owned": True, "volume": info.key, "readonly": True}
            )
        cfg = CloudInitConfig(**settings.model_dump(), generation=generation)
        return spec.model_copy(update={"disks": disks, "cloud_init": cfg})

    # ----- crash recovery ------------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Make again the seed of a VM whose change a crash cut short (see the module's docstring)."""
        await journal.recover(self._store, self._vms, (JOURNAL_OP,), self._recover)

    async def _recover(self, vm: VmRuntime, entry: dict[str, Any]) -> None:
        async with vm.lock:
            disk = _seed_disk(vm.spec)
            if vm.spec.cloud_init is not None and disk is not None and disk.volume == entry.get("seed"):
                await self._rewrite(vm, vm.spec)
            self._store.set_journal(vm.spec.name, None)


def _seed_disk(spec: VmSpec) -> DiskSpec | None:
    """The disk holding the VM's seed; None when it has none, or it was detached."""
    return next((d for d in spec.disks if d.cloud_init and d.volume), None)
