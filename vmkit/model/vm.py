"""Pure data types for virtual machines. No side effects live here.

`VmSpec` is what is persisted and what the QEMU argv builder consumes; `CreateVm` is what the API accepts.
Both reject unknown fields so a typo is an error, not a silently ignored option.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmkit.model.cloudinit import CloudInitConfig, CloudInitRequest, CloudInitSummary
from vmkit.model.names import NAME_PATTERN, check_name, valid_name
from vmkit.model.network import NicRequest
from vmkit.model.storage import IMAGE_REF_PATTERN, AbsPath, DiskFormat, Prealloc, SizeBytes, VolumeKey, split_volume

__all__ = ["NAME_PATTERN", "check_name", "valid_name"]  # the name rule, re-exported for older imports

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


class VmState(StrEnum):
    """The state words virsh uses, so habits carry over."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "in shutdown"
    SHUTOFF = "shut off"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    # Shut off with its RAM and device state kept in a managed save (services/vmsave.py): the next start
    # resumes from it. virsh shows such a domain "shut off (saved)"; a word of its own tells it apart here.
    SAVED = "saved"

    @property
    def active(self) -> bool:
        """True while a QEMU process exists for the VM."""
        return self not in (VmState.SHUTOFF, VmState.CRASHED, VmState.SAVED)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DISK_NAME_PATTERN = r"^disk[0-9]{1,3}$"
CDROM_NAME_PATTERN = r"^cd[0-5]$"  # ide.0-ide.5 of q35's AHCI
MAX_DISKS = 64
MAX_NICS = 16
NIC_NAME_PATTERN = r"^net[0-9]{1,2}$"
MAX_CDROMS = 4  # q35's AHCI ports left after none are used for disks


# A PCIe root port's id in QEMU (disk0-port, net1-port, hp2).
PORT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,40}$"


class DiskSpec(_Strict):
    # The QEMU node name (disk0, disk1, …): stable for the disk's life, so detaching one never renames
    # the others. Specs written before names existed get disk{i} in list order (see VmSpec).
    name: str = ""
    path: str
    format: Literal["raw", "qcow2"]
    # Set when vmkit made the volume for this VM (deleted with the VM unless --keep-disks).
    owned: bool = True
    backing_image: str | None = None
    # POOL/NAME of the volume holding the file; None only for specs from before pools, until taken over.
    volume: str | None = None
    readonly: bool = False
    # The VM's cloud-init NoCloud seed (services/cloudinit.py; VmSpec.cloud_init holds its settings).
    cloud_init: bool = False
    # I/O limits through QEMU's throttle groups (one group per disk); None is unlimited.
    iops_total: int | None = None
    bps_total: int | None = None
    # The PCIe root port it was hot-plugged onto while the VM ran (None: its own, `{name}-port`). Kept until the
    # next cold start, so that a migration, a restore or a RAM snapshot's revert rebuilds the same machine.
    port: Annotated[str | None, Field(pattern=PORT_ID_PATTERN)] = None


def _named(item: object, name: str) -> object:
    """item (a dict, or a DiskSpec/NicSpec) with `name` when it has none."""
    if isinstance(item, dict) and not item.get("name"):
        return {**item, "name": name}
    if isinstance(item, BaseModel) and not getattr(item, "name", "x"):
        return item.model_copy(update={"name": name})
    return item


class CdromSpec(_Strict):
    """A CD-ROM drive (IDE/AHCI, read-only). path None is an empty tray."""

    name: str  # cd0, cd1, …
    path: str | None = None
    volume: str | None = None  # POOL/NAME when the medium is a volume, else a file given by path


