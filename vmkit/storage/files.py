"""File-level helpers of directory pools: naming files safely, detecting formats, copying and preallocating.

Nothing here runs qemu-img. A pool is a directory and a volume is a regular file directly in it, named by its
volume name; every path handed out comes from resolve() or temp_path(), so a name can never reach outside the
pool's directory (libvirt's CVE-2015-5313 was a volume name with "../" in it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from vmkit.errors import NoSpace, VmkitError
from vmkit.model.names import check_name
from vmkit.storage.savefile import MAGIC as SAVE_MAGIC

QCOW2_MAGIC = b"QFI\xfb"
ISO_MAGIC = b"CD001"
ISO_MAGIC_OFFSET = 0x8001  # ISO 9660: the first volume descriptor is at sector 16 (2 KiB sectors), its id at byte 1
TEMP_PREFIX = ".vmkit-tmp."
_CHUNK = 64 * 1024**2  # one copy call's length: bounds how long progress goes unreported
_ZEROS = bytes(1024**2)
_RW_BUFFER = 8 * 1024**2  # pread/pwrite fallback only


class PathEscape(VmkitError):
    """A volume name that is not a plain file name in its pool, or names something that is not a regular file."""

    status = 400


def resolve(pool_dir: Path, name: str) -> Path:
    """The path of volume `name` in the pool at pool_dir, after checking it cannot lead anywhere else.

    The name must follow the naming rule (so no "/", no leading "." and thus no "." or ".."); the pool directory
    is taken by its real path; an existing entry must be a regular file, not a symbolic link (even one pointing
    inside the pool: links are never followed, so what a volume is cannot change behind vmkit's back). The path
    may not exist yet. A link made after this check is still refused by the O_NOFOLLOW opens below; other
    callers that open the path should use O_NOFOLLOW too.
    """
    try:
        check_name(name, "volume")
    except ValueError as e:
        raise PathEscape(str(e)) from None
    root = os.path.realpath(pool_dir)
    path = os.path.join(root, name)
    # Cannot differ while the naming rule excludes "/": kept so that loosening the rule cannot open an escape.
    if os.path.realpath(os.path.dirname(path)) != root:
        raise PathEscape(f"volume {name!r} would be outside its pool directory {root}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Path(path)
    if stat.S_ISLNK(st.st_mode):
        raise PathEscape(f"{path} is a symbolic link: a volume must be a regular file in its pool's directory")
    if not stat.S_ISREG(st.st_mode):
        raise PathEscape(f"{path} is not a regular file")
    return Path(path)


def temp_path(pool_dir: Path, name: str) -> Path:
    """A fresh hidden path in the pool's directory to build volume `name` in before renaming it into place.

    Same directory, so the final rename is atomic; the leading "." keeps it from ever being a volume name (a
    refresh of the pool skips it, see is_temp) and the random part keeps two builds of one name apart.
    """
    try:
        check_name(name, "volume")
    except ValueError as e:
        raise PathEscape(str(e)) from None
    return Path(os.path.realpath(pool_dir)) / f"{TEMP_PREFIX}{name}.{secrets.token_hex(8)}"


def is_temp(name: str) -> bool:
    """Whether a file name in a pool directory is one of temp_path's (left over if vmkit died mid-build)."""
    return name.startswith(TEMP_PREFIX)


def detect_format(path: Path) -> str:
    """ "qcow2", "iso", "save" (a VM's saved state, storage/savefile.py) or "raw", from the file's magic bytes.

    Call this ONCE, when a file becomes a volume (creation, import, adoption by a pool refresh), and record the
    result. Never probe again later: a guest writing to a raw disk can put a qcow2 header at its start, and an
    image re-probed as qcow2 would let the guest name any host file as its backing file (the classic format
    probing hole). So a raw volume stays raw whatever its first bytes become.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.pread(fd, len(QCOW2_MAGIC), 0) == QCOW2_MAGIC:
            return "qcow2"
        if os.pread(fd, len(ISO_MAGIC), ISO_MAGIC_OFFSET) == ISO_MAGIC:
            return "iso"
        if os.pread(fd, len(SAVE_MAGIC), 0) == SAVE_MAGIC:
            return "save"
        return "raw"
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    """Bytes the file takes on its filesystem (st_blocks is in 512-byte units whatever the block size)."""
    return os.stat(path).st_blocks * 512


def fs_space(path: Path) -> tuple[int, int]:
    """(capacity, available) in bytes of the filesystem holding path; available is what an unprivileged
    writer may still use (f_bavail), as df shows."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _no_space(path: Path | str, e: OSError) -> NoSpace:
    return NoSpace(f"no space left on the filesystem holding {path}: {e.strerror}")


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of fd below size that hold data, by SEEK_DATA/SEEK_HOLE.

    Read lazily, so each range is as the file is when it is reached. Filesystems without hole support report
    the whole file as one data range (the kernel's generic lseek does that), so this is never wrong, only
    less sparse. On ext4 and XFS, preallocated but unwritten extents count as holes: they read as zeros.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from pos to the end
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _hole_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The complement of _data_ranges below size."""
    pos = 0
    for start, end in _data_ranges(fd, size):
        if start > pos:
            yield pos, start
        pos = end
    if pos < size:
        yield pos, size


class _Copier:
    """Copies byte ranges at the same offset from one fd to another with the fastest call that works.

    copy_file_range keeps the data in the kernel (and reflinks on filesystems that can); where it is refused
    (old kernels across filesystems, some special filesystems) sendfile still avoids the copy to user space;
    plain pread/pwrite is the last resort. A method, once refused, is not tried again for this copy.
    """

    _FALLBACK = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.method = "copy_file_range"

    def copy(self, offset: int, count: int) -> int:
        """Copy up to count bytes at offset; the number copied, 0 only at the source's end."""
        while True:
            try:
                if self.method == "copy_file_range":
                    n = os.copy_file_range(self.src, self.dst, count, offset, offset)
                elif self.method == "sendfile":
                    os.lseek(self.dst, offset, os.SEEK_SET)  # sendfile writes at dst's file position
                    n = os.sendfile(self.dst, self.src, offset, count)
                else:
                    data = os.pread(self.src, min(count, _RW_BUFFER), offset)
                    n = 0
                    while n < len(data):
                        n += os.pwrite(self.dst, data[n:], offset + n)
                    return n
            except OSError as e:
                if e.errno not in self._FALLBACK or self.method == "readwrite":
                    raise
                self._downgrade()
                continue
            if n == 0:
                # Either the source really ended early (it shrank under us) or this method copies nothing on
                # this filesystem (procfs-like files): the plain read, which returns 0 only at the end, tells.
                self._downgrade()
                continue
            return n

    def _downgrade(self) -> None:
        self.method = "sendfile" if self.method == "copy_file_range" else "readwrite"


def copy_file(
    src: Path,
    dst: Path,
    *,
    progress: Callable[[float], None] | None = None,
    sparse: bool = True,
    durable: bool = True,
) -> None:
    """Copy src to the new file dst, byte for byte.

    sparse=True copies only src's data ranges and leaves its holes holes (dst takes about the blocks src does);
    sparse=False writes every byte, holes as zeros, so dst is fully allocated. dst is created here (O_EXCL, mode
    0600, never through a symbolic link), so on any failure it is removed again: a failed copy leaves nothing.
    durable=True fsyncs dst before returning, so a rename that follows cannot survive a crash without the data.
    progress(fraction) is called as the copy advances through the file, last with 1.0. ENOSPC → NoSpace.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(sfd)
        raise
    try:
        size = os.fstat(sfd).st_size
        os.ftruncate(dfd, size)  # dst's length first: a hole at src's end stays a hole
        copier = _Copier(sfd, dfd)
        ranges = _data_ranges(sfd, size) if sparse else iter([(0, size)])
        for start, end in ranges:
            offset = start
            while offset < end:
                n = copier.copy(offset, min(_CHUNK, end - offset))
                if n == 0:  # src shrank while being copied: dst keeps src's first length, zeros past its end
                    break
                offset += n
                if progress is not None:
                    progress(offset / size)
        if durable:
            os.fsync(dfd)
        if progress is not None:
            progress(1.0)
    except BaseException as e:
        os.close(dfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise _no_space(dst, e) from e
        raise
    else:
        os.close(dfd)
    finally:
        os.close(sfd)


def write_all(fd: int, data: bytes, path: Path) -> None:
    """Write all of data to fd (open on path); ENOSPC → NoSpace."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(path, e) from e
        raise


def preallocate(path: Path, mode: str) -> None:
    """Reserve the blocks of a raw file (not qcow2: its allocation is qemu-img's business).

    "falloc" reserves every block with posix_fallocate (fast: unwritten extents, read as zeros); "full" writes
    zeros into every range that holds no data, so even filesystems that cannot reserve end up allocated; data
    already in the file is left alone. "off" does nothing. ENOSPC → NoSpace.
    """
    if mode == "off":
        return
    if mode not in ("falloc", "full"):
        raise ValueError(f"preallocation {mode!r} does not apply to a plain file: use off, falloc or full")
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        if mode == "falloc":
            os.posix_fallocate(fd, 0, size)
            return
        for start, end in list(_hole_ranges(fd, size)):  # listed first: the writes below turn holes into data
            offset = start
            while offset < end:
                offset += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - offset)], offset)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(path, e) from e
        raise
    finally:
        os.close(fd)
