"""Pure data types for storage: pools (directories holding image files) and volumes (the files in them).

A volume's name is its file name inside its pool's directory, so what a user drops into a pool directory
shows up under its own name after `pool refresh` (libvirt's dir pools work the same way). A volume is
written `POOL/NAME` wherever one string names it.

Every volume's format is decided once (at creation, import or adoption) and recorded; from then on it is
always passed explicitly to QEMU and qemu-img, never probed again.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from vmkit.model.names import ABS_PATH_PATTERN, NAME_PATTERN, check_abs_path, check_name

# What a volume holds. "iso" is a read-only install medium (QEMU reads it as raw); kernels and initrds
# of images are "raw" files like any other. "save" is a VM's saved RAM and device state (vmkit vm save,
# storage/savefile.py): only a restore reads it, never a disk or a CD-ROM drive.
VolumeFormat = Literal["raw", "qcow2", "iso", "save"]
DiskFormat = Literal["raw", "qcow2"]
# qemu-img's preallocation modes. off/metadata allocate data on first write (thin); falloc/full reserve
# every byte now (thick). raw + metadata does not exist.
Prealloc = Literal["off", "metadata", "falloc", "full"]
Provisioning = Literal["thin", "thick"]

VOLUME_SIZE_MAX = 64 * 1024**4  # 64 TiB: far beyond what a directory pool here holds, but bounded
DEFAULT_POOL = "default"  # VMs' disks
IMAGES_POOL = "images"  # images VMs are made from (the demo guest's files)


def provisioning(fmt: str, prealloc: str) -> Provisioning:
    return "thick" if prealloc in ("falloc", "full") else "thin"


def split_volume(key: str) -> tuple[str, str]:
    """'POOL/NAME' → (pool, name), both checked against the name rule; ValueError for people otherwise."""
    pool, sep, name = key.partition("/")
    if not sep:
        raise ValueError(f"invalid volume {key!r}: write it POOL/NAME")
    return check_name(pool, "pool"), check_name(name, "volume")


def _strict() -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True, strict=True)


VOLUME_KEY_PATTERN = NAME_PATTERN.removesuffix("$") + "/" + NAME_PATTERN.removeprefix("^")


def _volume_key(v: str) -> str:
    split_volume(v)
    return v


# POOL/NAME in a request body: stated in the OpenAPI document, checked with split_volume's message.
VolumeKey = Annotated[
    str, Field(description="POOL/NAME", json_schema_extra={"pattern": VOLUME_KEY_PATTERN}), AfterValidator(_volume_key)
]
AbsPath = Annotated[
    str, Field(max_length=4096, json_schema_extra={"pattern": ABS_PATH_PATTERN}), AfterValidator(check_abs_path)
]
# An image's name (demo) or a volume's POOL/NAME: what --image and --iso take.
IMAGE_REF_PATTERN = NAME_PATTERN.removesuffix("$") + "(/" + NAME_PATTERN.removeprefix("^").removesuffix("$") + ")?$"

SizeBytes = Annotated[int, Field(gt=0, le=VOLUME_SIZE_MAX, description="bytes")]


class PoolSpec(BaseModel):
    """A pool as stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["dir"] = "dir"
    path: str


class CreatePool(BaseModel):
    """Body of POST /v1/pools."""

    model_config = _strict()
    name: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    kind: Literal["dir"] = "dir"
    path: AbsPath

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "pool")


class PoolInfo(BaseModel):
    name: str
    kind: str
    path: str
    active: bool  # its directory is there
    capacity_bytes: int | None = None
    allocation_bytes: int | None = None  # what its volumes take on disk
    available_bytes: int | None = None
    volumes: int = 0


class CreateVolume(BaseModel):
    """Body of POST /v1/pools/{pool}/volumes."""

    model_config = _strict()
    name: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    size_bytes: SizeBytes
    format: DiskFormat = "qcow2"
    prealloc: Prealloc = "off"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "volume")


class ResizeVolume(BaseModel):
    model_config = _strict()
    size_bytes: SizeBytes
    allow_shrink: bool = False


class ConvertVolume(BaseModel):
    """Rewrite a volume in another format and/or provisioning, in place (under the same name)."""

    model_config = _strict()
    format: DiskFormat
    prealloc: Prealloc = "off"


class CloneVolume(BaseModel):
    """Body of POST /v1/pools/{pool}/volumes/{name}/clone."""

    model_config = _strict()
    target: VolumeKey  # the new volume
    linked: bool = False


class ImportVolume(BaseModel):
    """Body of POST /v1/pools/{pool}/volumes/{name}/import: copy a file of the daemon's host (local callers
    only: the UNIX socket's users may reach every file anyway, as libvirt's group may; TCP callers upload)."""

    model_config = _strict()
    path: AbsPath


class BackingInfo(BaseModel):
    """One image of a volume's backing chain, like one entry of `qemu-img info --backing-chain`."""

    path: str
    format: str
    volume: str | None = None  # POOL/NAME when the image is a vmkit volume
    capacity_bytes: int | None = None
    allocation_bytes: int | None = None


class VolumeInfo(BaseModel):
    pool: str
    name: str
    key: str  # POOL/NAME
    path: str
    format: VolumeFormat
    prealloc: str
    provisioning: Provisioning
    capacity_bytes: int  # virtual size
    allocation_bytes: int  # blocks actually allocated on the host
    backing: str | None = None  # POOL/NAME of the volume this one is an overlay on
    used_by: list[str] = Field(default_factory=list)  # VM names
    chain: list[BackingInfo] | None = None  # with ?chain=true: every image below this one, nearest first
