"""Pure data types for storage: pools (directories holding image files) and volumes (the files in them).

A volume's name is its file name inside its pool's directory, so what a user drops into a pool directory
shows up under its own name after `pool refresh` (libvirt's dir pools work the same way). A volume is
written `POOL/NAME` wherever one string names it.

Every volume's format is decided once (at creation, import or adoption) and recorded; from then on it is
always passed explicitly to QEMU and qemu-img, never probed again.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from vmkit.model.names import ABS_PATH_PATTERN, HOST_PATTERN, NAME_PATTERN, check_abs_path, check_name, valid_host

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


PoolKind = Literal["dir", "nfs", "iscsi"]
SHARED_KINDS = ("nfs", "iscsi")  # pools several hosts may define: their volumes live on a server
ISCSI_PORT = 3260
ID_MAX = 2**32 - 2  # a uid/gid (2**32 - 1 is "no id")

# An NFS export path: absolute, plain characters only (it goes into URLs and QEMU's options), no "..".
EXPORT_PATTERN = r"^(/[A-Za-z0-9._+-]+)+/?$|^/$"
# HOST[:PORT] of an iSCSI portal; IPv6 in brackets.
PORTAL_PATTERN = r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$"
# An iSCSI qualified name (RFC 3720): iqn.YYYY-MM.reversed.domain[:suffix], or eui. + 16 hex digits. The suffix
# is the naming authority's own (RFC 3720 allows a-z 0-9 - . : ; many vendors use A-Z and _ too).
IQN_PATTERN = (
    r"^(iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"(:[A-Za-z0-9.:_-]+)?|eui\.[0-9A-Fa-f]{16})$"
)
_EXPORT_RE, _PORTAL_RE, _IQN_RE = re.compile(EXPORT_PATTERN), re.compile(PORTAL_PATTERN), re.compile(IQN_PATTERN)


def check_export(v: str) -> str:
    if len(v) > 1024 or not _EXPORT_RE.fullmatch(v) or "/../" in v + "/" or "/./" in v + "/":
        raise ValueError(f"invalid NFS export {v!r}: an absolute path of letters, digits and . _ + -, e.g. /srv/vmkit")
    return v.rstrip("/") or "/"


def check_iqn(v: str) -> str:
    """v if it is an iSCSI name, else ValueError for people (223 bytes at most: RFC 3720)."""
    if len(v.encode()) > 223 or not _IQN_RE.fullmatch(v):
        raise ValueError(
            f"invalid iSCSI name {v!r}: use iqn.YYYY-MM.reversed.domain[:suffix] (e.g. iqn.2026-01.org.example:disks) "
            "or eui. and 16 hex digits"
        )
    return v


def parse_portal(v: str) -> tuple[str, int]:
    """'HOST[:PORT]' → (host, port); IPv6 hosts in brackets. ValueError for people."""
    hint = f"invalid iSCSI portal {v!r}: write HOST or HOST:PORT (IPv6 in brackets)"
    if not _PORTAL_RE.fullmatch(v):
        raise ValueError(hint)
    if v.startswith("["):
        host, _, tail = v[1:].partition("]")
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(hint) from None
        port = tail.removeprefix(":") or str(ISCSI_PORT)
    else:
        host, _, port = v.partition(":")
        port = port or str(ISCSI_PORT)
        if not valid_host(host):
            raise ValueError(hint)
    if not 0 < int(port) < 65536:
        raise ValueError(hint)
    return host, int(port)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def nfs_location(server: str, export: str, uid: int, gid: int) -> str:
    return f"nfs://{_bracket(server)}{export}?uid={uid}&gid={gid}"


def iscsi_location(host: str, port: int, iqn: str) -> str:
    return f"iscsi://{_bracket(host)}:{port}/{iqn}"


class PoolSpec(BaseModel):
    """A pool as stored. path is where its volumes are: a directory (dir), or for a shared pool its URL
    (nfs://SERVER/EXPORT?uid=U&gid=G, iscsi://HOST:PORT/IQN), the same string on every host that defines it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: PoolKind = "dir"
    path: str

    @property
    def shared(self) -> bool:
        return self.kind in SHARED_KINDS


class CreatePool(BaseModel):
    """Body of POST /v1/pools. dir: path. nfs: server, export (and the uid/gid vmkit claims on it: AUTH_SYS).
    iscsi: portal, target."""

    model_config = _strict()
    name: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    kind: PoolKind = "dir"
    path: AbsPath | None = None
    server: Annotated[str | None, Field(max_length=253, json_schema_extra={"pattern": HOST_PATTERN})] = None
    export: Annotated[str | None, Field(max_length=1024, json_schema_extra={"pattern": EXPORT_PATTERN})] = None
    uid: Annotated[int, Field(ge=0, le=ID_MAX)] = 0
    gid: Annotated[int, Field(ge=0, le=ID_MAX)] = 0
    portal: Annotated[str | None, Field(max_length=300, json_schema_extra={"pattern": PORTAL_PATTERN})] = None
    target: Annotated[str | None, Field(max_length=223, json_schema_extra={"pattern": IQN_PATTERN})] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "pool")

    @field_validator("server")
    @classmethod
    def _server(cls, v: str | None) -> str | None:
        if v is not None and not valid_host(v.strip("[]")):
            raise ValueError(f"invalid server {v!r}: an IP address or a DNS name")
        return v if v is None else v.strip("[]")

    @field_validator("export")
    @classmethod
    def _export(cls, v: str | None) -> str | None:
        return v if v is None else check_export(v)

    @field_validator("portal")
    @classmethod
    def _portal(cls, v: str | None) -> str | None:
        if v is not None:
            parse_portal(v)
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str | None) -> str | None:
        return v if v is None else check_iqn(v)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> CreatePool:
        need = {"dir": ("path",), "nfs": ("server", "export"), "iscsi": ("portal", "target")}[self.kind]
        for name in ("path", "server", "export", "portal", "target"):
            given = getattr(self, name) is not None
            if given != (name in need):
                what = "needs" if not given else "does not take"
                raise ValueError(f"a {self.kind} pool {what} {name} (it takes {', '.join(need)})")
        if self.kind != "nfs" and (self.uid or self.gid):
            raise ValueError("uid and gid are for nfs pools")
        return self

    def location(self) -> str:
        """What PoolSpec.path holds for this pool (a shared pool's URL is built here, from checked parts)."""
        if self.kind == "nfs":
            assert self.server is not None and self.export is not None
            return nfs_location(self.server, self.export, self.uid, self.gid)
        if self.kind == "iscsi":
            assert self.portal is not None and self.target is not None
            return iscsi_location(*parse_portal(self.portal), self.target)
        assert self.path is not None
        return self.path


class PoolInfo(BaseModel):
    name: str
    kind: str
    path: str  # a directory, or a shared pool's URL
    shared: bool = False  # other hosts may define it too (nfs, iscsi): migrations leave its volumes where they are
    active: bool  # its directory is there; a shared pool's server answered
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
