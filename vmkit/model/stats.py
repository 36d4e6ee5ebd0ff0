"""Pure data types for VM statistics (see services/stats.py for how they are gathered). No side effects here.

Counters are cumulative since the VM's QEMU started (a restart starts them again from zero, as Prometheus
counters may); units are in the field names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DiskSample:
    """One disk's counters from QMP query-blockstats (its virtio-blk backend)."""

    name: str  # disk0, disk1, ... as `vmkit vm disks` names them
    read_bytes: int
    write_bytes: int
    read_requests: int
    write_requests: int
    flush_requests: int
    read_time_ns: int
    write_time_ns: int
    flush_time_ns: int


@dataclass(frozen=True, slots=True)
class NicSample:
    """One tap NIC's counters, from the guest's side (the host side of a tap counts the other way round, so
    they are swapped, as libvirt's domifstat does)."""

    name: str  # net0, net1, … as the VM's spec names them
    tap: str  # the host's tap device
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_drops: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_drops: int


@dataclass(frozen=True, slots=True)
class VmSample:
    """What one sampling round saw of one running VM."""

    time_s: float  # Unix time of the sample
    # The whole QEMU (its cgroup's CPU time; /proc/PID/stat where it runs outside one): vCPUs, I/O, emulation.
    cpu_time_ns: int | None
    # Per vCPU thread (index = vCPU number), from /proc/PID/task/TID/stat; () when QEMU does not name its vCPU
    # threads (single-threaded TCG runs every vCPU on one "ALL CPUs/TCG" thread).
    vcpu_time_ns: tuple[int, ...]
    rss_bytes: int | None  # QEMU's resident set (guest RAM it touched plus its own)
    cgroup_memory_bytes: int | None  # charged to the VM's cgroup: RSS plus page cache of its disk I/O
    disks: tuple[DiskSample, ...] | None  # None: QEMU did not answer query-blockstats in time
    nics: tuple[NicSample, ...] = ()  # tap NICs only: QEMU's user-mode networking exposes no counters


@dataclass(frozen=True, slots=True)
class VmStatsHistory:
    """The recent samples of one VM, oldest first (GET /v1/vms/{name}/stats)."""

    name: str
    interval_s: float
    samples: list[VmSample]