class NicSpec(_Strict):
    # "user": QEMU user-mode networking with restrict=on (the guest gets DHCP from QEMU and reaches nothing);
    # "network": a tap on a vmkit network's bridge (model/network.py).
    # The NIC's id in QEMU (net0, net1, …): stable for its life, like a disk's name (VmSpec fills old specs in).
    name: str = ""
    kind: Literal["user", "network"] = "user"
    network: str | None = None
    mac: Annotated[str, Field(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]
    model: Literal["virtio", "e1000"] = "virtio"
    vlan: int | None = None  # ovs networks: access port of this VLAN
    trunks: list[int] | None = None  # ovs networks: trunk port of these VLANs
    port: Annotated[str | None, Field(pattern=PORT_ID_PATTERN)] = None  # as DiskSpec.port


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
    cdroms: list[CdromSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    # Images vmkit made for this VM that sit below its disks and that others share (a linked clone froze them
    # under both VMs): deleted with the VM, like its disks, once nothing else needs them. POOL/NAME.
    bases: list[str] = Field(default_factory=list)
    # The PCIe root ports of the machine as it runs, in order, once a hot-plug changed its devices (a detached
    # disk's port stays in the running machine); None: derived from its devices (qemu/argv.py machine_ports).
    # Dropped at the next cold start, with the devices' own `port`.
    ports: list[Annotated[str, Field(pattern=PORT_ID_PATTERN)]] | None = None
    # Limits on the whole QEMU (its cgroup); None is the host's default.
    cpu_weight: int | None = None
    cpu_max_percent: int | None = None
    memory_max_mib: int | None = None
    # The settings of its cloud-init NoCloud seed (the disk marked cloud_init); None for VMs without one, and in
    # specs from before seeds.
    cloud_init: CloudInitConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _disk_names(cls, data: object) -> object:
        """Specs stored before disks and NICs had names: name them by position, as QEMU knew them then."""
        for key, prefix in (("disks", "disk"), ("nics", "net")):
            if isinstance(data, dict) and isinstance(data.get(key), list):
                items = [_named(d, f"{prefix}{i}") for i, d in enumerate(data[key])]
                data = {**data, key: items}
        return data

    def disk(self, name: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.name == name), None)

    def nic(self, name: str) -> NicSpec | None:
        return next((n for n in self.nics if n.name == name), None)


class Limits(_Strict):
    """Resource limits a request may set. In PATCH /v1/vms/{name}, an absent field is left as it is and
    null removes the limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cpu_weight: CpuWeight | None = None
    cpu_max_percent: CpuMaxPercent | None = None
    memory_max_mib: MemoryMaxMib | None = None


class DiskLimits(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, Field(pattern=DISK_NAME_PATTERN, description="the disk's node name: disk0, disk1, …")]
    iops_total: Iops | None = None
    bps_total: Bps | None = None


class SetVm(Limits):
    """Body of PATCH /v1/vms/{name}: change limits, live when the VM runs (like virsh schedinfo / memtune /
    blkdeviotune)."""

    disks: Annotated[list[DiskLimits], Field(max_length=64)] = Field(default_factory=list)


def _check_volume_key(v: str | None) -> str | None:
    if v is not None:
        split_volume(v)
    return v


class DiskRequest(_Strict):
    """One disk of a new VM: a new volume of size_bytes (in `pool`), or an existing volume."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    size_bytes: SizeBytes | None = None
    volume: VolumeKey | None = None  # an existing volume
    pool: Annotated[str | None, Field(json_schema_extra={"pattern": NAME_PATTERN})] = None
    format: DiskFormat = "qcow2"
    prealloc: Prealloc = "off"
    iops_total: Iops | None = None
    bps_total: Bps | None = None

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "pool")

    @model_validator(mode="after")
    def _one_source(self) -> DiskRequest:
        if (self.size_bytes is None) == (self.volume is None):
            raise ValueError("give either size_bytes (a new volume) or volume (an existing one)")
        if self.volume is not None and self.pool is not None:
            raise ValueError("pool is only for a new volume; an existing one is named POOL/NAME")
        return self


