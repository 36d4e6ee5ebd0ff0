"""Pure data types for virtual machines. No side effects live here.

`VmSpec` is what is persisted and what the QEMU argv builder consumes; `CreateVm` is what the API accepts.
Both reject unknown fields so a typo is an error, not a silently ignored option.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)

# Hard bounds independent of the host; the service also checks against the host's own size.
MEMORY_MIB_MIN = 16
MEMORY_MIB_MAX = 4 * 1024 * 1024  # 4 TiB
VCPUS_MAX = 255  # what QEMU's x86 machines accept without x2apic/IOMMU tricks
# Resource limits (see host/cgroups.py for how each lands in the VM's cgroup).
CPU_WEIGHT_MAX = 10_000  # cgroup v2's range; 100 is the default share
CPU_MAX_PERCENT_MAX = 100 * VCPUS_MAX  # percent of one host CPU; the service also checks the host's count
# QEMU's throttling refuses values above 1e15; far beyond any device anyway.
IOPS_MAX = 10**9
BPS_MAX = 10**15

CpuWeight = Annotated[int, Field(ge=1, le=CPU_WEIGHT_MAX, description="CPU weight, 1-10000 (default 100)")]
CpuMaxPercent = Annotated[
    int, Field(ge=1, le=CPU_MAX_PERCENT_MAX, description="CPU time cap in percent of one host CPU (200 = 2 CPUs)")
]
MemoryMaxMib = Annotated[
    int, Field(ge=MEMORY_MIB_MIN, le=MEMORY_MIB_MAX, description="memory cap of the whole QEMU process, MiB")
]
Iops = Annotated[int, Field(ge=1, le=IOPS_MAX, description="I/O operations per second, reads and writes together")]
Bps = Annotated[int, Field(ge=1, le=BPS_MAX, description="bytes per second, reads and writes together")]


def valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None  # fullmatch: "$" alone would accept a trailing newline


def check_name(name: str, what: str = "VM") -> str:
    """Return name if it is a valid resource name, else raise ValueError with a message for people."""
    if not valid_name(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use 1-63 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


class VmState(StrEnum):
    """The state words virsh uses, so habits carry over."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "in shutdown"
    SHUTOFF = "shut off"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @property
    def active(self) -> bool:
        """True while a QEMU process exists for the VM."""
        return self not in (VmState.SHUTOFF, VmState.CRASHED)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiskSpec(_Strict):
    path: str
    format: Literal["raw", "qcow2"]
    # Set when vmkit made the file for this VM (deleted with the VM unless --keep-disks).
    owned: bool = True
    backing_image: str | None = None
    # I/O limits through QEMU's throttle groups (one group per disk); None is unlimited.
    iops_total: int | None = None
    bps_total: int | None = None


class NicSpec(_Strict):
    # Only QEMU user-mode networking with restrict=on exists until vmkit networks land: the guest gets DHCP
    # from QEMU itself and cannot reach the host or the outside world.
    kind: Literal["user"] = "user"
    mac: Annotated[str, Field(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]


class VmSpec(_Strict):
    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    image: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    # Limits on the whole QEMU (its cgroup); None is the host's default.
    cpu_weight: int | None = None
    cpu_max_percent: int | None = None
    memory_max_mib: int | None = None


class Limits(_Strict):
    """Resource limits a request may set. In PATCH /v1/vms/{name}, an absent field is left as it is and
    null removes the limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cpu_weight: CpuWeight | None = None
    cpu_max_percent: CpuMaxPercent | None = None
    memory_max_mib: MemoryMaxMib | None = None


class DiskLimits(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, Field(pattern=r"^disk[0-9]{1,3}$", description="the disk's node name: disk0, disk1, …")]
    iops_total: Iops | None = None
    bps_total: Bps | None = None

    @property
    def index(self) -> int:
        """Position in the VM's disk list (the pattern guarantees the digits)."""
        return int(self.name.removeprefix("disk"))


class SetVm(Limits):
    """Body of PATCH /v1/vms/{name}: change limits, live when the VM runs (like virsh schedinfo / memtune /
    blkdeviotune)."""

    disks: Annotated[list[DiskLimits], Field(max_length=64)] = Field(default_factory=list)


_ABS_PATH_PATTERN = r"^/[^\x00]*$"


class CreateVm(_Strict):
    """Request body of POST /v1/vms. Strict: `true` is not a vCPU count, "512" is not a size."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # The patterns only document the validators below (which give the clearer messages) in the OpenAPI document.
    name: Annotated[str, Field(description="VM name", json_schema_extra={"pattern": NAME_PATTERN})]
    memory_mib: Annotated[int, Field(ge=MEMORY_MIB_MIN, le=MEMORY_MIB_MAX)] = 512
    vcpus: Annotated[int, Field(ge=1, le=VCPUS_MAX)] = 1
    image: Annotated[str | None, Field(json_schema_extra={"pattern": NAME_PATTERN})] = None
    kernel: Annotated[str | None, Field(json_schema_extra={"pattern": _ABS_PATH_PATTERN})] = None
    initrd: Annotated[str | None, Field(json_schema_extra={"pattern": _ABS_PATH_PATTERN})] = None
    cmdline: Annotated[str | None, Field(max_length=4096, json_schema_extra={"pattern": r"^[^\x00\n]*$"})] = None
    disk_size_bytes: Annotated[int | None, Field(gt=0, le=64 * 1024**4)] = None
    nic: bool = True
    autostart: bool = False
    cpu_weight: CpuWeight | None = None
    cpu_max_percent: CpuMaxPercent | None = None
    memory_max_mib: MemoryMaxMib | None = None
    disk_iops_total: Iops | None = None
    disk_bps_total: Bps | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "image")

    @field_validator("kernel", "initrd")
    @classmethod
    def _abs_path(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or "\0" in v):
            raise ValueError("must be an absolute path")
        return v

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str | None) -> str | None:
        if v is not None and any(c in v for c in "\0\n"):
            raise ValueError("must be a single line")
        return v


class LiveIoLimits(BaseModel):
    iops: int | None = None
    bps: int | None = None
    group: str | None = None


class DiskInfo(DiskSpec):
    """A disk as GET /v1/vms/{name}/disks shows it."""

    name: str
    live: LiveIoLimits | None = None


class VmInfo(BaseModel):
    """What GET /v1/vms and /v1/vms/{name} return."""

    name: str
    uuid: str
    state: VmState
    reason: str | None = None
    memory_mib: int
    vcpus: int
    image: str | None = None
    autostart: bool
    pid: int | None = None
    agent: bool = False
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    runtime_dir: str | None = None
    cpu_weight: int | None = None
    cpu_max_percent: int | None = None
    memory_max_mib: int | None = None
    # The identity QEMU runs as: the live process's while it runs (a VM started by a vmkit from before
    # isolation shows uid 0 until restarted), else the one it will get.
    uid: int | None = None
    gid: int | None = None
    cgroup: str | None = None
    cpu_time_ns: int | None = None
    memory_bytes: int | None = None
