"""Pure builder of QEMU's command line. This module must not have side effects.

Invariants the rest of vmkit relies on:
- `-S`: QEMU starts paused, so the daemon attaches QMP before any guest code runs, then sends `cont`.
- `-no-shutdown`: a guest power-off stops QEMU instead of ending it; the daemon sees the SHUTDOWN event,
  records why, then quits QEMU. If the daemon is down at that moment QEMU waits, and the daemon finds it in
  state `shutdown` when it re-attaches, so a clean power-off is never mistaken for a crash.
- Every image has an explicit format (QEMU never probes) and a node name (snapshots and mirrors need them).
- Every value placed inside a comma-separated option string goes through `opt()`.
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
    def vnc_sock(self) -> Path:
        return self.run_dir / "vnc.sock"

    @property
    def pid_file(self) -> Path:
        """Written by QEMU itself (-pidfile)."""
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
class HostConfig:
    qemu_binary: str
    accelerator: str  # "kvm" or "tcg"
    machine: str = "q35"


def qemu_argv(spec: VmSpec, paths: RuntimePaths, host: HostConfig, *, qmp_fd: int) -> list[str]:
    """Return the full argv that runs `spec`. `qmp_fd` is an already-listening UNIX socket QEMU inherits,
    so the daemon can connect the instant QEMU is spawned, without polling for the socket to appear."""
    # logfile= records everything the guest writes, whether or not a console client is attached.
    serial = (
        f"socket,id=serial0,path={opt(str(paths.serial_sock))},server=on,wait=off,"
        f"logfile={opt(str(paths.serial_log))},logappend=off"
    )
    argv = [
        host.qemu_binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-uuid", spec.uuid,
        "-nodefaults",
        "-no-user-config",
        "-machine", f"{host.machine},accel={host.accelerator}",
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-sandbox", SANDBOX,
        "-msg", "timestamp=on",
        "-pidfile", str(paths.pid_file),
        "-S",
        "-no-shutdown",
        "-chardev", f"socket,id=mon0,fd={qmp_fd},server=on,wait=off",
        "-mon", "chardev=mon0,mode=control",
        "-chardev", serial,
        "-serial", "chardev:serial0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={opt(str(paths.qga_sock))},server=on,wait=off",
        # The port's id= is what makes QEMU emit VSERPORT_CHANGE when the guest agent opens it.
        "-device", f"virtserialport,bus=vser0.0,chardev=qga0,id=qga0,name={AGENT_PORT}",
        "-device", "VGA,id=video0",
        "-vnc", f"unix:{opt(str(paths.vnc_sock))}",
    ]  # fmt: skip
    if host.accelerator == "kvm":
        argv += ["-cpu", "host"]  # under TCG QEMU's default model boots fastest
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]
    for i, disk in enumerate(spec.disks):
        node = f"disk{i}"
        argv += [
            "-blockdev",
            f"driver=file,filename={opt(disk.path)},node-name={node}-file,cache.direct=off,discard=unmap",
            "-blockdev", f"driver={disk.format},file={node}-file,node-name={node},discard=unmap",
            "-device", f"virtio-blk-pci,drive={node},id={node}-dev" + (",bootindex=1" if i == 0 else ""),
        ]  # fmt: skip
    for i, nic in enumerate(spec.nics):
        argv += [
            "-netdev", f"user,id=net{i},restrict=on",
            "-device", f"virtio-net-pci,netdev=net{i},id=net{i}-dev,mac={nic.mac}",
        ]  # fmt: skip
    return argv
