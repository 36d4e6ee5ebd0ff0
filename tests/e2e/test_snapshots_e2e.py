"""Snapshots on real QEMU with the demo guest, checked from inside it through its agent: a marker written to
its disk between snapshots says which disk state it has, and a counter process in its RAM (its root is an
initramfs) says which memory state it has."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import Daemon
from tests.e2e.guest import boot

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done"


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


def sh(d: Daemon, name: str, script: str) -> str:
    return d.cli("vm", "exec", name, "--", "sh", "-c", script).stdout


def start_counter(d: Daemon, name: str) -> None:
    sh(d, name, f"({COUNTER}) </dev/null >/dev/null 2>&1 &")
    wait_for(lambda: counter(d, name) > 0, f"{name}: the counter did not start")


def counter(d: Daemon, name: str) -> int:
    out = sh(d, name, "cat /run/counter 2>/dev/null || echo 0").strip()
    return int(out or 0)


def wait_for(ok: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.1)
    raise AssertionError(what)


def write_marker(d: Daemon, name: str, text: str) -> None:
    sh(d, name, f"printf '%-16s' {text} | dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null")


def marker(d: Daemon, name: str) -> str:
    return sh(d, name, "dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 16").strip()


def running_with_agent(d: Daemon, name: str) -> None:
    d.cli("vm", "wait", name, "--for", "agent", "--timeout", "90")


def snaps(d: Daemon, name: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in j(d, "snapshot", "list", name)}


def check_images(d: Daemon, name: str) -> None:
    """qemu-img check is clean on every image the VM's disks and snapshots use."""
    import subprocess

    keys = {x["volume"] for x in j(d, "vm", "disks", name) if x["device"] == "disk"}
    for s in j(d, "snapshot", "list", name):
        keys |= {x["volume"] for x in s["disks"]}
    for key in keys:
        info = j(d, "volume", "info", key)
        for img in [{"path": info["path"], "format": info["format"]}, *info["chain"]]:
            if img["format"] != "qcow2":
                continue  # raw images have no metadata to check
            res = subprocess.run(["qemu-img", "check", "-U", "-f", img["format"], img["path"]], capture_output=True)
            assert res.returncode == 0, (img, res.stdout, res.stderr)


