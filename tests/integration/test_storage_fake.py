"""Pools and volumes through the real daemon and CLI (real qemu-img; a fake QEMU where a VM is needed)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from vmkit.cli.client import ApiError

MiB = 1024**2


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


def fails(d: Daemon, *args: str) -> str:
    res = d.cli(*args, check=False)
    assert res.returncode != 0, f"vmkit {' '.join(args)} should have failed"
    return res.stderr


def allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def qemu_io(path: str | Path, fmt: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(path)], check=True, capture_output=True)


def compare(a: str | Path, afmt: str, b: str | Path, bfmt: str) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-f", afmt, "-F", bfmt, str(a), str(b)], capture_output=True)
    return res.returncode == 0


@contextlib.contextmanager
def small_fs(where: Path, size: str = "24m") -> Iterator[Path]:
    """A size-limited filesystem (tmpfs) to fill up; unmounted afterwards."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_builtin_pools_and_pool_commands(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    pools = {p["name"]: p for p in j(d, "pool", "list")}
    assert set(pools) == {"default", "images"}
    assert pools["default"]["active"] and pools["default"]["capacity_bytes"] > 0
    j(d, "pool", "create", "extra", "--path", str(tmp_path / "extra"))
    info = j(d, "pool", "info", "extra")
    assert info["path"] == str(tmp_path / "extra") and info["volumes"] == 0 and info["available_bytes"] > 0
    # A pool inside another (or holding one) would give a file two homes.
    assert "inside" in fails(d, "pool", "create", "nested", "--path", str(tmp_path / "extra" / "sub"))
    assert "already exists" in fails(d, "pool", "create", "extra", "--path", str(tmp_path / "x"))
    assert "invalid pool name" in fails(d, "pool", "create", "../x", "--path", str(tmp_path / "y"))
    assert "built in" in fails(d, "pool", "delete", "default")
    j(d, "volume", "create", "extra/v.qcow2", "--size", "1M")
    assert "still holds" in fails(d, "pool", "delete", "extra")
    j(d, "volume", "delete", "extra/v.qcow2")
    d.cli("pool", "delete", "extra")
    assert not (tmp_path / "extra").exists()


def test_thin_and_thick(fake_daemon: Daemon) -> None:
    d = fake_daemon
    size = 64 * MiB
    cases = {
        ("raw", "off"): "thin",
        ("raw", "falloc"): "thick",
        ("raw", "full"): "thick",
        ("qcow2", "off"): "thin",
        ("qcow2", "metadata"): "thin",
        ("qcow2", "falloc"): "thick",
    }
    for (fmt, prealloc), word in cases.items():
        v = j(
            d, "volume", "create", f"default/{fmt}-{prealloc}", "--size", "64M", "--format", fmt, "--prealloc", prealloc
        )
        assert (v["format"], v["provisioning"], v["capacity_bytes"]) == (fmt, word, size)
        # Checked from the file itself: thick reserves every byte now, thin almost nothing.
        if word == "thick":
            assert allocated(v["path"]) >= size, (fmt, prealloc)
        else:
            assert allocated(v["path"]) < 4 * MiB, (fmt, prealloc)
        assert v["allocation_bytes"] == allocated(v["path"])
    assert "no metadata" in fails(
        d, "volume", "create", "default/rm", "--size", "1M", "--format", "raw", "--prealloc", "metadata"
    )
    listed = {v["key"]: v for v in j(d, "volume", "list", "default")}
    assert listed["default/raw-full"]["provisioning"] == "thick"
    table = d.cli("volume", "list").stdout
    assert "default/qcow2-off" in table and "thin" in table and "thick" in table