class AttachDisk(_Strict):
    """Body of POST /v1/vms/{name}/disks: attach an existing volume (live when the VM runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    volume: VolumeKey
    readonly: bool = False


class ChangeMedia(_Strict):
    """Body of POST /v1/vms/{name}/media: insert a medium (a volume or a file), or eject with source null."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    drive: Annotated[str, Field(pattern=CDROM_NAME_PATTERN)] = "cd0"
    source: Annotated[str | None, Field(max_length=4096, description="POOL/NAME or an absolute path; null ejects")] = (
        None
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return _check_volume_key(v) if "/" in v else check_name(v, "image")


class CreateVm(_Strict):
    """Request body of POST /v1/vms. Strict: `true` is not a vCPU count, "512" is not a size."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # The patterns only document the validators below (which give the clearer messages) in the OpenAPI document.
    name: Annotated[str, Field(description="VM name", json_schema_extra={"pattern": NAME_PATTERN})]
    memory_mib: Annotated[int, Field(ge=MEMORY_MIB_MIN, le=MEMORY_MIB_MAX)] = 512
    vcpus: Annotated[int, Field(ge=1, le=VCPUS_MAX)] = 1
    image: Annotated[
        str | None,
        Field(
            description="an image name (demo) or POOL/NAME of a disk image",
            json_schema_extra={"pattern": IMAGE_REF_PATTERN},
        ),
    ] = None
    kernel: AbsPath | None = None
    initrd: AbsPath | None = None
    cmdline: Annotated[str | None, Field(max_length=4096, json_schema_extra={"pattern": r"^[^\x00\n]*$"})] = None
    disk_size_bytes: Annotated[int | None, Field(gt=0, le=64 * 1024**4)] = None
    # Install media: POOL/NAME of an ISO volume, or an install-media image's name; read-only, booted first.
    iso: Annotated[str | None, Field(max_length=200, json_schema_extra={"pattern": IMAGE_REF_PATTERN})] = None
    # With image POOL/NAME: an overlay on it (linked, the default) or a full copy.
    image_copy: bool = False
    # The pool new disks go to (the image's disk, and sized disks without their own pool): `default` if None.
    pool: Annotated[str | None, Field(json_schema_extra={"pattern": NAME_PATTERN})] = None
    disks: Annotated[list[DiskRequest], Field(max_length=MAX_DISKS)] = Field(default_factory=list)
    # NICs; none given (and nic true): one on the `default` network when it exists, else user networking.
    networks: Annotated[list[NicRequest], Field(max_length=MAX_NICS)] = Field(default_factory=list)
    nic: bool = True
    autostart: bool = False
    cpu_weight: CpuWeight | None = None
    cpu_max_percent: CpuMaxPercent | None = None
    memory_max_mib: MemoryMaxMib | None = None
    disk_iops_total: Iops | None = None
    disk_bps_total: Bps | None = None
    # A cloud-init NoCloud seed made for the VM: a volume in pool `default`, attached read-only as its last disk.
    cloud_init: CloudInitRequest | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "pool")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        # An image's name (demo), or POOL/NAME of a disk image volume.
        if v is None:
            return v
        return _check_volume_key(v) if "/" in v else check_name(v, "image")

    @field_validator("iso")
    @classmethod
    def _iso(cls, v: str | None) -> str | None:
        # POOL/NAME of a volume, or the name of an install-media image (demo-installer). A file elsewhere on
        # the host is uploaded into a pool by the client first: the daemon never opens a path a client names.
        if v is None:
            return v
        return _check_volume_key(v) if "/" in v else check_name(v, "image")

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str | None) -> str | None:
        if v is not None and any(c in v for c in "\0\n"):
            raise ValueError("must be a single line")
        return v


class CloneVm(_Strict):
    """Body of POST /v1/vms/{name}/clone (virt-clone): a new VM with the source's devices, a new UUID, new MACs
    and new disks: full copies, or (linked) overlays on the source's current images, which become read-only
    bases of both VMs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, Field(description="the new VM's name", json_schema_extra={"pattern": NAME_PATTERN})]
    linked: bool = False
    memory_mib: Annotated[int | None, Field(ge=MEMORY_MIB_MIN, le=MEMORY_MIB_MAX)] = None
    vcpus: Annotated[int | None, Field(ge=1, le=VCPUS_MAX)] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)


class LiveIoLimits(BaseModel):
    iops: int | None = None
    bps: int | None = None
    group: str | None = None


class DiskInfo(BaseModel):
    """A drive as GET /v1/vms/{name}/disks shows it, like `virsh domblklist --details`."""

    name: str  # disk0, cd0, …: the QEMU node name
    device: Literal["disk", "cdrom"]
    path: str | None = None  # None: an empty CD-ROM tray
    volume: str | None = None
    format: str | None = None
    provisioning: str | None = None
    backing: str | None = None  # the image below (POOL/NAME, else its path)
    readonly: bool = False
    owned: bool = False
    iops_total: int | None = None
    bps_total: int | None = None
    live: LiveIoLimits | None = None
    cloud_init: bool = False  # the VM's cloud-init seed (vmkit vm cloud-init NAME)


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
    cdroms: list[CdromSpec] = Field(default_factory=list)
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
    cloud_init: CloudInitSummary | None = None  # its seed's user and SSH keys (vm ssh logs in with them)