def test_snapshot_tree_internal_and_external(daemon: Daemon) -> None:
    d = daemon
    boot(d, "tree")
    running_with_agent(d, "tree")
    start_counter(d, "tree")
    write_marker(d, "tree", "A")

    # Internal, with RAM: the counter and the disk come back as they were.
    before = counter(d, "tree")
    s1 = j(d, "snapshot", "create", "tree", "s1", "--description", "first")
    assert s1["kind"] == "internal" and s1["memory"] and s1["state"] == "running" and s1["current"]
    after = counter(d, "tree")
    write_marker(d, "tree", "B")
    wait_for(lambda: counter(d, "tree") > after + 20, "the counter stopped")
    late = counter(d, "tree")
    vm = j(d, "snapshot", "revert", "tree", "s1")
    assert vm["state"] == "running"
    running_with_agent(d, "tree")
    back = counter(d, "tree")
    assert before <= back < late, (before, back, late)
    wait_for(lambda: counter(d, "tree") > back, "the counter did not continue after the revert")
    assert marker(d, "tree") == "A"

    # External, live: overlays on the disk, the old image a read-only backing file.
    write_marker(d, "tree", "C")
    s2 = j(d, "snapshot", "create", "tree", "s2", "--disk-only", "--atomic")
    assert s2["kind"] == "external" and not s2["memory"] and s2["parent"] == "s1" and s2["quiesced"]
    disk = next(x for x in j(d, "vm", "disks", "tree") if x["name"] == "disk0")
    assert disk["backing"] == s2["disks"][0]["volume"] and disk["format"] == "qcow2"
    write_marker(d, "tree", "D")
    assert not j(d, "snapshot", "create", "tree", "s3", "--disk-only", "--no-quiesce")["quiesced"]
    write_marker(d, "tree", "E")
    tree = d.cli("snapshot", "list", "tree", "--tree").stdout
    assert "s3 *" in tree and tree.index("s1") < tree.index("s2") < tree.index("s3"), tree

    # Revert to a disk-only snapshot leaves the VM shut off on fresh overlays; other branches stay.
    vm = j(d, "snapshot", "revert", "tree", "s2")
    assert vm["state"] == "shut off"
    d.cli("vm", "start", "tree")
    running_with_agent(d, "tree")
    assert marker(d, "tree") == "C"
    write_marker(d, "tree", "F")
    j(d, "snapshot", "create", "tree", "s4", "--disk-only")  # a second branch under s2
    assert snaps(d, "tree")["s2"]["children"] == ["s3", "s4"]
    j(d, "snapshot", "revert", "tree", "s3")
    d.cli("vm", "start", "tree")
    running_with_agent(d, "tree")
    assert marker(d, "tree") == "D"

    # Delete a middle snapshot while the VM runs: every other one stays revertable with its data.
    d.cli("snapshot", "delete", "tree", "s2")
    left = snaps(d, "tree")
    assert set(left) == {"s1", "s3", "s4"} and left["s3"]["parent"] == "s1" and left["s4"]["parent"] == "s1"
    check_images(d, "tree")
    assert marker(d, "tree") == "D"
    j(d, "snapshot", "revert", "tree", "s4")
    d.cli("vm", "start", "tree")
    running_with_agent(d, "tree")
    assert marker(d, "tree") == "F"
    j(d, "snapshot", "revert", "tree", "s1")
    running_with_agent(d, "tree")
    assert marker(d, "tree") == "A"
    # A snapshot of a paused VM comes back paused.
    d.cli("vm", "pause", "tree")
    assert j(d, "snapshot", "create", "tree", "p1")["state"] == "paused"
    d.cli("vm", "resume", "tree")
    assert j(d, "snapshot", "revert", "tree", "p1")["state"] == "paused"
    d.cli("vm", "resume", "tree")
    running_with_agent(d, "tree")
    assert marker(d, "tree") == "A"
    # Delete the rest, the internal ones while running.
    for name in ("s3", "p1", "s1", "s4"):
        d.cli("snapshot", "delete", "tree", name)
    assert snaps(d, "tree") == {}
    check_images(d, "tree")
    assert marker(d, "tree") == "A"
    d.cli("vm", "stop", "tree", "--force")
    before_delete = {v["key"] for v in j(d, "volume", "list", "default")}
    assert any(k.startswith("default/tree-") for k in before_delete)
    d.cli("vm", "delete", "tree")
    assert not [v["key"] for v in j(d, "volume", "list", "default") if v["key"].startswith("default/tree-")]


def tags(path: str) -> set[str]:
    import subprocess

    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True).stdout
    return {s["name"] for s in json.loads(out).get("snapshots") or []}


def test_refusals_raw_disks_offline_work_and_internal_below_an_overlay(daemon: Daemon) -> None:
    d = daemon
    boot(d, "mix", "--disk", "32M,format=raw")
    running_with_agent(d, "mix")
    # Internal snapshots need qcow2: the raw disk is named, and nothing changes.
    res = d.cli("snapshot", "create", "mix", "bad", check=False)
    assert res.returncode != 0 and "disk1" in res.stderr and "raw" in res.stderr
    assert snaps(d, "mix") == {}
    for bad in ("123", "../x", "a b"):
        res = d.cli("snapshot", "create", "mix", bad, check=False)
        assert res.returncode != 0 and "invalid snapshot name" in res.stderr, res.stderr
    assert d.cli("snapshot", "revert", "mix", "nosuch", check=False).returncode != 0
    assert d.cli("snapshot", "delete", "nosuchvm", "x", check=False).returncode != 0
    # A disk-only snapshot takes raw disks too: each gets a qcow2 overlay.
    e1 = j(d, "snapshot", "create", "mix", "e1", "--disk-only")
    assert {x["disk"] for x in e1["disks"]} == {"disk0", "disk1"}
    assert d.cli("snapshot", "create", "mix", "e1", "--disk-only", check=False).returncode != 0  # taken
    disks = {x["name"]: x for x in j(d, "vm", "disks", "mix")}
    assert disks["disk1"]["format"] == "qcow2" and disks["disk1"]["backing"].endswith(".raw")
    # Now every disk is qcow2: an internal snapshot of the running VM, then a disk-only one above it.
    write_marker(d, "mix", "I2")
    j(d, "snapshot", "create", "mix", "i2")
    i2_images = [x["volume"] for x in snaps(d, "mix")["i2"]["disks"]]
    j(d, "snapshot", "create", "mix", "e2", "--disk-only")
    write_marker(d, "mix", "AFTER")
    # Deleting i2 while running: its tag lives in images QEMU now reads as backing files.
    d.cli("snapshot", "delete", "mix", "i2")
    for key in i2_images:
        assert "i2" not in tags(j(d, "volume", "info", key)["path"])
    check_images(d, "mix")
    assert marker(d, "mix") == "AFTER"
    # Offline: an internal snapshot of the shut-off VM (disks only), a revert and a middle delete by qemu-img.
    d.cli("vm", "stop", "mix", "--force")
    off = j(d, "snapshot", "create", "mix", "off1")
    assert off["state"] == "shut off" and not off["memory"] and off["parent"] == "e2"
    d.cli("vm", "start", "mix")
    running_with_agent(d, "mix")
    write_marker(d, "mix", "LATER")
    d.cli("vm", "stop", "mix", "--force")
    assert j(d, "snapshot", "revert", "mix", "off1")["state"] == "shut off"
    d.cli("snapshot", "delete", "mix", "e2")  # middle, offline
    check_images(d, "mix")
    d.cli("vm", "start", "mix")
    running_with_agent(d, "mix")
    assert marker(d, "mix") == "AFTER"
    d.cli("vm", "stop", "mix", "--force")
    d.cli("vm", "delete", "mix")
    assert not [v["key"] for v in j(d, "volume", "list", "default") if v["key"].startswith("default/mix-")]


