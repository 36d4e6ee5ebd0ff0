"""Pure builder of QEMU's command line. This module must not have side effects.

Invariants the rest of vmkit relies on:
- `-S`: QEMU starts paused, so the daemon attaches QMP before any guest code runs, then sends `cont`. With
  `-incoming` (a restore) it sends `cont` only once the saved state is loaded, and only if it was running.
- `-no-shutdown`: a guest power-off stops QEMU instead of ending it; the daemon sees the SHUTDOWN event,
  records why, then quits QEMU. If the daemon is down at that moment QEMU waits, and the daemon finds it in
  state `shutdown` when it re-attaches, so a clean power-off is never mistaken for a crash.
- Every image has an explicit format (QEMU never probes) and a node name (snapshots and mirrors need them).
- Every value placed inside a comma-separated option string goes through `opt()`.
- A disk's node name is its `DiskSpec.name` (disk0, disk2, …: stable, not its position), its device is
  `{name}-dev`, and its virtio-blk-pci device sits on a PCIe root port of its own (`{name}-port`), as libvirt
  does on q35, so any disk can be hot-unplugged; SPARE_PORTS empty ports (hp0, hp1, …) take hot-plugged
  disks. The option dicts of one disk come from `disk_blockdevs`/`disk_device`, shared with the hotplug code
  (vmkit/qemu/hotplug.py), which gives QEMU the same nodes over QMP.
- CD-ROMs are ide-cd devices (`{name}-dev`) on q35's built-in AHCI; an empty tray has no drive.
- QEMU opens no path of vmkit's: it runs unprivileged and is handed open file descriptors (`HandOver`) for
  its QMP, serial and agent sockets, its serial log, kernel, initrd and every image of every disk's backing
  chain (`-add-fd` + `/dev/fdset/N`, with the chain spelled out so no header's backing path is followed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from vmkit.model.vm import DiskSpec, NicSpec, VmSpec

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_PORT = "org.qemu.guest_agent.0"

# Empty PCIe root ports a VM starts with, for disks hot-plugged while it runs (a port cannot itself be
# hot-plugged on q35). A cold disk's own port is free again once that disk is detached.
SPARE_PORTS = 4
# Root ports are multifunction devices at explicit addresses, 8 per slot from PORT_SLOT0 on (as libvirt
# places them): 64 disks would not fit one slot each on pcie.0. Slots below PORT_SLOT0 are left to the devices
# QEMU places itself (virtio-serial, VGA, NICs), so a NIC's address does not depend on the number of disks.
PORT_SLOT0 = 0x10
PORT_SLOT_END = 0x1F  # q35's ICH9 LPC/SATA/SMBus functions
AHCI_PORTS = 6  # q35's built-in AHCI controller: buses ide.0 … ide.5


def device_id(node: str) -> str:
    """qdev id of the device of disk, CD-ROM drive or NIC `node` (disk0 → disk0-dev, net1 → net1-dev)."""
    return f"{node}-dev"


def port_id(node: str) -> str:
    """id of the root port a disk present at start sits on."""
    return f"{node}-port"


def spare_port_id(i: int) -> str:
    return f"hp{i}"


def opt(value: str) -> str:
    """Escape a value for a QEMU comma-separated option string (a comma is written as two)."""
    if "\0" in value or "\n" in value:
        raise ValueError(f"value not allowed in a QEMU option: {value!r}")
    return value.replace(",", ",,")


def _flatten(prefix: str, options: Mapping[str, Any]) -> list[str]:
    parts = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            parts += _flatten(f"{prefix}{key}.", value)
        elif isinstance(value, bool):
            parts.append(f"{prefix}{key}={'on' if value else 'off'}")
        else:
            parts.append(f"{prefix}{key}={opt(str(value))}")
    return parts


def qemu_opts(options: Mapping[str, Any]) -> str:
    """QMP-style arguments (as for blockdev-add) as a command-line option string: nested dicts become dotted
    keys (cache.direct=off), booleans on/off, every value escaped."""
    return ",".join(_flatten("", options))


def device_opts(options: Mapping[str, Any]) -> str:
    """device_add arguments as a -device string: the driver first, as QEMU's own help writes it."""
    rest = {k: v for k, v in options.items() if k != "driver"}
    return ",".join([opt(str(options["driver"])), *_flatten("", rest)])