def test_linked_clone_convert_resize(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    base = j(d, "volume", "create", "default/base.qcow2", "--size", "32M")
    qemu_io(base["path"], "qcow2", "write -P 0x11 0 4M")
    original = tmp_path / "base-copy.qcow2"
    subprocess.run(["cp", base["path"], str(original)], check=True)
    # A linked clone is an overlay: it reads the base, its writes stay in it.
    link = j(d, "volume", "clone", "default/base.qcow2", "link.qcow2", "--linked")
    assert link["backing"] == "default/base.qcow2" and link["format"] == "qcow2"
    qemu_io(link["path"], "qcow2", "write -P 0x22 8M 1M")
    assert compare(base["path"], "qcow2", original, "qcow2")
    info = j(d, "volume", "info", "default/link.qcow2")
    assert [c["volume"] for c in info["chain"]] == ["default/base.qcow2"]
    assert "backed by" in fails(d, "volume", "delete", "default/base.qcow2")
    assert "backs" in fails(d, "volume", "convert", "default/base.qcow2", "--format", "raw")
    # A full clone of the overlay is flattened: standalone, same content.
    full = j(d, "volume", "clone", "default/link.qcow2", "full.qcow2")
    assert full["backing"] is None and compare(full["path"], "qcow2", link["path"], "qcow2")
    # Convert round trip qcow2 -> raw (thick) -> qcow2 keeps the content.
    raw = j(d, "volume", "convert", "default/full.qcow2", "--format", "raw", "--prealloc", "falloc")
    assert (raw["format"], raw["provisioning"]) == ("raw", "thick") and allocated(raw["path"]) >= 32 * MiB
    assert compare(raw["path"], "raw", link["path"], "qcow2")
    back = j(d, "volume", "convert", "default/full.qcow2", "--format", "qcow2")
    assert back["format"] == "qcow2" and compare(back["path"], "qcow2", link["path"], "qcow2")
    subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", back["path"]], check=True)
    # Resize: grow, and shrink only when asked.
    assert j(d, "volume", "resize", "default/full.qcow2", "--size", "+16M")["capacity_bytes"] == 48 * MiB
    assert "allow-shrink" in fails(d, "volume", "resize", "default/full.qcow2", "--size", "16M")
    assert (
        j(d, "volume", "resize", "default/full.qcow2", "--size", "16M", "--allow-shrink")["capacity_bytes"] == 16 * MiB
    )
    d.cli("volume", "delete", "default/link.qcow2")
    d.cli("volume", "delete", "default/base.qcow2")


def test_import_export_and_hostile_images(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    src = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), "8M"], check=True)
    qemu_io(src, "raw", "write -P 0x5a 1M 1M")
    v = j(d, "volume", "import", "default/imported.img", str(src))
    assert (v["format"], v["capacity_bytes"]) == ("raw", 8 * MiB)
    out = tmp_path / "out.raw"
    d.cli("volume", "export", "default/imported.img", str(out))
    assert out.read_bytes() == src.read_bytes()
    assert allocated(out) < 4 * MiB  # written sparse
    q = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "16M"], check=True)
    assert j(d, "volume", "import", "images/img.qcow2", str(q))["format"] == "qcow2"
    iso = tmp_path / "cd.iso"
    (tmp_path / "isodir").mkdir()
    (tmp_path / "isodir" / "hello").write_text("hi")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), str(tmp_path / "isodir")], check=True)
    assert j(d, "volume", "import", "images/cd.iso", str(iso))["format"] == "iso"
    # --iso FILE uploads the file into pool images once; the same file again reuses that volume.
    iso2 = tmp_path / "other install.iso"
    iso2.write_bytes(iso.read_bytes())
    vm = j(d, "vm", "create", "i1", "--no-nic", "--iso", str(iso2))
    assert vm["cdroms"][0]["volume"] == "images/other_install.iso"
    res = d.cli("vm", "create", "i2", "--no-nic", "--iso", str(iso2))
    assert "already imported" in res.stderr
    assert j(d, "volume", "info", "images/other_install.iso")["used_by"] == ["i1", "i2"]
    # A qcow2 whose header names a file outside the pools is refused, and leaves nothing behind.
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(hostile), "1M"], check=True
    )
    assert "not a volume" in fails(d, "volume", "import", "default/hostile.qcow2", str(hostile))
    assert not (d.state_dir / "pools" / "default" / "hostile.qcow2").exists()
    assert [f for f in os.listdir(d.state_dir / "pools" / "default") if f.startswith(".")] == []
    # The same file dropped into the pool is not adopted either.
    os.link(hostile, d.state_dir / "pools" / "default" / "dropped.qcow2")
    res = j(d, "pool", "refresh", "default")
    assert "dropped.qcow2" in {s["name"] for s in res["skipped"]} and "dropped.qcow2" not in res["adopted"]