def crash_during(d: Daemon, step: str, *cmd: str) -> None:
    """Run cmd on a daemon that kills itself (-9) at `step`, then start it again (it finishes or undoes)."""
    with d.dying_at(step):
        assert d.cli(*cmd, check=False).returncode != 0, f"{step}: the daemon did not die at it"


def consistent(d: Daemon, name: str) -> dict[str, dict[str, Any]]:
    """The snapshot list matches the files: each snapshot's images exist (internal ones hold its tag), no
    volume file is without its row or row without its file, no journal is left, every qcow2 is clean."""
    import sqlite3

    vols = {v["key"]: v for v in j(d, "volume", "list")}
    listed = snaps(d, name)
    for s in listed.values():
        for disk in s["disks"]:
            assert disk["volume"] in vols, (s["name"], disk)
            if s["kind"] == "internal":
                assert s["name"] in tags(vols[disk["volume"]]["path"]), (s["name"], disk)
    pool = d.state_dir / "pools" / "default"
    assert {p.name for p in pool.iterdir()} == {k.split("/", 1)[1] for k in vols if k.startswith("default/")}
    con = sqlite3.connect(d.state_dir / "vmkit.db")
    try:
        assert con.execute("SELECT vm, data FROM journal").fetchall() == []
    finally:
        con.close()
    check_images(d, name)
    return listed


def test_daemon_killed_at_each_step(daemon: Daemon) -> None:
    d = daemon
    boot(d, "crash")
    running_with_agent(d, "crash")
    write_marker(d, "crash", "BASE")
    # Create, internal with RAM: killed before QEMU saves (QEMU has not started the job).
    crash_during(d, "snapshot-create", "snapshot", "create", "crash", "c1")
    assert "c1" not in consistent(d, "crash")
    assert d.vm("crash")["state"] == "running"
    # Create, external: killed with the overlays made but not yet under the guest → undone.
    crash_during(d, "snapshot-external-overlays", "snapshot", "create", "crash", "x1", "--disk-only")
    assert "x1" not in consistent(d, "crash")
    # … and killed right after QEMU switched to them → kept.
    crash_during(d, "snapshot-external-switched", "snapshot", "create", "crash", "x1", "--disk-only")
    assert consistent(d, "crash")["x1"]["current"]
    assert next(x for x in j(d, "vm", "disks", "crash") if x["name"] == "disk0")["backing"].endswith("disk0.qcow2")
    running_with_agent(d, "crash")
    write_marker(d, "crash", "AFTER-X1")
    j(d, "snapshot", "create", "crash", "x2", "--disk-only")
    # Revert killed after QEMU was stopped, and killed after the new spec was committed: both finish.
    crash_during(d, "snapshot-revert", "snapshot", "revert", "crash", "x1")
    listed = consistent(d, "crash")
    assert listed["x1"]["current"] and d.vm("crash")["state"] == "shut off"
    crash_during(d, "snapshot-revert-committed", "snapshot", "revert", "crash", "x2")
    assert consistent(d, "crash")["x2"]["current"]
    # Delete of a middle snapshot killed after its image was merged into the one above: finished at start.
    crash_during(d, "snapshot-delete-merged", "snapshot", "delete", "crash", "x1")
    assert set(consistent(d, "crash")) == {"x2"}
    d.cli("vm", "start", "crash")
    running_with_agent(d, "crash")
    assert marker(d, "crash") == "AFTER-X1"
    d.cli("vm", "stop", "crash", "--force")
    d.cli("vm", "delete", "crash")


