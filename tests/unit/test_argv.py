"""Golden tests of the QEMU argv builder. Regenerate with: VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_argv.py"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vmkit.model.vm import CdromSpec, DiskSpec, NicSpec, VmSpec
from vmkit.qemu.argv import (
    SPARE_PORTS,
    DiskFds,
    HandOver,
    HostConfig,
    RuntimePaths,
    cdrom_blockdevs,
    cold,
    device_opts,
    disk_blockdevs,
    disk_device,
    is_network,
    machine_ports,
    network_node,
    opt,
    qemu_argv,
    qemu_opts,
    root_ports,
    spare_port_id,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PATHS = RuntimePaths(Path("/run/vmkit/vms/web"), Path("/var/lib/vmkit/vms/web"))
TCG = HostConfig(qemu_binary="/usr/bin/qemu-system-x86_64", accelerator="tcg")
KVM = HostConfig(qemu_binary="/usr/bin/qemu-system-x86_64", accelerator="kvm")

SPECS = {
    "minimal": (VmSpec(name="web", uuid="00000000-0000-4000-8000-000000000001", memory_mib=512, vcpus=1), TCG),
    "network-nics": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000009",
            memory_mib=256,
            vcpus=1,
            nics=[
                NicSpec(kind="network", network="default", mac="52:54:00:00:00:01"),
                NicSpec(kind="network", network="lan", mac="52:54:00:00:00:02", model="e1000"),
                NicSpec(mac="52:54:00:00:00:03"),
            ],
        ),
        TCG,
    ),
    "demo": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000002",
            memory_mib=256,
            vcpus=2,
            image="demo",
            kernel="/var/lib/vmkit/images/demo/vmlinuz",
            initrd="/var/lib/vmkit/images/demo/initrd.gz",
            cmdline="console=ttyS0 quiet panic=-1",
            disks=[
                DiskSpec(name="disk0", path="/var/lib/vmkit/vms/web/disk0.qcow2", format="qcow2", backing_image="demo")
            ],
            nics=[NicSpec(mac="52:54:00:12:34:56")],
        ),
        TCG,
    ),
    "kvm-two-disks": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000003",
            memory_mib=2048,
            vcpus=2,
            disks=[
                DiskSpec(name="disk0", path="/data/a,b.raw", format="raw"),
                DiskSpec(name="disk1", path="/data/c.qcow2", format="qcow2"),
            ],
        ),
        KVM,
    ),
    # An installer: the ISO boots first, onto a blank disk.
    "iso-blank-disk": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000004",
            memory_mib=1024,
            vcpus=1,
            disks=[DiskSpec(name="disk0", path="/var/lib/vmkit/pools/default/web-disk0.qcow2", format="qcow2")],
            cdroms=[CdromSpec(name="cd0", path="/data/debian-12.iso", volume="isos/debian-12.iso")],
            nics=[NicSpec(mac="52:54:00:12:34:57")],
        ),
        TCG,
    ),
    "empty-tray": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000005",
            memory_mib=512,
            vcpus=1,
            disks=[DiskSpec(name="disk0", path="/data/web.qcow2", format="qcow2", backing_image="demo")],
            cdroms=[CdromSpec(name="cd0")],
        ),
        TCG,
    ),
    "readonly-disk": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000006",
            memory_mib=512,
            vcpus=1,
            disks=[
                DiskSpec(name="disk0", path="/data/web.raw", format="raw"),
                DiskSpec(name="disk1", path="/data/seed.raw", format="raw", readonly=True, owned=False),
            ],
        ),
        TCG,
    ),
    # Disks on shared pools: QEMU's own NFS and iSCSI clients, no descriptor (services/sharedpools.py).
    "shared-disks": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000009",
            memory_mib=512,
            vcpus=1,
            disks=[
                DiskSpec(name="disk0", path="nfs://10.0.0.5/srv/vmkit/web.qcow2?uid=0&gid=0", format="qcow2"),
                DiskSpec(name="disk1", path="iscsi://[fd00::5]:3260/iqn.2026-11.org.example:t1/2", format="raw"),
            ],
        ),
        TCG,
    ),
    # disk1 was detached: the others keep their names (and so their nodes, devices and ports).
    "disk-gap": (
        VmSpec(
            name="web",
            uuid="00000000-0000-4000-8000-000000000007",
            memory_mib=512,
            vcpus=1,
            disks=[
                DiskSpec(name="disk0", path="/data/a.qcow2", format="qcow2"),
                DiskSpec(name="disk2", path="/data/c.qcow2", format="qcow2", backing_image="demo"),
            ],
        ),
        TCG,
    ),
}


def handover(spec: VmSpec, qmp: int = 3) -> HandOver:
    """Descriptor numbers as the daemon would hand them over; the demo's disk has a one-image chain."""
    disks = tuple(
        DiskFds(None)
        if is_network(d.path)
        else DiskFds(20 + 2 * i, ((21 + 2 * i, "qcow2"),) if d.backing_image else ())
        for i, d in enumerate(spec.disks)
    )
    kernel = (10, 11) if spec.kernel else (None, None)
    cdroms = tuple(None if cd.path is None else 30 + k for k, cd in enumerate(spec.cdroms))
    taps = tuple(40 + k if nic.kind == "network" else None for k, nic in enumerate(spec.nics))
    return HandOver(qmp, 4, 5, 6, kernel[0], kernel[1] if spec.initrd else None, disks, cdroms, taps)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_golden(case: str) -> None:
    spec, host = SPECS[case]
    text = "\n".join(qemu_argv(spec, PATHS, host, handover(spec))) + "\n"
    golden = GOLDEN / f"argv-{case}.txt"
    if os.environ.get("VMKIT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"argv changed; regenerate with VMKIT_REGEN_GOLDEN=1 and review {golden}"


def test_qemu_is_given_no_path() -> None:
    """QEMU runs unprivileged: every file reaches it as a descriptor, none by a path of vmkit's or the user's."""
    for spec, host in SPECS.values():
        argv = qemu_argv(spec, PATHS, host, handover(spec))
        paths = [str(PATHS.run_dir), str(PATHS.vm_dir), "/data/", "/var/lib/vmkit", ".iso"]
        assert not [a for a in argv[1:] if any(p in a for p in paths)], argv
        fdsets = [a for i, a in enumerate(argv) if argv[i - 1] == "-add-fd"]
        used = {a.split("/dev/fdset/")[1].split(",")[0] for a in argv if "/dev/fdset/" in a}
        assert used == {a.split("set=")[1].split(",")[0] for a in fdsets}


def test_backing_chain_is_spelled_out_read_only() -> None:
    spec, host = SPECS["demo"]
    argv = qemu_argv(spec, PATHS, host, handover(spec))
    blockdevs = [a for i, a in enumerate(argv) if argv[i - 1] == "-blockdev"]
    assert "driver=qcow2,file=disk0-b1-file,node-name=disk0-b1,read-only=on" in blockdevs
    assert any(a.startswith("driver=qcow2,file=disk0-file,node-name=disk0,") and a.endswith(",backing=disk0-b1")
               for a in blockdevs)  # fmt: skip
    # The base image is opened read-only; only the VM's own overlay is writable.
    assert sum("read-only=on" in a for a in blockdevs) == 2


def test_invariants() -> None:
    spec, host = SPECS["demo"]
    argv = qemu_argv(spec, PATHS, host, handover(spec, qmp=7))
    for flag in ("-S", "-no-shutdown", "-nodefaults", "-no-user-config"):
        assert flag in argv
    assert "socket,id=mon0,fd=7,server=on,wait=off" in argv
    # never let QEMU probe a format
    assert all("driver=qcow2" in a or "driver=raw" in a for a in argv if a.startswith("driver=") and "file=" in a)
    assert argv[argv.index("-sandbox") + 1].startswith("on,")


@pytest.mark.parametrize("bad", ["a\nb", "x\0y"])
def test_opt_rejects_control_chars(bad: str) -> None:
    with pytest.raises(ValueError):
        opt(bad)


def test_a_descriptor_per_file() -> None:
    spec, _ = SPECS["kvm-two-disks"]
    with pytest.raises(ValueError):
        qemu_argv(spec, PATHS, KVM, HandOver(3, 4, 5, 6))


def _args(argv: list[str], flag: str) -> list[str]:
    return [a for i, a in enumerate(argv) if argv[i - 1] == flag]


def test_nodes_are_named_by_the_disk_not_its_position() -> None:
    spec, host = SPECS["disk-gap"]
    argv = qemu_argv(spec, PATHS, host, handover(spec))
    devices = _args(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,id=disk0-dev,bus=disk0-port,bootindex=1" in devices
    assert "virtio-blk-pci,drive=disk2,id=disk2-dev,bus=disk2-port" in devices
    assert not any("disk1" in a for a in argv)
    assert "driver=qcow2,file=disk2-b1-file,node-name=disk2-b1,read-only=on" in _args(argv, "-blockdev")
    assert "fd=23,set=3,opaque=disk2-b1" in _args(argv, "-add-fd")


def test_every_disk_on_its_own_root_port_plus_spares() -> None:
    spec, host = SPECS["kvm-two-disks"]
    argv = qemu_argv(spec, PATHS, host, handover(spec))
    ports = [a for a in _args(argv, "-device") if a.startswith("pcie-root-port,")]
    ids = [dict(p.split("=", 1) for p in a.split(",")[1:])["id"] for a in ports]
    assert ids == ["disk0-port", "disk1-port", *(f"hp{i}" for i in range(SPARE_PORTS))]
    for key in ("chassis", "port", "addr"):
        values = [dict(p.split("=", 1) for p in a.split(",")[1:])[key] for a in ports]
        assert len(set(values)) == len(values), key
    # Each port comes before the disk that sits on it.
    assert argv.index(ports[1]) < argv.index("virtio-blk-pci,drive=disk1,id=disk1-dev,bus=disk1-port")


def test_root_ports_fill_slots_eight_functions_each() -> None:
    ports = root_ports([f"p{i}" for i in range(70)])
    assert ports[0] == {"driver": "pcie-root-port", "id": "p0", "bus": "pcie.0", "chassis": 1, "port": 0x10,
                        "addr": "0x10.0x0", "multifunction": True}  # fmt: skip
    assert ports[9]["addr"] == "0x11.0x1" and "multifunction" not in ports[9]
    assert len({p["addr"] for p in ports}) == 70
    with pytest.raises(ValueError, match="too many"):
        root_ports([f"p{i}" for i in range(200)])


def test_readonly_disk() -> None:
    spec, host = SPECS["readonly-disk"]
    blockdevs = _args(qemu_argv(spec, PATHS, host, handover(spec)), "-blockdev")
    assert "driver=file,filename=/dev/fdset/3,node-name=disk1-file,read-only=on,cache.direct=off" in blockdevs
    assert "driver=raw,file=disk1-file,node-name=disk1,read-only=on" in blockdevs
    assert sum("read-only=on" in a for a in blockdevs) == 2


def test_shared_disks_reach_their_servers() -> None:
    spec, host = SPECS["shared-disks"]
    argv = qemu_argv(spec, PATHS, host, handover(spec))
    blockdevs = _args(argv, "-blockdev")
    assert (
        "driver=nfs,server.type=inet,server.host=10.0.0.5,path=/srv/vmkit/web.qcow2,user=0,group=0,"
        "node-name=disk0-file,cache.direct=off,discard=unmap" in blockdevs
    )
    assert (
        "driver=iscsi,transport=tcp,portal=[fd00::5]:3260,target=iqn.2026-11.org.example:t1,lun=2,"
        "node-name=disk1-file,cache.direct=off,discard=unmap" in blockdevs
    )
    assert not _args(argv, "-add-fd")[3:]  # only the serial log's, the sockets'…: no disk fdset
    assert not any("fdset" in b for b in blockdevs)
    with pytest.raises(ValueError):
        network_node("http://x/y")


def test_cdrom_boots_first() -> None:
    spec, host = SPECS["iso-blank-disk"]
    argv = qemu_argv(spec, PATHS, host, handover(spec))
    devices = _args(argv, "-device")
    assert "ide-cd,bus=ide.0,id=cd0-dev,drive=cd0,bootindex=1" in devices
    assert "virtio-blk-pci,drive=disk0,id=disk0-dev,bus=disk0-port,bootindex=2" in devices
    blockdevs = _args(argv, "-blockdev")
    assert "driver=file,filename=/dev/fdset/3,node-name=cd0-file,read-only=on" in blockdevs
    assert "driver=raw,file=cd0-file,node-name=cd0,read-only=on" in blockdevs
    assert "fd=30,set=3,opaque=cd0" in _args(argv, "-add-fd")


def test_empty_tray_has_no_drive() -> None:
    spec, host = SPECS["empty-tray"]
    argv = qemu_argv(spec, PATHS, host, handover(spec))
    assert "ide-cd,bus=ide.0,id=cd0-dev,bootindex=1" in _args(argv, "-device")
    assert not any("cd0" in a for a in _args(argv, "-blockdev") + _args(argv, "-add-fd"))
    assert 30 not in handover(spec).all()


def test_cdrom_fds_must_match_the_trays() -> None:
    spec, host = SPECS["empty-tray"]
    with pytest.raises(ValueError, match="empty tray"):
        qemu_argv(spec, PATHS, host, HandOver(3, 4, 5, 6, disks=handover(spec).disks, cdroms=(9,)))
    with pytest.raises(ValueError, match="per CD-ROM"):
        qemu_argv(spec, PATHS, host, HandOver(3, 4, 5, 6, disks=handover(spec).disks))
    bad = spec.model_copy(update={"cdroms": [CdromSpec(name="cd6")]})
    with pytest.raises(ValueError, match="AHCI"):
        qemu_argv(bad, PATHS, host, HandOver(3, 4, 5, 6, disks=handover(spec).disks, cdroms=(None,)))


def test_option_builders_are_shared_with_qmp() -> None:
    """The same dicts go to blockdev-add/device_add (JSON) and to the command line (dotted, on/off)."""
    disk = DiskSpec(name="disk3", path="/x", format="qcow2")
    bds = disk_blockdevs(disk, "/dev/fdset/7", [("/dev/fdset/6", "qcow2"), ("/dev/fdset/5", "raw")])
    assert [b["node-name"] for b in bds] == ["disk3-b2-file", "disk3-b2", "disk3-b1-file", "disk3-b1",
                                             "disk3-file", "disk3"]  # fmt: skip
    assert bds[1] == {"driver": "raw", "file": "disk3-b2-file", "node-name": "disk3-b2", "read-only": True}
    assert bds[3]["backing"] == "disk3-b2" and bds[5]["backing"] == "disk3-b1"
    assert bds[4] == {"driver": "file", "filename": "/dev/fdset/7", "node-name": "disk3-file",
                      "cache": {"direct": False}, "discard": "unmap"}  # fmt: skip
    assert qemu_opts(bds[4]) == "driver=file,filename=/dev/fdset/7,node-name=disk3-file,cache.direct=off,discard=unmap"
    assert device_opts(disk_device("disk3", "hp0")) == "virtio-blk-pci,drive=disk3,id=disk3-dev,bus=hp0"
    assert qemu_opts(cdrom_blockdevs("cd0-g1", "/dev/fdset/9")[1]) == (
        "driver=raw,file=cd0-g1-file,node-name=cd0-g1,read-only=on"
    )
    ro = disk_blockdevs(disk.model_copy(update={"readonly": True}), "/dev/fdset/7")
    assert all(b["read-only"] is True for b in ro) and not any("discard" in b for b in ro)
    with pytest.raises(ValueError, match="node name"):
        disk_blockdevs(DiskSpec(path="/x", format="raw"), "/dev/fdset/1")


def test_a_nic_and_its_tap_must_match() -> None:
    spec, host = SPECS["network-nics"]
    fds = handover(spec)
    with pytest.raises(ValueError, match="one tap"):
        qemu_argv(spec, PATHS, host, dataclasses.replace(fds, nics=fds.nics[:2]))
    with pytest.raises(ValueError, match="needs its tap"):
        qemu_argv(spec, PATHS, host, dataclasses.replace(fds, nics=(None, 41, None)))


def test_incoming_waits_for_a_saved_state() -> None:
    """A restore's QEMU waits for its state (-incoming) and, like every start, for `cont` (-S): no guest code
    runs before the state is loaded."""
    spec, host = SPECS["demo"]
    plain = qemu_argv(spec, PATHS, host, handover(spec))
    argv = qemu_argv(spec, PATHS, host, handover(spec), incoming="defer")
    assert argv == [*plain, "-incoming", "defer"] and "-S" in argv
    assert qemu_argv(spec, PATHS, host, handover(spec), incoming="fd:12")[-2:] == ["-incoming", "fd:12"]
    for bad in ("tcp:0:4444", "exec:cat /etc/shadow", "fd:", "fd:3,x", "defer\n"):
        with pytest.raises(ValueError, match="incoming"):
            qemu_argv(spec, PATHS, host, handover(spec), incoming=bad)
    with pytest.raises(ValueError, match="not both"):
        qemu_argv(spec, PATHS, host, handover(spec), incoming="defer", loadvm="s1")


def test_a_hot_plugged_machine_is_rebuilt_port_for_port() -> None:
    """After hot-plugs the running machine keeps its ports (a detached disk's too), and the new devices sit on
    spare ones: a migration's destination or a restore must build exactly that; a cold start starts afresh."""
    spec, host = SPECS["readonly-disk"]
    booted = machine_ports(spec)
    assert booted == ["disk0-port", "disk1-port", *(spare_port_id(i) for i in range(SPARE_PORTS))]
    # disk1 detached, then disk2 plugged onto the first spare port.
    running = spec.model_copy(
        update={
            "ports": booted,
            "disks": [spec.disks[0], DiskSpec(name="disk2", path="/data/new.raw", format="raw", port="hp0")],
        }
    )
    argv = qemu_argv(running, PATHS, host, handover(running))
    assert [d.split(",id=")[1].split(",")[0] for d in _args(argv, "-device") if d.startswith("pcie-root-port")] == (
        booted
    )
    assert any(d.startswith("virtio-blk-pci,drive=disk2,") and "bus=hp0" in d for d in _args(argv, "-device"))
    fresh = cold(running)
    assert fresh.ports is None and all(d.port is None for d in fresh.disks)
    assert machine_ports(fresh)[:2] == ["disk0-port", "disk2-port"]
    assert cold(spec) is spec  # nothing to undo
