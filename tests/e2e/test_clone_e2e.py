"""VM clones on real QEMU with the demo guest: full and linked, from a running and from a shut-off source; each
clone boots on its own and writes never cross between it and its source (markers on the disk, read through
the guest agent); a daemon killed half-way leaves the source as it was."""

from __future__ import annotations

from tests.conftest import Daemon
from tests.e2e.guest import boot
from tests.e2e.test_snapshots_e2e import (
    check_images,
    crash_during,
    j,
    marker,
    running_with_agent,
    write_marker,
)


def start(d: Daemon, name: str) -> None:
    d.cli("vm", "start", name)
    running_with_agent(d, name)


def disk0(d: Daemon, name: str) -> dict:
    return next(x for x in j(d, "vm", "disks", name) if x["name"] == "disk0")


def default_volumes(d: Daemon) -> set[str]:
    return {v["key"] for v in j(d, "volume", "list", "default")}


def test_full_and_linked_clones_running_and_stopped(daemon: Daemon) -> None:
    d = daemon
    src = boot(d, "src")
    running_with_agent(d, "src")
    write_marker(d, "src", "SRC1")
    before = disk0(d, "src")["volume"]

    # Full, from the running source: a temporary snapshot is merged back; the copy stands alone.
    full = j(d, "vm", "clone", "src", "full")
    assert full["uuid"] != src["uuid"] and full["state"] == "shut off"
    assert {n["mac"] for n in full["nics"]}.isdisjoint({n["mac"] for n in src["nics"]})
    assert disk0(d, "src")["volume"] == before and d.vm("src")["state"] == "running"
    assert not [k for k in default_volumes(d) if "clonetmp" in k]
    assert disk0(d, "full")["backing"] is None
    start(d, "full")
    assert marker(d, "full") == "SRC1"
    write_marker(d, "full", "FULL")
    write_marker(d, "src", "SRC2")
    assert marker(d, "full") == "FULL" and marker(d, "src") == "SRC2"

    # Linked, from the running source: both stand on its image of now, each on an overlay of its own.
    linked = j(d, "vm", "clone", "src", "linked", "--linked", "--memory", "192")
    assert linked["memory_mib"] == 192
    assert disk0(d, "src")["backing"] == before == disk0(d, "linked")["backing"]
    assert j(d, "volume", "info", before)["used_by"] == ["src (base)"]
    assert d.cli("volume", "delete", before, check=False).returncode != 0
    start(d, "linked")
    assert marker(d, "linked") == "SRC2"
    write_marker(d, "linked", "LINKED")
    write_marker(d, "src", "SRC3")
    assert marker(d, "linked") == "LINKED" and marker(d, "src") == "SRC3" and marker(d, "full") == "FULL"
    check_images(d, "src")

    # From the shut-off source, both kinds.
    d.cli("vm", "stop", "src", "--force")
    j(d, "vm", "clone", "src", "off-full")
    j(d, "vm", "clone", "src", "off-linked", "--linked")
    for name in ("off-full", "off-linked"):
        start(d, name)
        assert marker(d, name) == "SRC3"
    # Bad input changes nothing.
    assert d.cli("vm", "clone", "src", "full", check=False).returncode != 0  # the name is taken
    assert d.cli("vm", "clone", "nosuch", "x", check=False).returncode != 0
    assert d.cli("vm", "clone", "src", "bad/name", check=False).returncode != 0

    # The source's bases stay while a linked clone stands on them.
    res = d.cli("vm", "delete", "src", check=False)
    assert res.returncode != 0 and "backs" in res.stderr
    for name in ("full", "linked", "off-full", "off-linked"):
        d.cli("vm", "stop", name, "--force")
        d.cli("vm", "delete", name)
    d.cli("vm", "delete", "src")
    assert default_volumes(d) == set()


def test_clone_killed_half_way(daemon: Daemon) -> None:
    d = daemon
    boot(d, "csrc")
    running_with_agent(d, "csrc")
    write_marker(d, "csrc", "KEEP")
    before = disk0(d, "csrc")["volume"]
    # Killed while the guest writes into the temporary overlays: they are merged back, no clone is left.
    crash_during(d, "clone-temp-snapshot", "vm", "clone", "csrc", "c1")
    assert [v["name"] for v in j(d, "vm", "list")].count("c1") == 0
    assert disk0(d, "csrc")["volume"] == before and d.vm("csrc")["state"] == "running"
    assert default_volumes(d) == {before}
    running_with_agent(d, "csrc")
    assert marker(d, "csrc") == "KEEP"
    # Killed after the copies were made: the clone is finished at the next start.
    crash_during(d, "clone-made", "vm", "clone", "csrc", "c2")
    start(d, "c2")
    assert marker(d, "c2") == "KEEP"
    check_images(d, "csrc")
    for name in ("c2", "csrc"):
        d.cli("vm", "stop", name, "--force")
        d.cli("vm", "delete", name)
