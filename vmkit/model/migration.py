"""Pure data types for migrating a VM to another vmkit host (services/migrations.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.snapshot import SnapshotRecord
from vmkit.model.storage import DiskFormat, SizeBytes, VolumeKey
from vmkit.model.vm import DISK_NAME_PATTERN, VmSpec

MAX_DOWNTIME_MS = 60_000
MAX_BANDWIDTH_MIB_S = 100_000


class MigrateVm(BaseModel):
    """Body of POST /v1/vms/{name}/migrate (virsh migrate --live [--copy-storage-all])."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    remote: Annotated[
        str, Field(description="a remote's name (vmkit remote list)", json_schema_extra={"pattern": NAME_PATTERN})
    ]
    offline: bool = False  # a shut-off VM: its definition and disks move, nothing runs
    # Disks on local pools copied to new volumes on the destination while the guest runs; without it, every
    # disk must be on a shared pool the destination defines too (only RAM and device state move).
    copy_storage: bool = False
    # When the autopilot cannot make it converge: switch to post-copy (the guest runs there at once and fetches
    # the pages it lacks) rather than cancel. Needs every disk on shared storage.
    postcopy: bool = False
    max_downtime_ms: Annotated[int, Field(ge=1, le=MAX_DOWNTIME_MS)] = 300
    bandwidth_mib_s: Annotated[int | None, Field(ge=1, le=MAX_BANDWIDTH_MIB_S)] = None  # None: no cap

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: str) -> str:
        return check_name(v, "remote")


class IncomingDisk(BaseModel):
    """A disk of a VM coming: a new volume to copy it into, or (shared) the volume of a shared pool both hosts
    define, which stays where it is."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    disk: Annotated[str, Field(pattern=DISK_NAME_PATTERN)]
    size_bytes: SizeBytes
    format: DiskFormat
    shared: VolumeKey | None = None
    location: Annotated[str | None, Field(max_length=2048)] = None  # the shared volume's URL, as the source has it
    # A read-only disk (a cloud-init seed, say) is no mirror's: the source sent it whole beforehand, as this volume.
    sent: VolumeKey | None = None


class IncomingMigration(BaseModel):
    """Body of POST /v1/migrations/incoming, sent by the source daemon: make room for the VM and wait for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: VmSpec
    autostart: bool = False
    disks: Annotated[list[IncomingDisk], Field(max_length=64)] = Field(default_factory=list)
    # The destination's address as the source reaches it: where its QEMU listens for the streams (live only).
    host: Annotated[str | None, Field(max_length=255)] = None
    # Offline: the disks' volumes here (uploaded by the source beforehand), disk → POOL/NAME; nothing runs.
    volumes: dict[str, VolumeKey] | None = None
    postcopy: bool = False  # the migration may switch to post-copy: QEMU here must allow it up front
    # Offline, a VM with snapshots: every image its disks and snapshots stand on was sent whole (source POOL/NAME
    # → POOL/NAME here), and its snapshot tree comes along, the current one named.
    renames: dict[VolumeKey, VolumeKey] | None = None
    snapshots: Annotated[list[SnapshotRecord], Field(max_length=1000)] = Field(default_factory=list)
    current_snapshot: Annotated[str | None, Field(max_length=63)] = None
    # The images pool volumes the VM boots from (direct kernel boot), found on the destination by name.
    kernel_volume: VolumeKey | None = None
    initrd_volume: VolumeKey | None = None


class IncomingReady(BaseModel):
    """What the destination answers: where its QEMU listens, and the key of both TLS streams."""

    id: str
    migration_port: int = 0
    nbd_port: int = 0
    exports: dict[str, str] = Field(default_factory=dict)  # disk → NBD export name
    psk: str = ""  # hex; live only


class FinishIncoming(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    running: bool = True  # resume the guest (it was running on the source)