def test_names_paths_and_symlinks(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    for bad in ("../x", "a/b", ".hidden", "x\n"):
        with pytest.raises(ApiError) as e:
            d.api.post("/v1/pools/default/volumes", {"name": bad, "size_bytes": MiB})
        assert e.value.status == 400
    for url in ("/v1/pools/default/volumes/..%2F..%2Fvmkit.db", "/v1/pools/default/volumes/%2E%2E"):
        with pytest.raises(ApiError) as e:
            d.api.get(url)
        assert e.value.status in (400, 404)
    pool = d.state_dir / "pools" / "default"
    # A symlink in a pool, to a file outside or inside it, is never followed or adopted.
    (pool / "escape.img").symlink_to("/etc/shadow")
    (pool / "inner.img").symlink_to(pool / "nothing")
    res = j(d, "pool", "refresh", "default")
    assert {"escape.img", "inner.img"} <= {s["name"] for s in res["skipped"]}
    with pytest.raises(ApiError) as e:
        d.api.get("/v1/pools/default/volumes/escape.img/download")
    assert e.value.status in (400, 404)
    # A file dropped in is adopted with its format, detected once.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pool / "dropped.qcow2"), "2M"], check=True)
    assert j(d, "pool", "refresh", "default")["adopted"] == ["dropped.qcow2"]
    assert j(d, "volume", "info", "default/dropped.qcow2")["format"] == "qcow2"


def test_qcow2_header_written_into_a_raw_volume_gains_nothing(fake_daemon: Daemon, tmp_path: Path) -> None:
    """The libvirt CVE-2010-2237 class: a guest writes a qcow2 header naming /etc/shadow into its raw disk."""
    d = fake_daemon
    v = j(d, "volume", "create", "default/guest.raw", "--size", "4M", "--format", "raw")
    header = tmp_path / "h.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", str(header), "4M"], check=True
    )
    with open(v["path"], "r+b") as f:  # what the guest's own writes to sector 0 amount to
        f.write(header.read_bytes()[:65536])
    d.cli("pool", "refresh", "default")
    assert j(d, "volume", "info", "default/guest.raw")["format"] == "raw"
    d.cli("vm", "create", "g", "--no-nic", "--disk", "default/guest.raw")
    d.cli("vm", "start", "g")
    argv = json.loads((d.run_dir / "vms" / "g" / "argv.json").read_text())
    blockdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev"]
    assert any("driver=raw" in b and "node-name=disk0," in b for b in blockdevs), blockdevs
    assert not any("backing" in b or "disk0-b" in b for b in blockdevs), blockdevs
    d.cli("vm", "stop", "g", "--force")


