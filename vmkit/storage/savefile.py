"""The save file: a VM's RAM and device state (QEMU's migration stream) behind a header vmkit writes.

Layout (like libvirt's save images, whose header carries the domain XML):

    MAGIC (16 bytes) | JSON length (4 bytes, big-endian) | JSON | zeros up to a multiple of HEADER_ALIGN | stream

The header makes a save volume self-describing: which VM it belongs to (name and UUID), whether that VM was
running or paused, whether it is the VM's managed save, and the VM's spec at the time (a restore compares it with
the VM's spec now, since QEMU must rebuild the very same machine to load the stream). QEMU reads and writes the
stream through a descriptor vmkit opened and positioned just past the header; it never sees the header.

The magic also lets a pool refresh (storage/files.py detect_format) recognise a save file dropped into a pool.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal

MAGIC = b"VMKIT-SAVE-V1\n\0\0"
HEADER_ALIGN = 4096  # the stream starts on a page boundary
MAX_META_BYTES = 1024**2  # a spec is a few KiB; a bigger length means a damaged or foreign file
_LEN = struct.Struct(">I")

SavedState = Literal["running", "paused"]


class BadSaveFile(ValueError):
    """Not a vmkit save file, or a damaged header."""


@dataclass(frozen=True)
class SaveHeader:
    vm: str
    uuid: str
    state: SavedState  # what the VM was doing when saved; restore brings that back
    managed: bool  # the VM's managed save (vm stop --save), resumed and deleted by its next start
    saved_at: float
    spec: dict[str, Any]  # the VmSpec as JSON, when saved
    stream_offset: int = 0  # where QEMU's stream begins (set by decode; encode computes it)

    def meta(self) -> dict[str, Any]:
        return {"vm": self.vm, "uuid": self.uuid, "state": self.state, "managed": self.managed,
                "saved_at": self.saved_at, "spec": self.spec}  # fmt: skip


def encode(header: SaveHeader) -> bytes:
    """The header's bytes, padded so that the stream written after them starts on a HEADER_ALIGN boundary."""
    meta = json.dumps(header.meta(), separators=(",", ":")).encode()
    if len(meta) > MAX_META_BYTES:
        raise ValueError("save header too large")
    head = MAGIC + _LEN.pack(len(meta)) + meta
    return head + bytes(-len(head) % HEADER_ALIGN)


def decode(data: bytes) -> SaveHeader:
    """The header at the start of data (at least the whole header: read_header reads enough)."""
    if data[: len(MAGIC)] != MAGIC:
        raise BadSaveFile("not a vmkit save file")
    start = len(MAGIC) + _LEN.size
    if len(data) < start:
        raise BadSaveFile("truncated save header")
    (length,) = _LEN.unpack(data[len(MAGIC) : start])
    if length > MAX_META_BYTES or len(data) < start + length:
        raise BadSaveFile("damaged save header")
    try:
        meta = json.loads(data[start : start + length])
        state = meta["state"]
        if state not in ("running", "paused") or not isinstance(meta["spec"], dict):
            raise ValueError(state)
        offset = start + length + (-(start + length) % HEADER_ALIGN)
        return SaveHeader(
            vm=str(meta["vm"]),
            uuid=str(meta["uuid"]),
            state=state,
            managed=bool(meta["managed"]),
            saved_at=float(meta["saved_at"]),
            spec=meta["spec"],
            stream_offset=offset,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BadSaveFile(f"damaged save header ({type(e).__name__})") from None


def read_header(fd: int) -> SaveHeader:
    """The header of the save file open at fd (read with pread: the file offset is left alone)."""
    first = os.pread(fd, HEADER_ALIGN, 0)
    if first[: len(MAGIC)] != MAGIC:
        raise BadSaveFile("not a vmkit save file")
    if len(first) >= len(MAGIC) + _LEN.size:
        (length,) = _LEN.unpack(first[len(MAGIC) : len(MAGIC) + _LEN.size])
        need = len(MAGIC) + _LEN.size + min(length, MAX_META_BYTES)
        if need > len(first):
            first += os.pread(fd, need - len(first), len(first))
    header = decode(first)
    if os.fstat(fd).st_size <= header.stream_offset:
        raise BadSaveFile("the save file holds no VM state after its header")
    return header


def read_header_at(path: str | os.PathLike[str]) -> SaveHeader:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return read_header(fd)
    finally:
        os.close(fd)
