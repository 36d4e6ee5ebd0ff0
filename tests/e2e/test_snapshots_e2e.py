"""Snapshots on real QEMU with the demo guest, checked from inside it through its agent: a marker written to
its disk between snapshots says which disk state it has, and a counter process in its RAM (its root is an
initramfs) says which memory state it has."""

from __future__ import annotations

import json
import time
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
    assert s2["kind"] == "external" and not s2["memory"] and s2["parent"] == "s1"
    disk = next(x for x in j(d, "vm", "disks", "tree") if x["name"] == "disk0")
    assert disk["backing"] == s2["disks"][0]["volume"] and disk["format"] == "qcow2"
    write_marker(d, "tree", "D")
    j(d, "snapshot", "create", "tree", "s3", "--disk-only")
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
    # Delete the rest, the internal one while running.
    for name in ("s3", "s1", "s4"):
        d.cli("snapshot", "delete", "tree", name)
    assert snaps(d, "tree") == {}
    check_images(d, "tree")
    assert marker(d, "tree") == "A"
    d.cli("vm", "stop", "tree", "--force")
    before_delete = {v["key"] for v in j(d, "volume", "list", "default")}
    assert any(k.startswith("default/tree-") for k in before_delete)
    d.cli("vm", "delete", "tree")
    assert not [v["key"] for v in j(d, "volume", "list", "default") if v["key"].startswith("default/tree-")]