def test_in_use_volumes_and_vm_disks(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    j(d, "volume", "create", "default/data.qcow2", "--size", "8M")
    iso = tmp_path / "media.iso"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "setup").write_text("install me")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), str(tmp_path / "m")], check=True)
    j(d, "volume", "import", "images/media.iso", str(iso))
    vm = j(d, "vm", "create", "inst", "--no-nic", "--iso", "images/media.iso", "--disk", "64M,prealloc=metadata",
           "--disk", "default/data.qcow2")  # fmt: skip
    assert [dk["name"] for dk in vm["disks"]] == ["disk0", "disk1"] and vm["cdroms"][0]["volume"] == "images/media.iso"
    disks = {dk["name"]: dk for dk in j(d, "vm", "disks", "inst")}
    assert disks["cd0"]["device"] == "cdrom" and disks["cd0"]["format"] == "iso"
    assert disks["disk0"]["provisioning"] == "thin" and disks["disk0"]["volume"] == "default/inst-disk0.qcow2"
    assert disks["disk1"]["owned"] is False
    assert "inst" in j(d, "volume", "info", "images/media.iso")["used_by"]
    # An ISO as a disk, a volume used by another VM, or a missing one: refused, nothing made.
    assert "ISO" in fails(d, "vm", "create", "x", "--disk", "images/media.iso")
    assert "already used" in fails(d, "vm", "create", "x", "--disk", "default/data.qcow2")
    assert "no volume" in fails(d, "vm", "create", "x", "--disk", "default/nope.qcow2")
    assert "x" not in [v["name"] for v in j(d, "vm", "list")]
    assert not any(v["key"].startswith("default/x-") for v in j(d, "volume", "list"))
    assert "use it" in fails(d, "volume", "delete", "default/data.qcow2")
    d.cli("vm", "start", "inst")
    argv = (d.run_dir / "vms" / "inst" / "argv.json").read_text()
    assert "ide-cd" in argv and "bootindex=1" in argv
    assert "running" in fails(d, "volume", "resize", "default/data.qcow2", "--size", "16M")
    # Media and disks change while it runs (QMP on the fake QEMU).
    j(d, "vm", "media", "eject", "inst")
    assert {dk["name"]: dk for dk in j(d, "vm", "disks", "inst")}["cd0"]["path"] is None
    j(d, "vm", "media", "insert", "inst", "images/media.iso")
    j(d, "volume", "create", "default/hot.qcow2", "--size", "4M")
    disks = {dk["name"]: dk for dk in j(d, "vm", "attach-disk", "inst", "default/hot.qcow2")}
    assert disks["disk2"]["volume"] == "default/hot.qcow2"
    disks = {dk["name"]: dk for dk in j(d, "vm", "detach-disk", "inst", "disk1")}
    assert "disk1" not in disks and "disk2" in disks
    d.cli("vm", "stop", "inst", "--force")
    # The next start has the disks as they were left (disk1 gone, disk2 kept under its name).
    d.cli("vm", "start", "inst")
    argv = (d.run_dir / "vms" / "inst" / "argv.json").read_text()
    assert "node-name=disk2," in argv and "node-name=disk1," not in argv
    d.cli("vm", "stop", "inst", "--force")
    d.cli("vm", "delete", "inst")
    left = {v["key"] for v in j(d, "volume", "list")}
    assert "default/inst-disk0.qcow2" not in left  # made for it: deleted with it
    assert {"default/data.qcow2", "default/hot.qcow2", "images/media.iso"} <= left  # only attached: kept


