"""Opening everything a VM's QEMU needs, as file descriptors it inherits.

QEMU runs as its VM's unprivileged identity and has no rights on vmkit's directories (the state and run
dirs stay root-only): the daemon opens the sockets, the serial log, the kernel, the initrd and every image
of every disk's backing chain, and every CD-ROM medium, and QEMU receives the descriptors. Access follows
from what was opened: images below the VM's own disk, read-only disks and CD-ROM media are opened read-only,
so QEMU cannot write them even if it tried.

The VM's own writable images are also owned by its identity (mode 0600, in the root-only vm dir), the way
libvirt's DAC driver labels a domain's disks: a process of that identity can open them through QEMU's
descriptors (/proc/PID/fd/N checks the file's owner), one of another VM's identity cannot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator

from vmkit.model.vm import DiskSpec, VmSpec
from vmkit.qemu.argv import DiskFds, HandOver, RuntimePaths, is_network
from vmkit.storage.qcow2 import backing_chain
from vmkit.util.unixsock import listen_unix


def _readonly_fd(stack: contextlib.ExitStack, path: str) -> int:
    """A read-only descriptor for path that QEMU can reopen through /proc/self/fd/N.

    Reopening checks the file's own permission bits against QEMU's uid; a file only root may read (a kernel
    under /root, say) is copied into a sealed memfd instead, so it never needs its mode widened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    if os.fstat(fd).st_mode & stat.S_IROTH:
        return fd
    mfd = os.memfd_create(os.path.basename(path), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    stack.callback(os.close, mfd)
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        offset += os.sendfile(mfd, fd, offset, size - offset)
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, seals)
    return mfd


def _open(stack: contextlib.ExitStack, path: str, flags: int, mode: int = 0o600) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    stack.callback(os.close, fd)
    return fd


@contextlib.contextmanager
def open_handover(
    spec: VmSpec,
    paths: RuntimePaths,
    uid: int,
    gid: int,
    format_of: Callable[[str], str | None] | None = None,
    taps: tuple[int | None, ...] = (),
) -> Iterator[HandOver]:
    """Open everything QEMU inherits; the daemon's copies are closed on exit (after the spawn).

    The QMP, serial and agent sockets are bound here, in the root-only run dir, and are already listening:
    the daemon connects to them by path, QEMU serves them from the descriptors. format_of(realpath) gives the
    format vmkit recorded for a volume (None: no pool holds it); with it, backing images take their format from
    it and must be volumes (see storage.qcow2.backing_chain). Raises ImageError for a chain it refuses."""
    with contextlib.ExitStack() as stack:
        socks = []
        for path in (paths.qmp_sock, paths.serial_sock, paths.qga_sock):
            sock = listen_unix(path)
            stack.callback(sock.close)
            socks.append(sock.fileno())
        # Both logs hold one run: the latest. Appending keeps QEMU's writes in order after the truncation.
        log = _open(stack, str(paths.serial_log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        kernel = _readonly_fd(stack, spec.kernel) if spec.kernel else None
        initrd = _readonly_fd(stack, spec.initrd) if spec.kernel and spec.initrd else None
        disks = [open_disk(stack, disk, uid, gid, format_of) for disk in spec.disks]
        # QEMU dups these through its fdsets, never reopens them by path: no ownership or mode is needed.
        cdroms = tuple(None if cd.path is None else _open(stack, cd.path, os.O_RDONLY) for cd in spec.cdroms)
        # Taps are opened by the network code (net/links.py), which needs CAP_NET_ADMIN; QEMU gets them as they are.
        yield HandOver(socks[0], socks[1], socks[2], log, kernel, initrd, tuple(disks), cdroms, taps)


def open_disk(
    stack: contextlib.ExitStack,
    disk: DiskSpec,
    uid: int,
    gid: int,
    format_of: Callable[[str], str | None] | None = None,
) -> DiskFds:
    """Descriptors of one disk and every image below it (for a start, or a hot-plug: hotplug.attach_disk),
    closed by stack. A writable disk vmkit owns is handed to the VM's identity; a read-only one is opened
    read-only and never chowned (it may be shared with other VMs). A shared volume has none: QEMU reaches
    its server itself (argv.network_node)."""
    if is_network(disk.path):
        return DiskFds(None)
    chain = backing_chain(disk.path, disk.format, format_of=format_of)  # refused before anything changes
    if disk.readonly:
        top = _open(stack, disk.path, os.O_RDONLY)
    else:
        top = _open(stack, disk.path, os.O_RDWR)
        if disk.owned:
            os.fchown(top, uid, gid)
            os.fchmod(top, 0o600)
    return DiskFds(top, tuple((_open(stack, b.path, os.O_RDONLY), b.format) for b in chain))


def open_medium(stack: contextlib.ExitStack, path: str) -> int:
    """A read-only descriptor of a CD-ROM medium (for hotplug.change_medium), closed by stack."""
    return _open(stack, path, os.O_RDONLY)
