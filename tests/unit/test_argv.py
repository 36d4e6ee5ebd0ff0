"""Golden tests of the QEMU argv builder. Regenerate with: VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_argv.py"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmkit.model.vm import DiskSpec, NicSpec, VmSpec
from vmkit.qemu.argv import DiskFds, HandOver, HostConfig, RuntimePaths, opt, qemu_argv

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PATHS = RuntimePaths(Path("/run/vmkit/vms/web"), Path("/var/lib/vmkit/vms/web"))
TCG = HostConfig(qemu_binary="/usr/bin/qemu-system-x86_64", accelerator="tcg")
KVM = HostConfig(qemu_binary="/usr/bin/qemu-system-x86_64", accelerator="kvm")

SPECS = {
    "minimal": (VmSpec(name="web", uuid="00000000-0000-4000-8000-000000000001", memory_mib=512, vcpus=1), TCG),
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
            disks=[DiskSpec(path="/var/lib/vmkit/vms/web/disk0.qcow2", format="qcow2", backing_image="demo")],
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
                DiskSpec(path="/data/a,b.raw", format="raw"),
                DiskSpec(path="/data/c.qcow2", format="qcow2"),
            ],
        ),
        KVM,
    ),
}


def handover(spec: VmSpec, qmp: int = 3) -> HandOver:
    """Descriptor numbers as the daemon would hand them over; the demo's disk has a one-image chain."""
    disks = tuple(
        DiskFds(20 + 2 * i, ((21 + 2 * i, "qcow2"),) if d.backing_image else ()) for i, d in enumerate(spec.disks)
    )
    kernel = (10, 11) if spec.kernel else (None, None)
    return HandOver(qmp, 4, 5, 6, kernel[0], kernel[1] if spec.initrd else None, disks)


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
        paths = [str(PATHS.run_dir), str(PATHS.vm_dir), "/data/", "/var/lib/vmkit"]
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
