"""Save, restore and managed save against the fake QEMU (tests/fakes/fake_qemu.py): the QMP sequences, the states
and the volumes, refusals, and a daemon killed at each step. Real QEMU and a guest: tests/e2e/test_save_e2e.py."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

import pytest

from tests.conftest import Daemon
from vmkit.cli.client import ApiError


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


def qmp_log(d: Daemon, name: str) -> list[dict[str, Any]]:
    """The commands the daemon sent to the VM's QEMU in its latest run."""
    out = []
    for line in (d.state_dir / "vms" / name / "qmp.log").read_text().splitlines():
        _, arrow, msg = line.split(" ", 2)
        if arrow == "->":
            out.append(json.loads(msg))
    return out


def journal(d: Daemon) -> list[tuple[str, str]]:
    con = sqlite3.connect(d.state_dir / "vmkit.db")
    try:
        return con.execute("SELECT vm, data FROM journal").fetchall()
    finally:
        con.close()


def pool_files(d: Daemon) -> set[str]:
    return {p.name for p in (d.state_dir / "pools" / "default").iterdir()}


def new_vm(d: Daemon, name: str) -> None:
    d.api.post("/v1/vms", {"name": name, "memory_mib": 64})
    d.api.post(f"/v1/vms/{name}/start")


def test_save_restore_sequence_and_states(fake_daemon: Daemon) -> None:
    d = fake_daemon
    new_vm(d, "a")
    s = d.api.post("/v1/vms/a/save", {})
    assert s["volume"] == "default/a.save" and s["state"] == "running" and s["size_bytes"] > 4096
    sent = [m["execute"] for m in qmp_log(d, "a")]
    # Stopped first (each page written once), the bandwidth cap lifted, the descriptor named, then quit.
    i = sent.index("stop")
    assert sent[i:].index("migrate-set-parameters") < sent[i:].index("getfd") < sent[i:].index("migrate")
    assert sent[-1] == "quit" and "cont" not in sent[i:]
    params = next(m["arguments"] for m in qmp_log(d, "a") if m["execute"] == "migrate-set-parameters")
    assert params["max-bandwidth"] >= 2**62
    assert (d.vm("a")["state"], d.vm("a")["reason"]) == ("shut off", "saved")
    with open(d.state_dir / "pools" / "default" / "a.save", "rb") as f:
        assert f.read(16) == b"VMKIT-SAVE-V1\n\0\0"
        f.seek(4096)
        assert f.read(19) == b"FAKE-QEMU-VM-STATE\n"  # the stream starts on the next page

    vm = d.api.post("/v1/saves/default/a.save/restore")
    assert (vm["state"], vm["reason"]) == ("running", "restored")
    argv = json.loads((d.run_dir / "vms" / "a" / "argv.json").read_text())
    assert argv[argv.index("-incoming") + 1] == "defer"
    sent = [m["execute"] for m in qmp_log(d, "a")]
    # No `cont` before the state is loaded.
    assert sent.index("migrate-incoming") < sent.index("cont")
    assert d.api.get("/v1/saves/default/a.save")["vm"] == "a"  # kept

    # Paused: saved paused, restored paused, no cont.
    d.api.post("/v1/vms/a/pause")
    assert d.api.post("/v1/vms/a/save", {"volume": "default/p.save"})["state"] == "paused"
    assert d.api.post("/v1/saves/default/p.save/restore")["state"] == "paused"
    sent = [m["execute"] for m in qmp_log(d, "a")]
    assert "cont" not in sent
    assert journal(d) == []


