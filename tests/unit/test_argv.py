"""Golden tests of the QEMU argv builder. Regenerate with: VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_argv.py"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmkit.model.vm import DiskSpec, NicSpec, VmSpec
from vmkit.qemu.argv import HostConfig, RuntimePaths, opt, qemu_argv

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


@pytest.mark.parametrize("case", sorted(SPECS))
def test_golden(case: str) -> None:
    spec, host = SPECS[case]
    text = "\n".join(qemu_argv(spec, PATHS, host, qmp_fd=3)) + "\n"
    golden = GOLDEN / f"argv-{case}.txt"
    if os.environ.get("VMKIT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"argv changed; regenerate with VMKIT_REGEN_GOLDEN=1 and review {golden}"


def test_comma_in_path_is_doubled() -> None:
    spec, host = SPECS["kvm-two-disks"]
    argv = qemu_argv(spec, PATHS, host, qmp_fd=3)
    assert any("filename=/data/a,,b.raw," in a for a in argv)


def test_invariants() -> None:
    spec, host = SPECS["demo"]
    argv = qemu_argv(spec, PATHS, host, qmp_fd=7)
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


def test_state_dir_with_comma_is_escaped() -> None:
    spec, host = SPECS["minimal"]
    paths = RuntimePaths(Path("/tmp/a,b/run"), Path("/tmp/a,b/state"))
    argv = qemu_argv(spec, paths, host, qmp_fd=3)
    serial = argv[argv.index("-chardev", argv.index("-mon")) + 1]
    assert "path=/tmp/a,,b/run/serial.sock," in serial and "logfile=/tmp/a,,b/state/serial.log," in serial