def test_full_disk_leaves_nothing(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    with small_fs(tmp_path / "small") as small:
        d.cli("pool", "create", "small", "--path", str(small))
        assert "space" in fails(d, "volume", "create", "small/big.raw", "--size", "64M", "--format", "raw",
                                "--prealloc", "full")  # fmt: skip
        src = j(d, "volume", "create", "default/src.raw", "--size", "48M", "--format", "raw")
        qemu_io(src["path"], "raw", "write -P 0x33 0 40M")
        assert "space" in fails(d, "volume", "clone", "default/src.raw", "small/copy.raw")
        # Converting in place needs room for the new copy beside the old one.
        inner = j(d, "volume", "create", "small/inner.raw", "--size", "14M", "--format", "raw")
        qemu_io(inner["path"], "raw", "write -P 0x44 0 14M")
        before = Path(inner["path"]).read_bytes()
        assert "space" in fails(d, "volume", "convert", "small/inner.raw", "--format", "qcow2", "--prealloc", "falloc")
        assert j(d, "volume", "info", "small/inner.raw")["format"] == "raw"
        assert Path(inner["path"]).read_bytes() == before
        d.cli("volume", "delete", "small/inner.raw")
        data = tmp_path / "data.raw"
        data.write_bytes(os.urandom(32 * MiB))
        assert "space" in fails(d, "volume", "import", "small/data.raw", str(data)).lower()
        assert j(d, "pool", "info", "small")["volumes"] == 0
        assert os.listdir(small) == []
        d.cli("pool", "delete", "small")


def test_crash_leftovers_are_cleaned(fake_daemon: Daemon) -> None:
    d = fake_daemon
    keep = j(d, "volume", "create", "default/keep.qcow2", "--size", "1M")
    d.kill9()
    pool = d.state_dir / "pools" / "default"
    # What a daemon killed mid-create, mid-delete and mid-convert leaves behind.
    (pool / ".vmkit-tmp.half.qcow2.1234").write_bytes(b"half")
    (pool / "creating.qcow2").write_bytes(b"renamed, not yet ready")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(pool / ".vmkit-tmp.keep.qcow2.convert"), "1M"], check=True
    )
    db = sqlite3.connect(d.state_dir / "vmkit.db")
    db.execute("INSERT INTO volumes VALUES ('default', 'creating.qcow2', 'qcow2', 'off', NULL, 'creating', 0)")
    db.execute("INSERT INTO volumes VALUES ('default', 'gone.qcow2', 'qcow2', 'off', NULL, 'deleting', 0)")
    db.execute("UPDATE volumes SET format = 'raw', state = 'converting' WHERE name = 'keep.qcow2'")
    db.commit()
    db.close()
    d.start()
    assert sorted(os.listdir(pool)) == ["keep.qcow2"]
    assert [v["key"] for v in j(d, "volume", "list", "default")] == ["default/keep.qcow2"]
    # The interrupted convert was finished: the row's new format and the file agree.
    v = j(d, "volume", "info", "default/keep.qcow2")
    assert v["format"] == "raw" and v["path"] == keep["path"]
    assert Path(v["path"]).read_bytes()[:4] != b"QFI\xfb"


def test_daemon_killed_during_a_convert(fake_daemon: Daemon) -> None:
    d = fake_daemon
    v = j(d, "volume", "create", "default/big.raw", "--size", "768M", "--format", "raw")
    qemu_io(v["path"], "raw", "write -P 0x66 0 512M")
    d.api.post("/v1/pools/default/volumes/big.raw/convert", {"format": "qcow2", "prealloc": "full"})
    pool = d.state_dir / "pools" / "default"
    deadline = time.monotonic() + 20
    while not any(f.startswith(".vmkit-tmp.") for f in os.listdir(pool)) and time.monotonic() < deadline:
        time.sleep(0.01)
    d.kill9()  # mid-convert: the new copy is half-written
    d.start()
    assert os.listdir(pool) == ["big.raw"]
    v2 = j(d, "volume", "info", "default/big.raw")
    assert v2["format"] == "raw" and v2["capacity_bytes"] == 768 * MiB
    qemu_io(v2["path"], "raw", "read -P 0x66 0 512M")


def test_a_late_unplug_is_finished(tmp_path: Path) -> None:
    from tests.conftest import FAKE_QEMU

    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "FAKE_QEMU_UNPLUG_DELAY": "1.5"})
    d.start()
    try:
        j(d, "volume", "create", "default/late.qcow2", "--size", "1M")
        d.cli("vm", "create", "lu", "--no-nic", "--disk", "1M", "--start")
        j(d, "vm", "attach-disk", "lu", "default/late.qcow2")
        # The guest takes longer than we wait: 504, the disk still there, its removal pending…
        assert "did not release" in fails(d, "vm", "detach-disk", "lu", "disk1", "--timeout", "0.3")
        assert "disk1" in {x["name"] for x in j(d, "vm", "disks", "lu")}
        # …and finished when the guest lets go.
        deadline = time.monotonic() + 10
        while "disk1" in {x["name"] for x in j(d, "vm", "disks", "lu")} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [x["name"] for x in j(d, "vm", "disks", "lu")] == ["disk0"]
        assert j(d, "volume", "info", "default/late.qcow2")["used_by"] == []
        # Paused, the guest cannot acknowledge: refused up front.
        j(d, "vm", "attach-disk", "lu", "default/late.qcow2")
        d.cli("vm", "pause", "lu")
        assert "resume it first" in fails(d, "vm", "detach-disk", "lu", "disk1")
    finally:
        d.cleanup()