def test_disk_full_is_a_clean_error(daemon: Daemon, tmp_path: Path) -> None:
    from tests.integration.test_storage_fake import small_fs

    d = daemon
    with small_fs(tmp_path / "tiny", "8m") as where:
        j(d, "pool", "create", "tiny", "--path", str(where))
        boot(d, "full", "--disk", "4M,pool=tiny")
        running_with_agent(d, "full")
        write_marker(d, "full", "FULL")
        before = {v["key"] for v in j(d, "volume", "list")}
        # Fill the pool's filesystem to the last block.
        with contextlib.suppress(OSError), open(where / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
        for args in (("x1", "--disk-only"), ("i1",)):
            res = d.cli("snapshot", "create", "full", *args, check=False)
            assert res.returncode != 0 and "space" in res.stderr.lower(), res.stderr
            assert snaps(d, "full") == {}
            assert {v["key"] for v in j(d, "volume", "list")} == before
            for key in before:
                if key.startswith(("default/full-", "tiny/")):
                    assert "i1" not in tags(j(d, "volume", "info", key)["path"])
        check_images(d, "full")
        assert marker(d, "full") == "FULL" and d.vm("full")["state"] == "running"
        (where / "filler").unlink()
        j(d, "snapshot", "create", "full", "x1", "--disk-only")
        d.cli("vm", "stop", "full", "--force")
        d.cli("vm", "delete", "full")
        d.cli("pool", "delete", "tiny")


def test_live_deletes_merge_images_into_the_ones_above(daemon: Daemon) -> None:
    d = daemon
    boot(d, "lm")
    running_with_agent(d, "lm")
    for i in range(3):
        write_marker(d, "lm", f"M{i}")
        j(d, "snapshot", "create", "lm", f"s{i + 1}", "--disk-only", "--no-quiesce")
    write_marker(d, "lm", "M3")
    # A fresh QEMU opens every image below the top read-only: merging into one needs it reopened read-write.
    d.cli("vm", "stop", "lm", "--force")
    d.cli("vm", "start", "lm")
    running_with_agent(d, "lm")
    d.cli("snapshot", "delete", "lm", "s2")  # s2's image goes into s3's (read-only, below the top)
    check_images(d, "lm")
    d.cli("snapshot", "delete", "lm", "s1")  # the VM's first image into s3's, over the demo image
    check_images(d, "lm")
    assert marker(d, "lm") == "M3"
    assert list(snaps(d, "lm")) == ["s3"] and snaps(d, "lm")["s3"]["parent"] is None
    j(d, "snapshot", "revert", "lm", "s3")
    d.cli("vm", "start", "lm")
    running_with_agent(d, "lm")
    assert marker(d, "lm") == "M2"
    d.cli("snapshot", "delete", "lm", "s3")  # into the top, which the guest writes meanwhile
    write_marker(d, "lm", "M4")
    check_images(d, "lm")
    assert snaps(d, "lm") == {} and marker(d, "lm") == "M4"
    disk = next(x for x in j(d, "vm", "disks", "lm") if x["name"] == "disk0")
    assert disk["backing"].startswith("images/")  # one overlay on the demo image is all that is left
    assert len([v for v in j(d, "volume", "list", "default") if v["key"].startswith("default/lm-")]) == 1
    d.cli("vm", "stop", "lm", "--force")
    d.cli("vm", "start", "lm")
    running_with_agent(d, "lm")
    assert marker(d, "lm") == "M4"
    d.cli("vm", "stop", "lm", "--force")
    d.cli("vm", "delete", "lm")
