"""Storage on real QEMU: the demo guest in every form (disk image, linked and copied; a real install from its
ISO onto a blank disk), CD-ROM media changes, and disk hotplug seen from inside the guest."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import Daemon
from tests.e2e.guest import boot, wait_ready


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


def wait_serial(d: Daemon, name: str, marker: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = d.cli("vm", "log", name).stdout
        if marker in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{name}: no {marker} on serial: {d.cli('vm', 'log', name).stdout[-1500:]}")


def sh(d: Daemon, name: str, script: str) -> str:
    return d.cli("vm", "exec", name, "--", "sh", "-c", script).stdout


def test_images_of_every_form(daemon: Daemon) -> None:
    images = {i["name"]: i for i in j(daemon, "image", "list")}
    assert images["demo"]["kind"] == "kernel+initrd"
    assert images["demo-disk"]["kind"] == "disk" and images["demo-installer"]["kind"] == "iso"
    vols = {v["key"]: v for v in j(daemon, "volume", "list", "images")}
    assert vols[images["demo-installer"]["iso_volume"]]["format"] == "iso"
    assert vols[images["demo-disk"]["disk_volume"]]["format"] == "qcow2"


def test_disk_image_boots_linked_and_copied(daemon: Daemon) -> None:
    d = daemon
    base = j(d, "image", "list")
    base_key = next(i for i in base if i["name"] == "demo-disk")["disk_volume"]
    linked = j(d, "vm", "create", "bd-linked", "--image", "demo-disk", "--memory", "256")
    copied = j(d, "vm", "create", "bd-copy", "--image", base_key, "--copy", "--memory", "256")
    for name in ("bd-linked", "bd-copy"):
        d.cli("vm", "start", name)
    for name in ("bd-linked", "bd-copy"):
        wait_ready(d, name)  # SeaBIOS -> syslinux -> kernel: no -kernel given
        d.cli("vm", "wait", name, "--for", "agent", "--timeout", "60")
        assert "-kernel" not in (d.run_dir / "vms" / name / "argv.json").read_text()
    assert j(d, "volume", "info", linked["disks"][0]["volume"])["backing"] == base_key
    assert j(d, "volume", "info", copied["disks"][0]["volume"])["backing"] is None
    # A guest's write lands in its own volume only; the image stays as it was.
    base_path = Path(j(d, "volume", "info", base_key)["path"])
    before = hashlib.sha256(base_path.read_bytes()).hexdigest()
    sh(d, "bd-linked", "echo linked-was-here | dd of=/dev/vda bs=1M seek=60 conv=fsync 2>/dev/null")
    assert sh(d, "bd-linked", "dd if=/dev/vda bs=1M skip=60 count=1 2>/dev/null | head -c 15") == "linked-was-here"
    assert sh(d, "bd-copy", "dd if=/dev/vda bs=1M skip=60 count=1 2>/dev/null | head -c 15") != "linked-was-here"
    for name in ("bd-linked", "bd-copy"):
        d.cli("vm", "stop", name, "--force")
        d.cli("vm", "delete", name)
    assert j(d, "volume", "info", base_key)["used_by"] == []
    assert hashlib.sha256(base_path.read_bytes()).hexdigest() == before


def test_install_from_iso_then_boot_from_disk(daemon: Daemon) -> None:
    d = daemon
    vm = j(d, "vm", "create", "inst", "--iso", "demo-installer", "--disk", "128M", "--memory", "256")
    assert [c["name"] for c in vm["cdroms"]] == ["cd0"] and vm["kernel"] is None
    disk = vm["disks"][0]["volume"]
    assert j(d, "volume", "info", disk)["allocation_bytes"] < 2 * 1024**2  # blank and thin
    d.cli("vm", "start", "inst")
    wait_serial(d, "inst", "VMKIT-INSTALL-DONE")
    assert d.wait_state("inst", "shut off", 60)["state"] == "shut off"  # the installer powered off
    assert j(d, "volume", "info", disk)["allocation_bytes"] > 4 * 1024**2  # the system is on the disk now
    drives = {x["name"]: x for x in j(d, "vm", "media", "eject", "inst")}
    assert drives["cd0"]["path"] is None
    d.cli("vm", "start", "inst")
    wait_ready(d, "inst")  # from its own disk, no CD, no -kernel
    # Media change while it runs: QEMU's tray follows.
    d.cli("vm", "media", "insert", "inst", "demo-installer")
    drives = {x["name"]: x for x in j(d, "vm", "disks", "inst")}
    assert drives["cd0"]["volume"].endswith("installer.iso")
    d.cli("vm", "media", "eject", "inst")
    assert {x["name"]: x for x in j(d, "vm", "disks", "inst")}["cd0"]["path"] is None
    d.cli("vm", "stop", "inst", "--force")


def test_disk_hotplug_seen_by_the_guest(daemon: Daemon) -> None:
    d = daemon
    boot(d, "hp")
    d.cli("vm", "wait", "hp", "--for", "agent", "--timeout", "60")
    j(d, "volume", "create", "default/hp-data.qcow2", "--size", "16M")
    assert "vdb" not in sh(d, "hp", "ls /sys/block")
    drives = {x["name"]: x for x in j(d, "vm", "attach-disk", "hp", "default/hp-data.qcow2")}
    assert drives["disk1"]["volume"] == "default/hp-data.qcow2"
    deadline = time.monotonic() + 30
    while "vdb" not in sh(d, "hp", "ls /sys/block") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "vdb" in sh(d, "hp", "ls /sys/block")
    sh(d, "hp", "echo vmkit-hotplug-marker | dd of=/dev/vdb conv=fsync 2>/dev/null")
    d.cli("vm", "detach-disk", "hp", "default/hp-data.qcow2", timeout_s=90)
    assert "vdb" not in sh(d, "hp", "ls /sys/block")
    assert j(d, "volume", "info", "default/hp-data.qcow2")["used_by"] == []
    d.cli("vm", "attach-disk", "hp", "default/hp-data.qcow2")
    deadline = time.monotonic() + 30
    while "vdb" not in sh(d, "hp", "ls /sys/block") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert sh(d, "hp", "head -c 20 /dev/vdb") == "vmkit-hotplug-marker"
    # Kept for the next boot too.
    d.cli("vm", "stop", "hp", "--force")
    assert [x["name"] for x in j(d, "vm", "disks", "hp")] == ["disk0", "disk1"]
