"""Launching QEMU so that it outlives the daemon, and finding it again afterwards.

QEMU runs in its own session (setsid): a signal to the daemon's process group never reaches it, and if the
daemon dies it is re-parented, not killed. It runs as its VM's own identity (through the `launcher` prefix,
see host/identity.py), inherits the descriptors it needs, and is moved into its VM's cgroup while it is
still paused (-S). The daemon writes its pid record the moment it is spawned and trusts that pid only
while the process's argv carries the VM's -uuid, so a recycled pid is never mistaken for our QEMU; if the
daemon died in the instant between spawn and record, `find_by_uuid` finds it from /proc. Once found, a
QemuProcess also pins the start time, so `alive` stays exact.

The session is made after the exec, by util-linux setsid(1), not by the child before it (start_new_session):
the child is vfork'd, so the daemon's event loop stands still until it execs, and a child that calls setsid()
first is moved into a new scheduling autogroup where, under load, it waits a round for a CPU (~16-20 ms per
spawn with 20 busy QEMUs, against 0.2 ms). setsid(1) then execs the launcher in place: the pid stays QEMU's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmkit.host.cgroups import VmCgroup
from vmkit.qemu.argv import RuntimePaths

# util-linux: setsid() and exec in place (same pid); it forks only when already a process group leader,
# which a freshly spawned child never is.
SETSID = "/usr/bin/setsid"


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


def spawn(
    argv: list[str],
    paths: RuntimePaths,
    *,
    pass_fds: list[int],
    launcher: list[str],
    cgroup: VmCgroup | None,
) -> tuple[QemuProcess, subprocess.Popen[bytes]]:
    """Start QEMU detached from the daemon as launcher says, recording its argv and pid in the runtime dir."""
    paths.argv_file.write_text(json.dumps(argv))
    with open(paths.qemu_log, "ab") as log:
        popen = subprocess.Popen(  # noqa: S603 - argv list built by qemu_argv, no shell
            [SETSID, "--", *launcher, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=pass_fds,
            close_fds=True,
        )
    try:
        paths.pid_file.write_text(f"{popen.pid}\n")
        if cgroup is not None:
            cgroup.attach(popen.pid)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    start = proc_start_time(popen.pid)
    return QemuProcess(popen.pid, start if start is not None else -1), popen


def _ours(pid: int, uuid: str) -> QemuProcess | None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    start = proc_start_time(pid)
    # The exact argument pair: the uuid alone could appear inside some other process's arguments.
    for i in range(len(cmdline) - 1):
        if cmdline[i] == b"-uuid" and cmdline[i + 1] == uuid.encode() and start is not None:
            return QemuProcess(pid, start)
    return None


def read_pid(paths: RuntimePaths, uuid: str) -> QemuProcess | None:
    """The QEMU recorded in paths, if it is still there and still the one running the VM `uuid`."""
    try:
        pid = int(paths.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return _ours(pid, uuid)


def find_by_uuid(uuid: str) -> QemuProcess | None:
    """Scan /proc for the QEMU of VM `uuid`: only for the rare run dir that has an argv but no pid record."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _ours(int(entry.name), uuid)):
            return found
    return None


def recorded_uuid(paths: RuntimePaths) -> str | None:
    """The -uuid in the argv recorded in paths (for run dirs whose VM has no row any more)."""
    try:
        argv = json.loads(paths.argv_file.read_text())
        return str(argv[argv.index("-uuid") + 1])
    except (OSError, ValueError, IndexError):
        return None


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
