"""Reading a qcow2 image's backing chain from its headers, without running qemu-img.

QEMU is handed every image of a chain as an open file descriptor with the chain spelled out (`backing=`),
so it never opens a backing file by the path written in a header (it could not: it runs unprivileged and
has no rights on vmkit's directories). Reading ~1 KiB of header per image keeps this off the start path's
budget, where a qemu-img call would cost ~20 ms.

An image's format must never be decided by its content: a raw image whose guest wrote a qcow2 header into
it would otherwise be taken for a qcow2 with a backing file of the guest's choosing (libvirt's
CVE-2010-2237). With `format_of`, every image below a qcow2 must be a volume vmkit knows, and its recorded
format is used; the header's backing format and probing are the fallback for images outside any pool only.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import VmkitError

MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
MAX_CHAIN = 64  # a loop or an absurd chain is refused rather than followed forever
# Incompatible feature bit 2: the guest data lives in an external file named in the header.
INCOMPAT_EXTERNAL_DATA = 1 << 2
HEADER_BYTES = 104  # a v3 header up to its incompatible-features field


class ImageError(VmkitError):
    status = 409


@dataclass(frozen=True)
class Backing:
    path: str
    format: str  # "qcow2" or "raw": as vmkit recorded it (format_of), else as in the header, else probed


@dataclass(frozen=True)
class Header:
    virtual_size: int
    incompatible: int  # incompatible feature bits
    backing_offset: int  # 0: no backing file


def parse_header(head: bytes) -> Header | None:
    """The fields vmkit reads from a qcow2 header's first 104 bytes; None when they are no qcow2 header."""
    if head[:4] != MAGIC or len(head) < 32:
        return None
    version = struct.unpack(">I", head[4:8])[0]
    incompatible = struct.unpack(">Q", head[72:80])[0] if version >= 3 and len(head) >= 80 else 0
    return Header(struct.unpack(">Q", head[24:32])[0], incompatible, struct.unpack(">Q", head[8:16])[0])


def _sizes(path: str | Path) -> tuple[int, int]:
    """(virtual size, incompatible feature bits) from a qcow2 header."""
    with open(path, "rb") as f:
        header = parse_header(f.read(HEADER_BYTES))
    if header is None:
        raise ImageError(f"{path} is not a qcow2 image")
    return header.virtual_size, header.incompatible


def virtual_size(path: str | Path, fmt: str) -> int:
    """The size the guest sees: a qcow2's from its header, a raw file's (or an ISO's) its length."""
    return _sizes(path)[0] if fmt == "qcow2" else os.stat(path).st_size


def has_external_data(path: str | Path) -> bool:
    """Whether a qcow2 keeps its data in another file named in its header (a path outside any pool)."""
    return bool(_sizes(path)[1] & INCOMPAT_EXTERNAL_DATA)


def _header(path: str) -> tuple[str | None, str | None]:
    """(backing file, backing format) named in a qcow2 header; (None, None) if it has no backing."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] != MAGIC:
        return None, None
    version, off, size = struct.unpack(">IQI", head[4:20])
    if not off:
        return None, None
    with open(path, "rb") as f:
        f.seek(off)
        backing = f.read(size).decode()
    fmt = None
    pos = 72 if version < 3 else struct.unpack(">I", head[100:104])[0]
    while pos + 8 <= len(head):
        ext, length = struct.unpack(">II", head[pos : pos + 8])
        if ext == EXT_END:
            break
        if ext == EXT_BACKING_FORMAT:
            fmt = head[pos + 8 : pos + 8 + length].decode()
        pos += 8 + (length + 7) // 8 * 8
    if not os.path.isabs(backing):
        backing = str(Path(path).parent / backing)
    return backing, fmt


def backing_chain(path: str, fmt: str, format_of: Callable[[str], str | None] | None = None) -> list[Backing]:
    """The images under `path`, nearest first. Raw images have no backing.

    format_of(realpath) is the format vmkit recorded for the volume at realpath, None if no pool holds it.
    When given, each backing image's format comes from it (never from a header or the image's content), an
    image outside every pool is refused, and each Backing's path is the resolved one that was checked."""
    chain: list[Backing] = []
    current, current_fmt = path, fmt
    while current_fmt == "qcow2":
        try:
            backing, bfmt = _header(current)
        except (OSError, UnicodeDecodeError, struct.error) as e:
            raise ImageError(f"cannot read the qcow2 header of {current}: {e}") from e
        if backing is None:
            break
        if backing.startswith(("json:", "nbd:", "nfs:", "iscsi:")) or not os.path.isfile(backing):
            raise ImageError(f"{current} is backed by {backing}, which is not a local file vmkit can open")
        if format_of is not None:
            backing = os.path.realpath(backing)
            recorded = format_of(backing)
            if recorded is None:
                raise ImageError(f"{current} is backed by {backing}, which is not a volume of any pool")
            bfmt = "raw" if recorded == "iso" else recorded
            if bfmt not in ("qcow2", "raw"):
                raise ImageError(f"{current} is backed by {backing}, a volume of format {recorded}")
        elif bfmt not in ("qcow2", "raw"):
            with open(backing, "rb") as f:
                bfmt = "qcow2" if f.read(4) == MAGIC else "raw"
        chain.append(Backing(backing, bfmt))
        if len(chain) > MAX_CHAIN:
            raise ImageError(f"the backing chain of {path} is longer than {MAX_CHAIN} (a loop?)")
        current, current_fmt = backing, bfmt
    return chain
