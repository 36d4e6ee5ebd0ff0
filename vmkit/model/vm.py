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


class CreateVm(_Strict):
    """Request body of POST /v1/vms. Strict: `true` is not a vCPU count, "512" is not a size."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, Field(description="VM name: [A-Za-z0-9][A-Za-z0-9._-]{0,62}")]
    memory_mib: Annotated[int, Field(ge=MEMORY_MIB_MIN, le=MEMORY_MIB_MAX)] = 512
    vcpus: Annotated[int, Field(ge=1, le=VCPUS_MAX)] = 1
    image: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: Annotated[str | None, Field(max_length=4096)] = None
    disk_size_bytes: Annotated[int | None, Field(gt=0, le=64 * 1024**4)] = None
    nic: bool = True
    autostart: bool = False

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