def is_network(location: str) -> bool:
    """Whether a disk's path is a shared volume's URL (nfs://, iscsi://) rather than a local file."""
    return location.startswith(("nfs://", "iscsi://"))


def network_node(url: str) -> dict[str, Any]:
    """The protocol node of a shared volume, from the URL services/sharedpools.py built from checked parts:
    QEMU's own NFS (libnfs, with the pool's uid/gid) or iSCSI (libiscsi) client reaches the server, no kernel
    client is involved. An iSCSI initiator name is left to QEMU, which derives one from the VM's UUID."""
    u = urlsplit(url)
    if u.scheme == "nfs":
        q = parse_qs(u.query)
        return {
            "driver": "nfs", "server": {"type": "inet", "host": u.hostname}, "path": u.path,
            "user": int(q["uid"][0]), "group": int(q["gid"][0]),
        }  # fmt: skip
    if u.scheme == "iscsi":
        iqn, _, lun = u.path.strip("/").rpartition("/")
        host = f"[{u.hostname}]" if u.hostname and ":" in u.hostname else u.hostname
        return {"driver": "iscsi", "transport": "tcp", "portal": f"{host}:{u.port}", "target": iqn, "lun": int(lun)}
    raise ValueError(f"not a shared volume's URL: {url!r}")


def _file_node(top: str) -> dict[str, Any]:
    if is_network(top):
        return network_node(top)
    return {"driver": "file", "filename": top}