def test_managed_save_start_and_delete(fake_daemon: Daemon) -> None:
    d = fake_daemon
    new_vm(d, "m")
    vm = d.api.post("/v1/vms/m/managed-save")
    assert (vm["state"], vm["pid"]) == ("saved", None)
    info = d.api.get("/v1/vms/m/managed-save")
    assert info["volume"] == "default/m.managedsave" and info["managed"]
    assert d.api.get("/v1/pools/default/volumes/m.managedsave")["used_by"] == ["m (managed save)"]
    with pytest.raises(ApiError) as e:
        d.api.request("DELETE", "/v1/pools/default/volumes/m.managedsave")
    assert e.value.status == 409
    # The daemon restarted meanwhile: still saved (a host reboot would keep it too).
    d.stop()
    d.start()
    assert d.vm("m")["state"] == "saved"
    vm = d.api.post("/v1/vms/m/start")
    assert (vm["state"], vm["reason"]) == ("running", "restored")
    assert "m.managedsave" not in pool_files(d)
    with pytest.raises(ApiError) as e:
        d.api.get("/v1/vms/m/managed-save")
    assert e.value.status == 404
    # Managed save, then remove it: the next start boots.
    d.api.post("/v1/vms/m/managed-save")
    assert d.api.request("DELETE", "/v1/vms/m/managed-save")["state"] == "shut off"
    assert "m.managedsave" not in pool_files(d)
    assert d.api.post("/v1/vms/m/start")["reason"] == "booted"
    # Managed save, then delete the VM: the save goes with it.
    d.api.post("/v1/vms/m/managed-save")
    d.api.request("DELETE", "/v1/vms/m")
    assert not [n for n in pool_files(d) if n.startswith("m")]
    assert journal(d) == []


def test_refusals_change_nothing(fake_daemon: Daemon) -> None:
    d = fake_daemon
    d.api.post("/v1/vms", {"name": "off", "memory_mib": 64})
    new_vm(d, "r")
    before = pool_files(d)
    for method, url, body, status in (
        ("POST", "/v1/vms/off/save", {}, 409),  # shut off: nothing to save
        ("POST", "/v1/vms/off/managed-save", None, 409),
        ("POST", "/v1/vms/nosuch/save", {}, 404),
        ("POST", "/v1/vms/r/save", {"volume": "nopool/x.save"}, 404),
        ("POST", "/v1/vms/r/save", {"volume": "x"}, 400),
        ("POST", "/v1/vms/r/save", {"volume": "default/../x"}, 400),
        ("POST", "/v1/vms/r/save", {"extra": 1}, 400),
        ("POST", "/v1/saves/default/nosuch/restore", None, 404),
        ("GET", "/v1/saves/default/nosuch", None, 404),
        ("DELETE", "/v1/vms/r/managed-save", None, 404),
        ("GET", "/v1/vms/off/managed-save", None, 404),
    ):
        with pytest.raises(ApiError) as e:
            d.api.request(method, url, body)
        assert e.value.status == status, (method, url, body, e.value.message)
    assert pool_files(d) == before and d.vm("r")["state"] == "running"

    s = d.api.post("/v1/vms/r/save", {"volume": "default/r.save"})
    with pytest.raises(ApiError) as e:  # taken
        d.api.post("/v1/vms/off/save", {"volume": s["volume"]})
    assert e.value.status in (409,)
    d.api.post("/v1/saves/default/r.save/restore")
    with pytest.raises(ApiError) as e:  # running: nothing to restore into
        d.api.post("/v1/saves/default/r.save/restore")
    assert e.value.status == 409 and "needs it shut off" in e.value.message
    # A save volume is no disk.
    for method, url, body in (
        ("POST", "/v1/vms/off/disks", {"volume": "default/r.save"}),
        ("POST", "/v1/pools/default/volumes/r.save/clone", {"target": "default/c.save"}),
        ("POST", "/v1/pools/default/volumes/r.save/resize", {"size_bytes": 2**20}),
        ("POST", "/v1/pools/default/volumes/r.save/convert", {"format": "raw"}),
        ("POST", "/v1/vms", {"name": "img", "memory_mib": 64, "image": "default/r.save"}),
    ):
        with pytest.raises(ApiError) as e:
            d.api.request(method, url, body)
        assert e.value.status == 400 and "saved VM state" in e.value.message, (url, e.value.message)
    # A disk volume is no save; a damaged save file is refused before QEMU starts.
    d.cli("volume", "create", "default/plain.raw", "--size", "1M", "--format", "raw")
    with pytest.raises(ApiError) as e:
        d.api.post("/v1/saves/default/plain.raw/restore")
    assert e.value.status == 400
    d.api.post("/v1/vms/r/destroy")
    path = d.state_dir / "pools" / "default" / "r.save"
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"garbage" * 100)  # the header is fine, the state is not
    with pytest.raises(ApiError) as e:
        d.api.post("/v1/saves/default/r.save/restore")
    assert e.value.status == 502 and "could not load" in e.value.message, e.value.message
    assert d.vm("r")["state"] == "shut off" and journal(d) == []
    path.write_bytes(b"\0" * 8192)  # not even a header
    with pytest.raises(ApiError) as e:
        d.api.post("/v1/saves/default/r.save/restore")
    assert e.value.status == 409 and "cannot be read" in e.value.message


