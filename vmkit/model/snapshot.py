"""Pure data types for snapshots: one tree of them per VM.

Two kinds, as in libvirt:
- internal: a named snapshot inside each of the VM's qcow2 images (its tag is the snapshot's name), with the
  RAM and device state saved in the first disk's image when the VM was running (`memory`);
- external (disk-only): each disk's image at that moment is frozen (it becomes a read-only backing file) and a
  new qcow2 overlay on it takes the guest's writes from then on.

A snapshot records the VM's whole spec as it was (`spec`): its disks' volumes there are the images holding the
snapshot (internal: the images with the tag; external: the frozen images), and a revert brings the spec back
with the disks re-pointed at fresh images. `parent` links the tree; the VM's current snapshot (the parent of
whatever it runs now) is flagged in the store. UEFI variables will join a snapshot as one more image of it
(`firmware`, a volume): internal snapshots of UEFI VMs are not refused here, as libvirt refuses them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.vm import VmSpec

SnapshotKind = Literal["internal", "external"]
# The state the VM was in when the snapshot was taken, which a revert brings back: a snapshot with memory
# resumes running (or paused); one without leaves the VM shut off.
SnapshotState = Literal["running", "paused", "shut off"]
DESCRIPTION_MAX = 1000


class SnapshotRecord(BaseModel):
    """A snapshot as stored (the `data` of its row)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: SnapshotKind
    parent: str | None = None
    state: SnapshotState
    memory: bool = False  # RAM and device state saved (internal snapshots of a running or paused VM)
    quiesced: bool = False  # the guest's filesystems were frozen through its agent (external, running VM)
    description: str = ""
    created_at: float
    spec: VmSpec
    firmware: str | None = None  # POOL/NAME of the firmware variables' image (UEFI, later)

    def images(self) -> list[str]:
        """POOL/NAME of every image holding this snapshot (read-only disks are never part of one)."""
        return [d.volume for d in self.spec.disks if d.volume and not d.readonly]


class CreateSnapshot(BaseModel):
    """Body of POST /v1/vms/{name}/snapshots."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    description: Annotated[str, Field(max_length=DESCRIPTION_MAX, json_schema_extra={"pattern": r"^[^\x00]*$"})] = ""
    disk_only: bool = False  # external: a new overlay on every disk
    # Accepted for virsh's habit: an external snapshot is always one QMP transaction (all disks or none).
    atomic: bool = True
    quiesce: bool = True  # freeze the guest's filesystems around an external snapshot when its agent answers

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_name(v, "snapshot")
        if v.isdigit():
            # qcow2 finds an internal snapshot by its id or its tag: a tag of digits could name another one.
            raise ValueError(f"invalid snapshot name {v!r}: it must not be digits only")
        return v

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        if "\0" in v:
            raise ValueError("must not contain NUL")
        return v


class SnapshotInfo(BaseModel):
    """What GET /v1/vms/{name}/snapshots[/{snap}] returns."""

    name: str
    kind: SnapshotKind
    parent: str | None = None
    children: list[str] = Field(default_factory=list)
    current: bool = False
    state: SnapshotState
    memory: bool = False
    quiesced: bool = False
    description: str = ""
    created_at: float
    disks: list[dict[str, str | None]] = Field(default_factory=list)  # {disk, volume} of each image holding it