def disk_blockdevs(disk: DiskSpec, top: str, backing: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """The blockdev-add arguments of one disk, bottom of the backing chain first (each image names the node
    below it as its backing, so QEMU never follows a header's backing path).

    top is the filename QEMU opens the disk's own image by (/dev/fdset/N, or a shared volume's URL), backing
    the (filename, format) of each image below it, nearest first. Node names: `{name}` (format) and
    `{name}-file`; backing images `{name}-b1`, `{name}-b2`, … from the nearest. Images below the disk, and a
    read-only disk itself, are opened read-only (their descriptors must be too: QEMU picks an fdset's
    descriptor by access mode)."""
    node = disk.name
    if not node:
        raise ValueError("a disk needs its node name")
    blockdevs: list[dict[str, Any]] = []
    below: dict[str, str] = {}
    for j, (filename, fmt) in reversed(list(enumerate(backing, start=1))):
        bnode = f"{node}-b{j}"
        blockdevs += [
            {"driver": "file", "filename": filename, "node-name": f"{bnode}-file", "read-only": True,
             "cache": {"direct": False}},
            {"driver": fmt, "file": f"{bnode}-file", "node-name": bnode, "read-only": True, **below},
        ]  # fmt: skip
        below = {"backing": bnode}
    if disk.readonly:
        blockdevs += [
            {**_file_node(top), "node-name": f"{node}-file", "read-only": True, "cache": {"direct": False}},
            {"driver": disk.format, "file": f"{node}-file", "node-name": node, "read-only": True, **below},
        ]  # fmt: skip
    else:
        blockdevs += [
            {**_file_node(top), "node-name": f"{node}-file", "cache": {"direct": False}, "discard": "unmap"},
            {"driver": disk.format, "file": f"{node}-file", "node-name": node, "discard": "unmap", **below},
        ]  # fmt: skip
    return blockdevs


def overlay_blockdevs(node: str, filename: str) -> list[dict[str, Any]]:
    """The blockdev-add arguments of a new, empty qcow2 overlay for a live external snapshot (blockdev-snapshot
    gives it its backing node, so it must have none yet)."""
    return [
        {"driver": "file", "filename": filename, "node-name": f"{node}-file", "cache": {"direct": False},
         "discard": "unmap"},
        {"driver": "qcow2", "file": f"{node}-file", "node-name": node, "discard": "unmap", "backing": None},
    ]  # fmt: skip


def disk_device(node: str, bus: str, bootindex: int | None = None) -> dict[str, Any]:
    """device_add arguments of a disk's virtio-blk-pci device on root port `bus`."""
    dev: dict[str, Any] = {"driver": "virtio-blk-pci", "drive": node, "id": device_id(node), "bus": bus}
    if bootindex is not None:
        dev["bootindex"] = bootindex
    return dev


def nic_device(nic: NicSpec, bus: str) -> dict[str, Any]:
    """device_add arguments of a NIC on root port `bus` (its netdev has the NIC's name)."""
    if not nic.name:
        raise ValueError("a NIC needs its name")
    model = "virtio-net-pci" if nic.model == "virtio" else "e1000"
    return {"driver": model, "netdev": nic.name, "id": device_id(nic.name), "mac": nic.mac, "bus": bus}


def cdrom_blockdevs(node: str, filename: str) -> list[dict[str, Any]]:
    """The blockdev-add arguments of a CD-ROM medium: a read-only raw image (an ISO is never probed)."""
    return [
        {"driver": "file", "filename": filename, "node-name": f"{node}-file", "read-only": True},
        {"driver": "raw", "file": f"{node}-file", "node-name": node, "read-only": True},
    ]


def machine_ports(spec: VmSpec) -> list[str]:
    """The machine's PCIe root ports, in order: disks, then NICs, each on one of its own (so each can be
    unplugged), then the spare ones for hot-plugs; or, once a hot-plug changed a running machine, the ports it
    has (spec.ports), so that a migration or a restore rebuilds it port for port."""
    if spec.ports is not None:
        return list(spec.ports)
    ports = [port_id(d.name) for d in spec.disks] + [port_id(n.name) for n in spec.nics]
    return ports + [spare_port_id(i) for i in range(SPARE_PORTS)]


def cold(spec: VmSpec) -> VmSpec:
    """spec for a fresh start: every device back on a port of its own, the machine derived again."""
    if spec.ports is None and not any(d.port for d in spec.disks) and not any(n.port for n in spec.nics):
        return spec
    return spec.model_copy(update={
        "ports": None,
        "disks": [d.model_copy(update={"port": None}) for d in spec.disks],
        "nics": [n.model_copy(update={"port": None}) for n in spec.nics],
    })  # fmt: skip


def root_ports(ids: Sequence[str]) -> list[dict[str, Any]]:
    """The pcie-root-port devices with these ids, in order: 8 functions per slot from PORT_SLOT0 on,
    chassis numbers from 1 and port numbers from 0x10 (libvirt's scheme), all unique."""
    if len(ids) > (PORT_SLOT_END - PORT_SLOT0) * 8:
        raise ValueError(f"too many PCIe root ports ({len(ids)}): too many disks")
    ports = []
    for k, ident in enumerate(ids):
        slot, fn = divmod(k, 8)
        port: dict[str, Any] = {"driver": "pcie-root-port", "id": ident, "bus": "pcie.0", "chassis": k + 1,
                                "port": 0x10 + k, "addr": f"{PORT_SLOT0 + slot:#x}.{fn:#x}"}  # fmt: skip
        if fn == 0:
            port["multifunction"] = True
        ports.append(port)
    return ports


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
    fd: int | None  # the disk's own image: read-write, or read-only for a read-only disk; None: a shared volume
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
    disks: tuple[DiskFds, ...] = ()  # one per disk, in the order of spec.disks
    cdroms: tuple[int | None, ...] = ()  # read-only medium per CD-ROM; None: an empty tray
    nics: tuple[int | None, ...] = ()  # a tap (opened by the daemon, on its network's bridge) per NIC; None: user

    def all(self) -> list[int]:
        fds = [self.qmp, self.serial, self.qga, self.serial_log]
        fds += [fd for fd in (self.kernel, self.initrd) if fd is not None]
        for d in self.disks:
            fds += [*([] if d.fd is None else [d.fd]), *(fd for fd, _ in d.backing)]
        fds += [fd for fd in self.cdroms if fd is not None]
        fds += [fd for fd in self.nics if fd is not None]
        return fds


@dataclass(frozen=True)
class HostConfig:
    qemu_binary: str
    accelerator: str  # "kvm" or "tcg"
    machine: str = "q35"


def qemu_argv(
    spec: VmSpec,
    paths: RuntimePaths,
    host: HostConfig,
    fds: HandOver,
    *,
    loadvm: str | None = None,
    incoming: str | None = None,
) -> list[str]:
    """Return the full argv that runs `spec` with the descriptors in `fds`. The QMP socket is already
    listening, so the daemon can connect the instant QEMU is spawned, without polling for it.

    loadvm: start from internal snapshot `loadvm` (its disks and RAM; QEMU still waits for `cont`).
    incoming: wait for a VM state to load instead of booting (`-incoming`): "defer" (the daemon then names a
    descriptor with migrate-incoming, see qemu/savevm.py) or "fd:N" (an inherited descriptor)."""
    if incoming is not None and not _INCOMING_RE.fullmatch(incoming):
        raise ValueError(f"incoming must be 'defer' or 'fd:N', not {incoming!r}")
    if incoming is not None and loadvm is not None:
        raise ValueError("a VM starts from a snapshot (loadvm) or from an incoming state, not both")
    if len(fds.disks) != len(spec.disks):
        raise ValueError("one DiskFds per disk")
    if len(fds.cdroms) != len(spec.cdroms):
        raise ValueError("one descriptor (or None for an empty tray) per CD-ROM")
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
    for cd, cfd in zip(spec.cdroms, fds.cdroms, strict=True):
        if (cd.path is None) != (cfd is None):
            raise ValueError(f"CD-ROM {cd.name}: a medium needs its fd, an empty tray has none")
    for port in root_ports(machine_ports(spec)):
        argv += ["-device", device_opts(port)]
    for i, (disk, dfds) in enumerate(zip(spec.disks, fds.disks, strict=True)):
        node = disk.name
        # fdsets bottom of the chain first, like the nodes; each labelled with the node that opens it.
        bottom_up = [(fdset(fd, f"{node}-b{j}"), fmt) for j, (fd, fmt) in reversed(list(enumerate(dfds.backing, 1)))]
        top = disk.path if dfds.fd is None else fdset(dfds.fd, node)
        for bd in disk_blockdevs(disk, top, bottom_up[::-1]):
            argv += ["-blockdev", qemu_opts(bd)]
        # With a CD-ROM, it boots first (install media; an empty tray falls through to the disk).
        bootindex = (2 if spec.cdroms else 1) if i == 0 else None
        argv += ["-device", device_opts(disk_device(node, disk.port or port_id(node), bootindex))]
    for k, (cd, cfd) in enumerate(zip(spec.cdroms, fds.cdroms, strict=True)):
        bus = _ahci_port(cd.name)
        dev: dict[str, Any] = {"driver": "ide-cd", "bus": f"ide.{bus}", "id": device_id(cd.name)}
        if cfd is not None:
            for bd in cdrom_blockdevs(cd.name, fdset(cfd, cd.name)):
                argv += ["-blockdev", qemu_opts(bd)]
            dev["drive"] = cd.name
        if k == 0:
            dev["bootindex"] = 1
        argv += ["-device", device_opts(dev)]
    taps = fds.nics or (None,) * len(spec.nics)
    if len(taps) != len(spec.nics):
        raise ValueError("one tap (or None) per NIC")
    for nic, tap in zip(spec.nics, taps, strict=True):
        if (nic.kind == "network") != (tap is not None):
            raise ValueError(f"NIC {nic.name}: a network NIC needs its tap, a user NIC none")
        # A tap handed over open: QEMU never needs CAP_NET_ADMIN or a path of ours. vhost-net is missing here
        # (and would need /dev/vhost-net opened for QEMU too).
        netdev = f"tap,id={nic.name},fd={tap},vhost=off" if tap is not None else f"user,id={nic.name},restrict=on"
        argv += ["-netdev", netdev, "-device", device_opts(nic_device(nic, nic.port or port_id(nic.name)))]
    if loadvm is not None:
        argv += ["-loadvm", opt(loadvm)]
    if incoming is not None:
        argv += ["-incoming", incoming]
    # -add-fd comes first so every /dev/fdset/N above exists when QEMU opens it.
    return [argv[0], *fdsets, *argv[1:]]


_INCOMING_RE = re.compile(r"defer|fd:[0-9]+")


def _ahci_port(name: str) -> int:
    """The AHCI port of CD-ROM drive `name` (cd0 → ide.0): by its name, so it stays put when another goes."""
    digits = name.removeprefix("cd")
    if not digits.isdigit() or int(digits) >= AHCI_PORTS:
        raise ValueError(f"CD-ROM {name!r}: q35's AHCI has ports for cd0 … cd{AHCI_PORTS - 1} only")
    return int(digits)
