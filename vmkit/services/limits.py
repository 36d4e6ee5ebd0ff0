"""Resource limits of a VM: checking them, and landing them in its cgroup and QEMU's throttle groups.

A VM's limits live in its spec (so they survive restarts and apply at every start); while it runs they are
also applied live, like virsh schedinfo / memtune / blkdeviotune. CPU and memory limits bound the whole
QEMU process (its own overhead included) through the VM's cgroup; disk limits go through QEMU's I/O
throttling, one throttle group per disk, so they show in `query-block`.
"""

from __future__ import annotations

import os

from vmkit.errors import InvalidInput
from vmkit.host.cgroups import CgroupLimits
from vmkit.model.vm import DiskSpec, SetVm, VmSpec
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
    """spec with req's changes: fields req names are set (null clears them), the others are kept."""
    changes = {f: getattr(req, f) for f in LIMIT_FIELDS if f in req.model_fields_set}
    disks = list(spec.disks)
    for d in req.disks:
        i = d.index
        if i >= len(disks):
            raise InvalidInput(f"VM {spec.name!r} has no disk {d.name!r} (it has {len(disks)})")
        disks[i] = disks[i].model_copy(
            update={f: getattr(d, f) for f in ("iops_total", "bps_total") if f in d.model_fields_set}
        )
    new = spec.model_copy(update={**changes, "disks": disks})
    check(new)
    return new


def qdev(index: int) -> str:
    """QOM path of disk `index`'s virtio-blk device: throttling attaches to its block backend."""
    return f"/machine/peripheral/disk{index}-dev/virtio-backend"


async def apply_disk(monitor: Monitor, index: int, disk: DiskSpec) -> None:
    await monitor.block_set_io_throttle(
        qdev(index), iops_total=disk.iops_total or 0, bps_total=disk.bps_total or 0, group=f"disk{index}"
    )


async def apply_disks(monitor: Monitor, spec: VmSpec, *, only_limited: bool) -> None:
    """Throttle each disk as its spec says; with only_limited, skip unlimited ones (a fresh QEMU has none)."""
    for i, disk in enumerate(spec.disks):
        if not only_limited or disk.iops_total or disk.bps_total:
            await apply_disk(monitor, i, disk)