def test_a_changed_machine_is_refused_with_a_way_out(fake_daemon: Daemon) -> None:
    d = fake_daemon
    new_vm(d, "c")
    d.cli("volume", "create", "default/extra.qcow2", "--size", "1M")
    d.api.post("/v1/vms/c/managed-save")
    d.api.post("/v1/vms/c/disks", {"volume": "default/extra.qcow2"})
    with pytest.raises(ApiError) as e:
        d.api.post("/v1/vms/c/start")
    assert e.value.status == 409 and "disk0 added" in e.value.message and "managedsave-remove" in e.value.message
    assert d.vm("c")["state"] == "saved"
    d.api.request("DELETE", "/v1/vms/c/disks/disk0")
    assert d.api.post("/v1/vms/c/start")["reason"] == "restored"


@pytest.mark.parametrize(
    ("step", "state", "kept"),
    [("save-stopped", "running", False), ("save-migrated", "running", False), ("save-written", "saved", True)],
)
def test_daemon_killed_during_managed_save(fake_daemon: Daemon, step: str, state: str, kept: bool) -> None:
    d = fake_daemon
    new_vm(d, "k")
    with d.dying_at(step), pytest.raises((ApiError, OSError)):
        d.api.post("/v1/vms/k/managed-save")
    assert d.vm("k")["state"] == state
    assert ("k.managedsave" in pool_files(d)) is kept
    assert not [n for n in pool_files(d) if n.startswith(".")] and journal(d) == []
    if kept:
        assert d.api.post("/v1/vms/k/start")["reason"] == "restored"
        assert "k.managedsave" not in pool_files(d)


@pytest.mark.parametrize(("step", "state"), [("restore-spawned", "saved"), ("restore-loaded", "running")])
def test_daemon_killed_during_restore(fake_daemon: Daemon, step: str, state: str) -> None:
    """Killed with QEMU waiting for a state it was not yet given: back to saved; with the state loaded: it runs."""
    d = fake_daemon
    new_vm(d, "k")
    d.api.post("/v1/vms/k/managed-save")
    with d.dying_at(step), pytest.raises((ApiError, OSError)):
        d.api.post("/v1/vms/k/start")
    assert d.vm("k")["state"] == state and journal(d) == []
    assert ("k.managedsave" in pool_files(d)) is (state == "saved")
    if state == "saved":
        assert not [p for p in d.qemu_pids() if p != (d.proc.pid if d.proc else None)]  # the waiting QEMU ended
        assert d.api.post("/v1/vms/k/start")["reason"] == "restored"
    assert "k.managedsave" not in pool_files(d)


def test_full_pool_leaves_the_vm_running(fake_daemon: Daemon, tmp_path: Any) -> None:
    from tests.integration.test_storage_fake import small_fs

    d = fake_daemon
    with small_fs(tmp_path / "tiny", "64k") as where:
        d.api.post("/v1/pools", {"name": "tiny", "path": str(where)})
        new_vm(d, "f")
        with pytest.raises(ApiError) as e:
            d.api.post("/v1/vms/f/save", {"volume": "tiny/f.save"})
        assert e.value.status == 507 and "no space left in pool 'tiny'" in e.value.message, e.value.message
        assert d.vm("f")["state"] == "running" and os.listdir(where) == [] and journal(d) == []
        d.api.post("/v1/vms/f/destroy")
