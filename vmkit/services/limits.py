"""Resource limits of a VM: checking them, and landing them in its cgroup and QEMU's throttle groups.

A VM's limits live in its spec (so they survive restarts and apply at every start); while it runs they are
also applied live, like virsh schedinfo / memtune / blkdeviotune. CPU and memory limits bound the whole
QEMU process (its own overhead included) through the VM's cgroup; disk limits go through QEMU's I/O
throttling, one throttle group per disk (named as the disk: disk0, disk2, …), so they show in `query-block`.
A disk is addressed by its name, never its position: detaching disk1 leaves disk0 and disk2 as they were.
"""

from __future__ import annotations

import os

from vmkit.errors import InvalidInput
from vmkit.host.cgroups import CgroupLimits
from vmkit.model.vm import DiskSpec, SetVm, VmSpec
from vmkit.qemu.argv import device_id
from vmkit.qemu.monitor import Monitor

LIMIT_FIELDS = ("cpu_weight", "cpu_max_percent", "memory_max_mib")


def check(spec: VmSpec) -> None:
    """Refuse limits the host or the VM itself cannot honour; InvalidInput names the field."""
    cpus = os.cpu_count() or 1
    if spec.cpu_max_percent is not None and spec.cpu_max_percent > 100 * cpus:
        raise InvalidInput(f"cpu_max_percent {spec.cpu_max_percent} exceeds the host's {cpus} CPUs ({100 * cpus})")
    if spec.memory_max_mib is not None and spec.memory_max_mib < spec.memory_mib:
        raise InvalidInput(
            f"memory_max_mib {spec.memory_max_mib} is below the guest's memory_mib {spec.memory_mib} "
            "(the cap covers guest RAM plus QEMU's own overhead)"
        )


def cgroup_limits(spec: VmSpec) -> CgroupLimits:
    return CgroupLimits(spec.cpu_weight, spec.cpu_max_percent, spec.memory_max_mib)


def has_cgroup_limits(spec: VmSpec) -> bool:
    return any(getattr(spec, f) is not None for f in LIMIT_FIELDS)


def updated(spec: VmSpec, req: SetVm) -> VmSpec:
    """spec with req's changes: fields req names are set (null clears them), the others are kept. A disk is
    named as in the spec (disk0, disk2, …); InvalidInput for one the VM does not have."""
    changes = {f: getattr(req, f) for f in LIMIT_FIELDS if f in req.model_fields_set}
    disks = list(spec.disks)
    for d in req.disks:
        i = next((k for k, disk in enumerate(disks) if disk.name == d.name), None)
        if i is None:
            have = ", ".join(disk.name for disk in disks) or "none"
            raise InvalidInput(f"VM {spec.name!r} has no disk {d.name!r} (it has {have})")
        disks[i] = disks[i].model_copy(
            update={f: getattr(d, f) for f in ("iops_total", "bps_total") if f in d.model_fields_set}
        )
    new = spec.model_copy(update={**changes, "disks": disks})
    check(new)
    return new


def qdev(name: str) -> str:
    """QOM path of disk `name`'s virtio-blk backend (as query-block's `qdev` shows it): throttling attaches to
    its block backend."""
    return f"/machine/peripheral/{device_id(name)}/virtio-backend"


async def apply_disk(monitor: Monitor, disk: DiskSpec) -> None:
    """Throttle one disk as its spec says (0 = unlimited), in its own throttle group named as the disk."""
    await monitor.block_set_io_throttle(
        qdev(disk.name), iops_total=disk.iops_total or 0, bps_total=disk.bps_total or 0, group=disk.name
    )


async def apply_disks(monitor: Monitor, spec: VmSpec, *, only_limited: bool) -> None:
    """Throttle each disk as its spec says; with only_limited, skip unlimited ones (a fresh QEMU has none)."""
    for disk in spec.disks:
        if not only_limited or disk.iops_total or disk.bps_total:
            await apply_disk(monitor, disk)
