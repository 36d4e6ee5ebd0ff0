"""NFS shares through libnfs (a ctypes binding; no kernel NFS client, no mount on the host).

QEMU 7.2 opens NFS disks with its own userspace libnfs driver, which speaks NFSv3 only; vmkit uses the same
library (libnfs 4.0, Debian 12) to list, stat, rename and delete the files of an export, so what vmkit sees
is exactly what QEMU will open. Paths given to libnfs are relative to the mounted export ("/NAME").

libnfs's synchronous calls wait without an overall limit: its own timeout (nfs_set_timeout) applies per RPC
and not to TCP connects, and a lost connection is retried forever by default. So every call here is the
asynchronous one, driven by a poll loop of ours with one deadline per call: a hung or unreachable server
costs at most timeout_s per call and never blocks a daemon worker thread forever. The calls block (they
release the GIL while in C); the daemon runs them in a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import select
import socket
import stat as statmod
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vmkit.errors import VmkitError

LIBNFS = "libnfs.so.13"  # libnfs 4.0 (Debian 12), the one qemu-block-extra's NFS driver links


class NfsError(VmkitError):
    """The NFS server could not be reached or refused an operation (a bad gateway from the API's view)."""

    status = 502


@dataclass(frozen=True)
class NfsShare:
    server: str  # host name or IP
    export: str  # absolute export path, e.g. /vmkit
    uid: int = 0  # AUTH_SYS credentials vmkit presents for the files it makes and reads
    gid: int = 0

    def __post_init__(self) -> None:
        if not self.server or any(c in self.server for c in "/?#@\0 ") or self.server.startswith("["):
            raise ValueError(f"invalid NFS server {self.server!r}: give a host name or an IP address")
        if not self.export.startswith("/") or "\0" in self.export or "?" in self.export or "#" in self.export:
            raise ValueError(f"invalid NFS export {self.export!r}: must be an absolute path")
        for what, v in (("uid", self.uid), ("gid", self.gid)):
            if not 0 <= v < 2**31:  # libnfs takes an int
                raise ValueError(f"invalid NFS {what} {v}")

    @property
    def label(self) -> str:
        """SERVER:EXPORT, as people write an NFS share (and as the errors name it)."""
        return f"{self.server}:{self.export}"

    def url(self, name: str) -> str:
        """The nfs:// URL of file `name` in the export, for qemu-img and QEMU (which unescape the path)."""
        check_file_name(name)
        host = f"[{self.server}]" if ":" in self.server else self.server
        path = urllib.parse.quote(f"{self.export.rstrip('/')}/{name}", safe="/")
        return f"nfs://{host}{path}?uid={self.uid}&gid={self.gid}"


@dataclass(frozen=True)
class NfsFile:
    name: str
    size_bytes: int
    allocated_bytes: int  # NFSv3's "used": what the file takes on the server's disk
    is_file: bool  # a regular file (not a directory, symlink, …)


def check_file_name(name: str) -> str:
    """name if it is a plain file name in the export's top directory, else ValueError: it must never lead elsewhere."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid file name {name!r}: a plain name is needed (no '/', not '.' or '..')")
    return name


class _Stat64(ctypes.Structure):
    """struct nfs_stat_64 of libnfs 4.0: all uint64_t."""

    _fields_ = [
        (n, ctypes.c_uint64)
        for n in ("dev", "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks")
        + ("atime", "mtime", "ctime", "atime_nsec", "mtime_nsec", "ctime_nsec", "used")
    ]


class _Statvfs64(ctypes.Structure):
    """struct nfs_statvfs_64 of libnfs 4.0: all uint64_t."""

    _fields_ = [
        (n, ctypes.c_uint64)
        for n in ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail", "fsid", "flag", "namemax")
    ]


class _Dirent(ctypes.Structure):
    """Only the first fields of struct nfsdirent: the rest of its layout is not relied on."""

    _fields_ = [("next", ctypes.c_void_p), ("name", ctypes.c_char_p)]


# void (*nfs_cb)(int err, struct nfs_context *nfs, void *data, void *private_data)
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _libnfs() -> ctypes.CDLL:
    """libnfs, loaded once with the prototypes used here (ctypes would otherwise truncate pointers to int)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(LIBNFS)
            except OSError as e:
                raise NfsError(f"libnfs is not installed ({e}): install the package libnfs13") from e
            p, i, s, cb = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, _CALLBACK
            protos: dict[str, tuple[Any, list[Any]]] = {
                "nfs_init_context": (p, []),
                "nfs_destroy_context": (None, [p]),
                "nfs_get_error": (s, [p]),
                "nfs_set_uid": (None, [p, i]),
                "nfs_set_gid": (None, [p, i]),
                "nfs_set_autoreconnect": (None, [p, i]),
                "nfs_set_dircache": (None, [p, i]),
                "nfs_get_fd": (i, [p]),
                "nfs_which_events": (i, [p]),
                "nfs_service": (i, [p, i]),
                "nfs_mount_async": (i, [p, s, s, cb, p]),
                "nfs_lstat64_async": (i, [p, s, cb, p]),
                "nfs_opendir_async": (i, [p, s, cb, p]),
                "nfs_readdir": (ctypes.POINTER(_Dirent), [p, p]),
                "nfs_closedir": (None, [p, p]),
                "nfs_unlink_async": (i, [p, s, cb, p]),
                "nfs_rename_async": (i, [p, s, s, cb, p]),
                "nfs_statvfs64_async": (i, [p, s, cb, p]),
                "nfs_open_async": (i, [p, s, i, cb, p]),
                "nfs_pread_async": (i, [p, p, ctypes.c_uint64, ctypes.c_uint64, cb, p]),
                "nfs_close_async": (i, [p, p, cb, p]),
            }
            for name, (restype, argtypes) in protos.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            _lib = lib
        return _lib


def _path(name: str) -> bytes:
    return ("/" + check_file_name(name)).encode()


class Session:
    """One mounted NFS context. Not thread-safe: one thread at a time (libnfs contexts are not)."""

    def __init__(self, share: NfsShare, timeout_s: float) -> None:
        self.share = share
        self.timeout_s = timeout_s
        self._lib = _libnfs()
        self._ids = itertools.count(1)
        # call id -> converts (status, data) to the result: data is only valid during the callback, so it is copied
        self._pending: dict[int, Callable[[int, int], Any]] = {}
        self._done: dict[int, tuple[int, Any]] = {}  # call id -> (status, converted data or error text)
        self._callback = _CALLBACK(self._on_reply)  # kept here: libnfs holds it until the context is destroyed
        self._broken = False
        ctx = self._lib.nfs_init_context()
        if not ctx:
            raise NfsError(f"NFS {share.label}: cannot make a libnfs context")
        self._ctx: int = ctx
        self._lib.nfs_set_autoreconnect(ctx, 0)  # a dropped connection is an error now, not retried forever
        self._lib.nfs_set_dircache(ctx, 0)  # always list what is on the server, not a cached directory
        self._lib.nfs_set_uid(ctx, share.uid)
        self._lib.nfs_set_gid(ctx, share.gid)

    def close(self) -> None:
        if self._ctx:
            self._lib.nfs_destroy_context(self._ctx)  # frees; pending calls get their callbacks (ignored)
            self._ctx = 0

    def _on_reply(self, status: int, _nfs: int | None, data: int | None, private: int | None) -> None:
        convert = self._pending.pop(private or 0, None)
        if convert is None:
            return  # a call we gave up on (its deadline passed) or cancelled by nfs_destroy_context
        if status < 0:  # data is libnfs's error text
            self._done[private or 0] = (status, ctypes.string_at(data).decode(errors="replace") if data else "")
        else:
            self._done[private or 0] = (status, convert(status, data or 0))

    def _call(
        self,
        what: str,
        start: Callable[..., int],
        *args: Any,
        convert: Callable[[int, int], Any] = lambda status, _data: status,
        missing_ok: bool = False,
    ) -> Any:
        """Start an asynchronous libnfs call and service the context until it answers or the deadline passes.

        Returns the converted data (None for a missing file with missing_ok), else raises NfsError naming
        `what` and libnfs's error text."""
        if self._broken:
            raise NfsError(f"NFS {self.share.label}: cannot {what}: the connection failed earlier in this session")
        call_id = next(self._ids)
        self._pending[call_id] = convert
        if start(self._ctx, *args, self._callback, call_id) != 0:
            self._pending.pop(call_id, None)
            raise self._error(what, self._lib.nfs_get_error(self._ctx))
        deadline = time.monotonic() + self.timeout_s
        sock_errno = 0  # the socket's error, when the last poll reported one
        while call_id not in self._done:
            left = deadline - time.monotonic()
            if left <= 0:
                self._pending.pop(call_id, None)
                self._broken = True  # its answer may still arrive: the context is not reusable
                raise self._error(what, f"no answer within {self.timeout_s:g} s")
            fd = self._lib.nfs_get_fd(self._ctx)
            revents = sock_errno = 0
            if fd >= 0:
                poller = select.poll()
                poller.register(fd, self._lib.nfs_which_events(self._ctx))
                # Short waits: libnfs checks its own RPC timeouts in nfs_service, even without events.
                ready = poller.poll(min(left, 0.1) * 1000)
                revents = ready[0][1] if ready else 0
                if revents & select.POLLERR:
                    # Read here: libnfs reports a refused connection only as "Socket failed with POLLHUP".
                    sock_errno = _socket_errno(fd)
            else:  # between connections (libnfs connects to portmapper, mountd, then nfsd)
                time.sleep(min(left, 0.01))
            if self._lib.nfs_service(self._ctx, revents) < 0 and call_id not in self._done:
                self._pending.pop(call_id, None)
                self._broken = True
                raise self._error(what, _socket_error(sock_errno) or self._lib.nfs_get_error(self._ctx))
        status, data = self._done.pop(call_id)
        if status == -errno.ENOENT and missing_ok:
            return None
        if status < 0:
            raise self._error(what, _socket_error(sock_errno) or data)
        return data

    def _error(self, what: str, detail: bytes | str | None) -> NfsError:
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else (detail or "unknown error")
        return NfsError(f"NFS {self.share.label}: cannot {what}: {text}")

    def mount(self) -> None:
        self._call(
            "mount the export", self._lib.nfs_mount_async, self.share.server.encode(), self.share.export.encode()
        )

    def stat(self, name: str) -> NfsFile | None:
        """The file `name` (not following a symlink), or None when there is none."""
        st: _Stat64 | None = self._call(
            f"stat {name}", self._lib.nfs_lstat64_async, _path(name), convert=_copy_stat, missing_ok=True
        )
        if st is None:
            return None
        return NfsFile(name, st.size, st.used, statmod.S_ISREG(st.mode))

    def listdir(self) -> list[NfsFile]:
        """The entries of the export's top directory, without . and .., sorted by name."""
        names: list[str] = self._call("list the export", self._lib.nfs_opendir_async, b"/", convert=self._read_dir)
        files = [self.stat(n) for n in sorted(names)]
        return [f for f in files if f is not None]  # one removed between the listing and its stat is gone

    def _read_dir(self, _status: int, nfsdir: int) -> list[str]:
        """The names in a directory libnfs has read whole (nfs_readdir does not block), then closes it."""
        names = []
        try:
            while ent := self._lib.nfs_readdir(self._ctx, nfsdir):
                name = ent.contents.name.decode(errors="surrogateescape")
                if name not in (".", ".."):
                    names.append(name)
        finally:
            self._lib.nfs_closedir(self._ctx, nfsdir)
        return names

    def unlink(self, name: str) -> None:
        """Delete file `name`; one already gone is fine."""
        self._call(f"delete {name}", self._lib.nfs_unlink_async, _path(name), missing_ok=True)

    def rename(self, old: str, new: str) -> None:
        self._call(f"rename {old} to {new}", self._lib.nfs_rename_async, _path(old), _path(new))

    def read(self, name: str, offset: int, count: int) -> bytes:
        """Up to count bytes of file `name` from offset (fewer only at its end); NfsError when it is missing."""
        fh: int = self._call(f"open {name}", self._lib.nfs_open_async, _path(name), os.O_RDONLY, convert=_pointer)
        out = bytearray()
        try:
            while len(out) < count:
                got: bytes = self._call(
                    f"read {name}", self._lib.nfs_pread_async, fh, offset + len(out), count - len(out), convert=_copy
                )
                if not got:
                    break  # end of file
                out += got
        finally:
            if not self._broken:  # else the context is destroyed with the handle
                self._call(f"close {name}", self._lib.nfs_close_async, fh)  # NFSv3: frees it, no RPC when not written
        return bytes(out)

    def space(self) -> tuple[int, int]:
        """(capacity_bytes, available_bytes) of the filesystem holding the export."""
        vfs: _Statvfs64 = self._call("read the free space", self._lib.nfs_statvfs64_async, b"/", convert=_copy_statvfs)
        return vfs.blocks * vfs.frsize, vfs.bavail * vfs.frsize


def _socket_errno(fd: int) -> int:
    """The pending error of libnfs's socket (SO_ERROR), read through a duplicate so its own fd stays open."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0


def _socket_error(number: int) -> str | None:
    return f"socket error: {os.strerror(number)}" if number else None


def _pointer(_status: int, data: int) -> int:
    return data


def _copy(status: int, data: int) -> bytes:
    """The bytes pread read: status is their count."""
    return ctypes.string_at(data, status) if status > 0 else b""


def _copy_stat(_status: int, data: int) -> _Stat64:
    return _Stat64.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(_Stat64)))


def _copy_statvfs(_status: int, data: int) -> _Statvfs64:
    return _Statvfs64.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(_Statvfs64)))


@contextmanager
def session(share: NfsShare, timeout_s: float = 10) -> Iterator[Session]:
    """A mounted session on the share (NFSv3, AUTH_SYS as share.uid/gid); each call in it waits at most timeout_s."""
    s = Session(share, timeout_s)
    try:
        s.mount()
        yield s
    finally:
        s.close()


def probe(share: NfsShare, timeout_s: float = 10) -> None:
    """Check that the export can be mounted, else NfsError saying whether the server or the export is the problem."""
    try:
        with session(share, timeout_s):
            pass
    except NfsError as e:
        raise NfsError(_explain(share, e.message)) from e


def _explain(share: NfsShare, message: str) -> str:
    """The mount error with its cause for people in place of "cannot mount the export"; libnfs's text stays."""
    low = message.lower()
    if "mnt3err" in low or "mount failed" in low:  # mountd answered: ganesha says MNT3ERR_ACCES for a missing export
        cause = f"export {share.export} not found or access denied"
    elif "no answer within" in low or "socket" in low or "connect" in low or "resolv" in low or "portmap" in low:
        cause = f"cannot reach NFS server {share.server}"
    else:
        return message
    return message.replace("cannot mount the export", cause, 1)
