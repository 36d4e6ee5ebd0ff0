"""Save and restore on real QEMU with the demo guest (virsh save / restore / managedsave), checked from inside it:
a counter process in its RAM (its root is an initramfs) goes on from where it was, or starts afresh."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from pathlib import Path

from tests.conftest import Daemon
from tests.e2e.guest import boot
from tests.e2e.test_snapshots_e2e import counter, crash_during, j, running_with_agent, start_counter, wait_for


def volumes(d: Daemon) -> dict[str, dict]:
    return {v["key"]: v for v in j(d, "volume", "list")}


def no_leftovers(d: Daemon) -> None:
    """No journal left, and every file in pool default is a volume (no temporary file of a save)."""
    con = sqlite3.connect(d.state_dir / "vmkit.db")
    try:
        assert con.execute("SELECT vm, data FROM journal").fetchall() == []
    finally:
        con.close()
    names = {p.name for p in (d.state_dir / "pools" / "default").iterdir()}
    assert names == {k.split("/", 1)[1] for k in volumes(d) if k.startswith("default/")}, names


def resumed_from(d: Daemon, name: str, before: int) -> int:
    """The counter after a restore: from where it was when saved (no reset), and going on."""
    running_with_agent(d, name)
    back = counter(d, name)
    assert back >= before, (before, back)
    # Saved within a second or so of reading `before`: a counter that restarted from 0 would be far below it.
    assert back < before + 40, (before, back)
    wait_for(lambda: counter(d, name) > back, f"{name}: the counter did not go on after the restore")
    return back


def test_save_and_restore(daemon: Daemon) -> None:
    d = daemon
    boot(d, "sv")
    running_with_agent(d, "sv")
    start_counter(d, "sv")
    wait_for(lambda: counter(d, "sv") > 10, "the counter is slow")

    before = counter(d, "sv")
    t0 = time.monotonic()
    s = j(d, "vm", "save", "sv")
    saved_s = time.monotonic() - t0
    assert s["volume"] == "default/sv.save" and s["vm"] == "sv" and s["state"] == "running" and not s["managed"]
    vm = d.vm("sv")
    assert (vm["state"], vm["reason"]) == ("shut off", "saved")
    vol = j(d, "volume", "info", "default/sv.save")
    assert vol["format"] == "save" and vol["used_by"] == []
    assert [x["volume"] for x in j(d, "vm", "saves", "sv")] == ["default/sv.save"]

    # A save volume is no disk: every tool that would use or rewrite one refuses it, saying what it is.
    for args in (("volume", "clone", "default/sv.save", "c.qcow2"), ("volume", "resize", "default/sv.save",
                 "--size", "1G"), ("volume", "convert", "default/sv.save", "--format", "raw"),
                 ("vm", "attach-disk", "sv", "default/sv.save"),
                 ("vm", "create", "sv2", "--image", "default/sv.save")):  # fmt: skip
        res = d.cli(*args, check=False)
        assert res.returncode != 0 and "saved VM state" in res.stderr, (args, res.stderr)
    # A save file dropped into a pool is adopted as one.
    shutil.copy(vol["path"], d.state_dir / "pools" / "default" / "copy.bin")
    j(d, "pool", "refresh", "default")
    assert j(d, "volume", "info", "default/copy.bin")["format"] == "save"
    assert j(d, "vm", "saves")[0]["vm"] == "sv"
    d.cli("volume", "delete", "default/copy.bin")

    t0 = time.monotonic()
    vm = j(d, "vm", "restore", "default/sv.save")
    restored_s = time.monotonic() - t0
    assert (vm["state"], vm["reason"]) == ("running", "restored")
    back = resumed_from(d, "sv", before)
    print(f"\nsave {saved_s:.3f} s, restore {restored_s:.3f} s (CLI round trips included); counter {before} → {back}")
    # The save volume is kept (virsh keeps the file); a running VM cannot be restored over.
    assert "default/sv.save" in volumes(d)
    res = d.cli("vm", "restore", "default/sv.save", check=False)
    assert res.returncode != 0 and "needs it shut off" in res.stderr, res.stderr
    # Bad input changes nothing.
    for args, words in ((("vm", "save", "sv", "default/sv.save"), "already exists"),
                        (("vm", "save", "sv", "nopool/x.save"), "no pool"),
                        (("vm", "save", "sv", "x"), "POOL/NAME"),
                        (("vm", "restore", "default/nosuch.save"), "no volume"),
                        (("vm", "restore", "default/sv-disk0.qcow2"), "not a saved VM state"),
                        (("vm", "save", "nosuchvm"), "no VM named")):  # fmt: skip
        res = d.cli(*args, check=False)
        assert res.returncode != 0 and words in res.stderr, (args, res.stderr)
    assert d.vm("sv")["state"] == "running"

    # A paused VM is saved paused, into the volume named, and comes back paused.
    d.cli("vm", "pause", "sv")
    s = j(d, "vm", "save", "sv", "default/sv-paused.save")
    assert s["state"] == "paused" and d.vm("sv")["state"] == "shut off"
    vm = j(d, "vm", "restore", "default/sv-paused.save")
    assert vm["state"] == "paused"
    time.sleep(0.5)
    assert d.vm("sv")["state"] == "paused"  # it stays paused
    d.cli("vm", "resume", "sv")
    running_with_agent(d, "sv")
    assert counter(d, "sv") >= back
    # A VM deleted and made again under the same name is another VM: the old save is not its.
    d.cli("vm", "stop", "sv", "--force")
    d.cli("vm", "delete", "sv")
    assert {"default/sv.save", "default/sv-paused.save"} <= set(volumes(d))  # saves are the user's files
    d.cli("vm", "create", "sv", "--image", "demo", "--memory", "256")
    res = d.cli("vm", "restore", "default/sv.save", check=False)
    assert res.returncode != 0 and "no longer exists" in res.stderr, res.stderr
    d.cli("vm", "delete", "sv")
    d.cli("volume", "delete", "default/sv.save")
    d.cli("volume", "delete", "default/sv-paused.save")
    no_leftovers(d)


def test_managed_save(daemon: Daemon) -> None:
    d = daemon
    boot(d, "ms")
    running_with_agent(d, "ms")
    start_counter(d, "ms")
    before = counter(d, "ms")
    vm = j(d, "vm", "stop", "--save", "ms")
    assert vm["state"] == "saved"
    saves = j(d, "vm", "saves", "ms")
    assert len(saves) == 1 and saves[0]["managed"] and saves[0]["state"] == "running"
    key = saves[0]["volume"]
    assert key == "default/ms.managedsave"
    assert j(d, "volume", "info", key)["used_by"] == ["ms (managed save)"]
    res = d.cli("volume", "delete", key, check=False)
    assert res.returncode != 0 and "managed save" in res.stderr, res.stderr
    # A revert would change the disks under the saved guest: refused (a snapshot of them is fine).
    assert j(d, "snapshot", "create", "ms", "s0")["state"] == "shut off"
    res = d.cli("snapshot", "revert", "ms", "s0", check=False)
    assert res.returncode != 0 and "managed save" in res.stderr, res.stderr
    d.cli("snapshot", "delete", "ms", "s0")
    # The next start resumes it, and the managed save is gone.
    vm = j(d, "vm", "start", "ms")
    assert (vm["state"], vm["reason"]) == ("running", "restored")
    resumed_from(d, "ms", before)
    assert key not in volumes(d)

    # A change of the machine while saved: the start refuses, naming it; undone, the start resumes.
    j(d, "volume", "create", "default/ms-extra.qcow2", "--size", "16M")
    before = counter(d, "ms")
    j(d, "vm", "stop", "--save", "ms")
    j(d, "vm", "attach-disk", "ms", "default/ms-extra.qcow2")
    res = d.cli("vm", "start", "ms", check=False)
    assert res.returncode != 0 and "configuration changed" in res.stderr and "disk1 added" in res.stderr, res.stderr
    assert "managedsave-remove" in res.stderr and d.vm("ms")["state"] == "saved"
    d.cli("vm", "detach-disk", "ms", "disk1")
    j(d, "vm", "start", "ms")
    resumed_from(d, "ms", before)
    d.cli("volume", "delete", "default/ms-extra.qcow2")

    # managedsave-remove: the saved state is discarded, and the next start boots afresh (no counter).
    j(d, "vm", "stop", "--save", "ms")
    vm = j(d, "vm", "managedsave-remove", "ms")
    assert vm["state"] == "shut off" and not [k for k in volumes(d) if k.endswith(".managedsave")]
    res = d.cli("vm", "managedsave-remove", "ms", check=False)
    assert res.returncode != 0 and "no managed save" in res.stderr
    d.cli("vm", "start", "ms")
    running_with_agent(d, "ms")
    assert counter(d, "ms") == 0
    # Deleting a saved VM deletes its managed save.
    j(d, "vm", "stop", "--save", "ms")
    d.cli("vm", "delete", "ms")
    assert not [k for k in volumes(d) if k.startswith("default/ms")]
    no_leftovers(d)


def test_daemon_killed_during_save_and_restore(daemon: Daemon) -> None:
    d = daemon
    boot(d, "kill")
    running_with_agent(d, "kill")
    start_counter(d, "kill")
    # Killed with the guest stopped, or with its state written but not yet a volume: the save did not happen,
    # and the VM goes on running where it was.
    for step in ("save-stopped", "save-migrated"):
        before = counter(d, "kill")
        crash_during(d, step, "vm", "stop", "--save", "kill")
        assert d.vm("kill")["state"] == "running", step
        resumed_from(d, "kill", before)
        assert not [k for k in volumes(d) if k.endswith(".managedsave")], step
        no_leftovers(d)
    # Killed once the state is a volume: the save stands, and the start resumes from it.
    before = counter(d, "kill")
    crash_during(d, "save-written", "vm", "stop", "--save", "kill")
    assert d.vm("kill")["state"] == "saved"
    no_leftovers(d)
    # Killed during the start, with the state loaded but the guest not yet running: it runs after the restart.
    crash_during(d, "restore-loaded", "vm", "start", "kill")
    assert d.vm("kill")["state"] == "running"
    resumed_from(d, "kill", before)
    assert not [k for k in volumes(d) if k.endswith(".managedsave")]
    no_leftovers(d)
    # The same for a plain save: killed after it was written, the VM is shut off with its save.
    before = counter(d, "kill")
    crash_during(d, "save-written", "vm", "save", "kill")
    assert (d.vm("kill")["state"], d.vm("kill")["reason"]) == ("shut off", "saved")
    crash_during(d, "restore-loaded", "vm", "restore", "default/kill.save")
    assert d.vm("kill")["state"] == "running"
    resumed_from(d, "kill", before)
    assert "default/kill.save" in volumes(d)
    no_leftovers(d)
    d.cli("vm", "stop", "kill", "--force")
    d.cli("vm", "delete", "kill")
    d.cli("volume", "delete", "default/kill.save")


def test_disk_full_is_a_clean_error(daemon: Daemon, tmp_path: Path) -> None:
    from tests.integration.test_storage_fake import small_fs

    d = daemon
    with small_fs(tmp_path / "tiny", "8m") as where:
        j(d, "pool", "create", "tiny", "--path", str(where))
        boot(d, "full")
        running_with_agent(d, "full")
        start_counter(d, "full")
        before = counter(d, "full")
        res = d.cli("vm", "save", "full", "tiny/full.save", check=False)
        assert res.returncode != 0 and "no space left in pool 'tiny'" in res.stderr, res.stderr
        assert d.vm("full")["state"] == "running"
        resumed_from(d, "full", before)
        assert list(where.iterdir()) == [] and "tiny/full.save" not in volumes(d)
        # A paused VM stays paused.
        d.cli("vm", "pause", "full")
        assert d.cli("vm", "save", "full", "tiny/full.save", check=False).returncode != 0
        assert d.vm("full")["state"] == "paused" and list(where.iterdir()) == []
        d.cli("vm", "stop", "full", "--force")
        d.cli("vm", "delete", "full")
        with contextlib.suppress(AssertionError):
            d.cli("pool", "delete", "tiny")
