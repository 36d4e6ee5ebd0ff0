"""Launching QEMU so that it outlives the daemon, and finding it again afterwards.

QEMU runs in its own session (setsid): a signal to the daemon's process group never reaches it, and if the
daemon dies it is re-parented, not killed. QEMU writes its own pid file (-pidfile) before it serves QMP; the
daemon trusts that pid only while the process's argv carries the VM's -uuid, so a recycled pid is never
mistaken for our QEMU. Once found, a QemuProcess also pins the start time, so `alive` stays exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmkit.qemu.argv import RuntimePaths


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/PID/stat


def proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def alive(proc: QemuProcess) -> bool:
    start = proc_start_time(proc.pid)
    if start != proc.start_time:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def spawn(argv: list[str], paths: RuntimePaths, qmp_sock: socket.socket) -> tuple[QemuProcess, subprocess.Popen[bytes]]:
    """Start QEMU detached from the daemon, recording its argv in the runtime dir (QEMU records its pid)."""
    paths.argv_file.write_text(json.dumps(argv))
    with open(paths.qemu_log, "ab") as log:
        popen = subprocess.Popen(  # noqa: S603 - argv list built by qemu_argv, no shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=[qmp_sock.fileno()],
            start_new_session=True,
            close_fds=True,
        )
    start = proc_start_time(popen.pid)
    return QemuProcess(popen.pid, start if start is not None else -1), popen


def read_pid(paths: RuntimePaths) -> QemuProcess | None:
    """The QEMU recorded in paths, if it is still there and still ours."""
    try:
        pid = int(paths.pid_file.read_text().split()[0])
        argv = json.loads(paths.argv_file.read_text())
        uuid = argv[argv.index("-uuid") + 1]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    start = proc_start_time(pid)
    if uuid.encode() not in cmdline or start is None:
        return None
    return QemuProcess(pid, start)


def kill(proc: QemuProcess) -> None:
    """SIGKILL proc if it is still the QEMU we started."""
    if alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


def pidfd(proc: QemuProcess) -> int | None:
    """A pidfd for proc (readable once it exits), or None if it is already gone.

    Opened before re-checking the start time, so the fd refers to our QEMU and not to a recycled pid.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return None
    if not alive(proc):
        os.close(fd)
        return None
    return fd
