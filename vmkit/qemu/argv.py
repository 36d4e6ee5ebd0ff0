"""Pure builder of QEMU's command line. This module must not have side effects.

Invariants the rest of vmkit relies on:
- `-S`: QEMU starts paused, so the daemon attaches QMP before any guest code runs, then sends `cont`.
- `-no-shutdown`: a guest power-off stops QEMU instead of ending it; the daemon sees the SHUTDOWN event,
  records why, then quits QEMU. If the daemon is down at that moment QEMU waits, and the daemon finds it in
  state `shutdown` when it re-attaches, so a clean power-off is never mistaken for a crash.
- Every image has an explicit format (QEMU never probes) and a node name (snapshots and mirrors need them).
- Every value placed inside a comma-separated option string goes through `opt()`.
- QEMU opens no path of vmkit's: it runs unprivileged and is handed open file descriptors (`HandOver`) for
  its QMP, serial and agent sockets, its serial log, kernel, initrd and every image of every disk's backing
  chain (`-add-fd` + `/dev/fdset/N`, with the chain spelled out so no header's backing path is followed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmkit.model.vm import VmSpec

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_PORT = "org.qemu.guest_agent.0"


def opt(value: str) -> str:
    """Escape a value for a QEMU comma-separated option string (a comma is written as two)."""
    if "\0" in value or "\n" in value:
        raise ValueError(f"value not allowed in a QEMU option: {value!r}")
    return value.replace(",", ",,")


@dataclass(frozen=True)
class RuntimePaths:
    """Where one VM's files live: sockets, pid and argv in its run dir (gone when QEMU ends); disks and logs
    in its vm dir under the state dir (kept until the VM is deleted)."""

    run_dir: Path
    vm_dir: Path

    @property
    def qmp_sock(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def qga_sock(self) -> Path:
        return self.run_dir / "qga.sock"

    @property
    def serial_sock(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def pid_file(self) -> Path:
        """Written by the daemon the moment QEMU is spawned (QEMU's -pidfile would need a path it can reach)."""
        return self.run_dir / "qemu.pid"

    @property
    def argv_file(self) -> Path:
        return self.run_dir / "argv.json"

    @property
    def qmp_log(self) -> Path:
        return self.vm_dir / "qmp.log"

    @property
    def serial_log(self) -> Path:
        return self.vm_dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.vm_dir / "qemu.log"


@dataclass(frozen=True)
class DiskFds:
    fd: int  # the VM's own image, read-write
    backing: tuple[tuple[int, str], ...] = ()  # (read-only fd, format) of each image below it, nearest first


@dataclass(frozen=True)
class HandOver:
    """File descriptors QEMU inherits. Each is numbered as in QEMU's own fd table (pass_fds keeps numbers)."""

    qmp: int  # already listening
    serial: int  # already listening
    qga: int  # already listening
    serial_log: int  # write-only, appending
    kernel: int | None = None
    initrd: int | None = None
    disks: tuple[DiskFds, ...] = ()

    def all(self) -> list[int]:
        fds = [self.qmp, self.serial, self.qga, self.serial_log]
        fds += [fd for fd in (self.kernel, self.initrd) if fd is not None]
        for d in self.disks:
            fds += [d.fd, *(fd for fd, _ in d.backing)]
        return fds


@dataclass(frozen=True)
class HostConfig:
    qemu_binary: str
    accelerator: str  # "kvm" or "tcg"
    machine: str = "q35"


def qemu_argv(spec: VmSpec, paths: RuntimePaths, host: HostConfig, fds: HandOver) -> list[str]:
    """Return the full argv that runs `spec` with the descriptors in `fds`. The QMP socket is already
    listening, so the daemon can connect the instant QEMU is spawned, without polling for it."""
    if len(fds.disks) != len(spec.disks):
        raise ValueError("one DiskFds per disk")
    fdsets: list[str] = []

    def fdset(fd: int, label: str) -> str:
        fdsets.extend(["-add-fd", f"fd={fd},set={len(fdsets) // 2 + 1},opaque={label}"])
        return f"/dev/fdset/{len(fdsets) // 2}"

    # logfile= records everything the guest writes, whether or not a console client is attached.
    serial = (
        f"socket,id=serial0,fd={fds.serial},server=on,wait=off,"
        f"logfile={fdset(fds.serial_log, 'serial-log')},logappend=on"
    )
    argv = [
        host.qemu_binary,
        "-name", f"guest={opt(spec.name)},debug-threads=on",
        "-uuid", spec.uuid,
        "-nodefaults",
        "-no-user-config",
        "-machine", f"{host.machine},accel={host.accelerator}",
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-sandbox", SANDBOX,
        "-msg", "timestamp=on",
        "-S",
        "-no-shutdown",
        "-chardev", f"socket,id=mon0,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=mon0,mode=control",
        "-chardev", serial,
        "-serial", "chardev:serial0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,fd={fds.qga},server=on,wait=off",
        # The port's id= is what makes QEMU emit VSERPORT_CHANGE when the guest agent opens it.
        "-device", f"virtserialport,bus=vser0.0,chardev=qga0,id=qga0,name={AGENT_PORT}",
        "-device", "VGA,id=video0",
        # A VNC server with no listener: clients are handed over as fds (QMP add_client), never a TCP port.
        "-vnc", "none",
    ]  # fmt: skip
    if host.accelerator == "kvm":
        argv += ["-cpu", "host"]  # under TCG QEMU's default model boots fastest
    if spec.kernel:
        if fds.kernel is None:
            raise ValueError("a kernel needs its fd")
        # /proc/self/fd/N reopens the inherited file without walking the path it came from.
        argv += ["-kernel", f"/proc/self/fd/{fds.kernel}"]
        if spec.initrd:
            if fds.initrd is None:
                raise ValueError("an initrd needs its fd")
            argv += ["-initrd", f"/proc/self/fd/{fds.initrd}"]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]
    for i, (disk, dfds) in enumerate(zip(spec.disks, fds.disks, strict=True)):
        node = f"disk{i}"
        # Bottom of the chain first, so each image names the node below it as its backing.
        backing = ""
        for j, (fd, fmt) in reversed(list(enumerate(dfds.backing, start=1))):
            bnode = f"{node}-b{j}"
            argv += [
                "-blockdev",
                f"driver=file,filename={fdset(fd, bnode)},node-name={bnode}-file,read-only=on,cache.direct=off",
                "-blockdev", f"driver={fmt},file={bnode}-file,node-name={bnode},read-only=on{backing}",
            ]  # fmt: skip
            backing = f",backing={bnode}"
        argv += [
            "-blockdev",
            f"driver=file,filename={fdset(dfds.fd, node)},node-name={node}-file,cache.direct=off,discard=unmap",
            "-blockdev", f"driver={disk.format},file={node}-file,node-name={node},discard=unmap{backing}",
            "-device", f"virtio-blk-pci,drive={node},id={node}-dev" + (",bootindex=1" if i == 0 else ""),
        ]  # fmt: skip
    for i, nic in enumerate(spec.nics):
        argv += [
            "-netdev", f"user,id=net{i},restrict=on",
            "-device", f"virtio-net-pci,netdev=net{i},id=net{i}-dev,mac={nic.mac}",
        ]  # fmt: skip
    # -add-fd comes first so every /dev/fdset/N above exists when QEMU opens it.
    return [argv[0], *fdsets, *argv[1:]]
