"""Lifecycle logic against a fake QEMU speaking QMP: events, crashes, restarts, failure paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import Daemon
from vmkit.cli.client import ApiError
from vmkit.qemu import process


def _create_start(d: Daemon, name: str) -> dict:
    d.cli("vm", "create", name, "--memory", "64")
    return json.loads(d.cli("vm", "start", name, "--json").stdout)


def test_start_pause_resume_shutdown(fake_daemon: Daemon) -> None:
    d = fake_daemon
    vm = _create_start(d, "a")
    assert vm["state"] == "running"
    assert vm["pid"] > 0
    argv = json.loads((d.run_dir / "vms" / "a" / "argv.json").read_text())
    assert "-S" in argv and "-no-shutdown" in argv
    assert json.loads(d.cli("vm", "pause", "a", "--json").stdout)["state"] == "paused"
    assert json.loads(d.cli("vm", "resume", "a", "--json").stdout)["state"] == "running"
    out = json.loads(d.cli("vm", "shutdown", "a", "--json").stdout)
    assert (out["state"], out["reason"]) == ("shut off", "shutdown")
    assert not (d.run_dir / "vms" / "a").exists()
    # The QMP traffic of that run outlives it, for post-mortems: commands, replies and events in order.
    lines = (d.state_dir / "vms" / "a" / "qmp.log").read_text().splitlines()
    sent = [json.loads(line.split(" -> ", 1)[1])["execute"] for line in lines if " -> " in line]
    assert sent == ["qmp_capabilities", "cont", "stop", "cont", "system_powerdown", "quit"]
    assert any('"event":"SHUTDOWN"' in line for line in lines)


def test_shutdown_times_out_without_force_and_changes_nothing(tmp_path) -> None:
    from tests.conftest import FAKE_QEMU

    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "FAKE_QEMU_IGNORE_ACPI": "1"})
    d.start()
    try:
        _create_start(d, "deaf")
        res = d.cli("vm", "shutdown", "deaf", "--timeout", "0.5", check=False)
        assert res.returncode != 0
        assert "did not shut down" in res.stderr
        assert d.vm("deaf")["state"] == "running"
        out = json.loads(d.cli("vm", "shutdown", "deaf", "--timeout", "0.3", "--force", "--json").stdout)
        assert (out["state"], out["reason"]) == ("shut off", "destroyed")
        # A hard stop is not held up by a shutdown still waiting for the guest.
        d.cli("vm", "start", "deaf")
        waiting = subprocess.Popen(
            [sys.executable, "-m", "vmkit", "vm", "shutdown", "deaf", "--timeout", "30"], env=d.env
        )
        time.sleep(0.5)
        t0 = time.monotonic()
        d.cli("vm", "stop", "deaf", "--force")
        assert time.monotonic() - t0 < 3
        assert waiting.wait(5) == 0
    finally:
        d.cleanup()


def test_hard_stop(fake_daemon: Daemon) -> None:
    _create_start(fake_daemon, "h")
    t0 = time.monotonic()
    out = json.loads(fake_daemon.cli("vm", "stop", "h", "--force", "--json").stdout)
    assert (out["state"], out["reason"]) == ("shut off", "destroyed")
    assert time.monotonic() - t0 < 5


def test_reboot_is_acpi_then_reset(fake_daemon: Daemon) -> None:
    d = fake_daemon
    vm = _create_start(d, "r")
    d.cli("vm", "reboot", "r")
    time.sleep(0.5)
    after = d.vm("r")
    assert after["state"] == "running"
    assert after["pid"] == vm["pid"]  # same QEMU: reset, not restarted
    qmp_log = (d.state_dir / "vms" / "r" / "qmp.log").read_text()
    assert "system_powerdown" in qmp_log and "system_reset" in qmp_log


def test_qemu_killed_is_crashed_within_1s(fake_daemon: Daemon) -> None:
    d = fake_daemon
    vm = _create_start(d, "k")
    os.kill(vm["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    after = d.wait_state("k", "crashed", timeout_s=1.0)
    assert after["state"] == "crashed", after
    assert time.monotonic() - t0 < 1.0
    assert "signal 9" in after["reason"]
    # A crashed VM can be started again.
    assert json.loads(d.cli("vm", "start", "k", "--json").stdout)["state"] == "running"


def test_daemon_kill9_and_restart_reattaches(fake_daemon: Daemon) -> None:
    d = fake_daemon
    pids = {n: _create_start(d, n)["pid"] for n in ("x1", "x2", "x3")}
    d.cli("vm", "pause", "x2")
    d.kill9()
    for pid in pids.values():
        os.kill(pid, 0)  # still alive
    d.start()
    states = {v["name"]: v["state"] for v in d.api.get("/v1/vms")}
    assert states == {"x1": "running", "x2": "paused", "x3": "running"}
    assert json.loads(d.cli("vm", "resume", "x2", "--json").stdout)["state"] == "running"
    # Still watched after re-attach: a kill is noticed.
    os.kill(pids["x3"], signal.SIGKILL)
    assert d.wait_state("x3", "crashed", 1.0)["state"] == "crashed"
    assert d.cli("vm", "stop", "x1", "--force").returncode == 0


def test_recycled_pid_is_not_taken_for_our_qemu(fake_daemon: Daemon) -> None:
    d = fake_daemon
    pid = _create_start(d, "np")["pid"]
    d.kill9()
    os.kill(pid, signal.SIGKILL)
    # As if the pid had been reused meanwhile: a live process that is not this VM's QEMU.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d.run_dir / "vms" / "np" / "qemu.pid").write_text(f"{stranger.pid}\n")
        d.start()
        vm = d.vm("np")
        assert (vm["state"], vm["pid"]) == ("crashed", None)
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_vanished_while_daemon_down(fake_daemon: Daemon) -> None:
    d = fake_daemon
    killed = _create_start(d, "gone")["pid"]
    termed = _create_start(d, "termed")["pid"]
    d.kill9()
    os.kill(killed, signal.SIGKILL)
    os.kill(termed, signal.SIGTERM)
    time.sleep(0.3)
    d.start()
    assert d.vm("gone")["state"] == "crashed"
    t = d.vm("termed")
    assert (t["state"], t["reason"]) == ("shut off", "destroyed")


def test_guest_powered_off_while_daemon_down(fake_daemon: Daemon) -> None:
    d = fake_daemon
    vm = _create_start(d, "p")
    d.stop()  # clean daemon stop leaves VMs running
    os.kill(vm["pid"], 0)
    # Power the guest off by talking QMP directly while no daemon listens.
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.run_dir / "vms" / "p" / "qmp.sock"))
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n')
    f.flush()
    time.sleep(0.4)
    f.close()
    s.close()
    d.start()
    after = d.wait_state("p", "shut off", 3)
    assert (after["state"], after["reason"]) == ("shut off", "shutdown")


def test_qemu_fails_to_start(tmp_path) -> None:
    from tests.conftest import FAKE_QEMU

    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "FAKE_QEMU_FAIL": "1"})
    d.start()
    try:
        d.cli("vm", "create", "f")
        res = d.cli("vm", "start", "f", check=False)
        assert res.returncode == 1
        assert "not a valid device model" in res.stderr
        vm = d.vm("f")
        assert (vm["state"], vm["reason"]) == ("shut off", "failed")
        assert not (d.run_dir / "vms" / "f").exists()
    finally:
        d.cleanup()


def test_state_events_on_websocket(fake_daemon: Daemon) -> None:
    from websockets.sync.client import unix_connect

    d = fake_daemon
    d.cli("vm", "create", "ev")
    with unix_connect(str(d.socket), "ws://localhost/v1/events") as ws:
        d.cli("vm", "start", "ev")
        d.cli("vm", "pause", "ev")
        seen = []
        deadline = time.monotonic() + 5
        while "paused" not in seen and time.monotonic() < deadline:
            ev = json.loads(ws.recv(timeout=5))
            if ev["type"] == "vm-state" and ev["vm"] == "ev":
                seen.append(ev["state"])
    assert seen[0] == "running" and seen[-1] == "paused"


def test_conflicts(fake_daemon: Daemon) -> None:
    d = fake_daemon
    _create_start(d, "c")
    for args, word in (
        (("vm", "start", "c"), "already running"),
        (("vm", "delete", "c"), "stop it first"),
        (("vm", "resume", "c"), "must be paused"),
        (("vm", "info", "nosuch"), "no VM named"),
    ):
        res = d.cli(*args, check=False)
        assert res.returncode != 0 and word in res.stderr, (args, res.stderr)
    with pytest.raises(ApiError) as e:
        d.api.post("/v1/vms/c/pause", None)
        d.api.post("/v1/vms/c/pause", None)
    assert e.value.status == 409
    d.cli("vm", "stop", "c", "--force")
    d.cli("vm", "delete", "c")
    assert d.api.get("/v1/vms") == []
    assert not (d.state_dir / "vms" / "c").exists()


def test_autostart_once_per_boot(fake_daemon: Daemon) -> None:
    d = fake_daemon
    d.cli("vm", "create", "auto", "--autostart")
    d.cli("vm", "create", "manual")
    assert json.loads(d.cli("vm", "autostart", "manual", "on", "--json").stdout)["autostart"] is True
    d.cli("vm", "autostart", "manual", "off")
    # The daemon already ran its once-per-boot autostart; a restart must not start VMs again.
    d.stop()
    d.start()
    assert d.vm("auto")["state"] == "shut off"
    # A new host boot (the run dir's tmpfs is empty) starts autostart VMs only.
    (d.run_dir / "autostart.done").unlink()
    d.stop()
    d.start()
    assert d.wait_state("auto", "running", 5)["state"] == "running"
    assert d.vm("manual")["state"] == "shut off"


def test_delete_keep_disks(fake_daemon: Daemon) -> None:
    d = fake_daemon
    vm = json.loads(d.cli("vm", "create", "kd", "--disk", "16M", "--json").stdout)
    disk = vm["disks"][0]["path"]
    assert os.path.exists(disk)
    assert vm["disks"][0]["volume"] == "default/kd-disk0.qcow2"
    d.cli("vm", "delete", "kd", "--keep-disks")
    # Kept as a volume of no VM, where it was; a new VM may attach it.
    assert os.path.exists(disk) and os.stat(disk).st_uid == 0
    assert not (d.state_dir / "vms" / "kd").exists()
    vol = json.loads(d.cli("volume", "info", "default/kd-disk0.qcow2", "--json").stdout)
    assert vol["used_by"] == [] and vol["path"] == disk
    vm = json.loads(d.cli("vm", "create", "kd2", "--disk", "default/kd-disk0.qcow2", "--json").stdout)
    assert vm["disks"][0]["owned"] is False
    d.cli("vm", "delete", "kd2")
    assert os.path.exists(disk)  # only attached, so not deleted with the VM
    vm = json.loads(d.cli("vm", "create", "kd3", "--disk", "16M", "--json").stdout)
    d.cli("vm", "delete", "kd3")
    assert not os.path.exists(vm["disks"][0]["path"])
    assert d.cli("volume", "info", vm["disks"][0]["volume"], check=False).returncode != 0


def test_openapi_and_socket_mode(fake_daemon: Daemon) -> None:
    doc = fake_daemon.api.get("/openapi.json")
    assert "/v1/vms" in doc["paths"] and "/v1/vms/{name}/start" in doc["paths"]
    mode = os.stat(fake_daemon.socket).st_mode & 0o777
    assert mode & 0o007 == 0, oct(mode)  # nobody outside root (and group vmkit) may connect


def test_second_daemon_on_same_state_dir_refused(fake_daemon: Daemon) -> None:
    other = Daemon(fake_daemon.root, {"VMKIT_SOCKET": str(fake_daemon.root / "other.sock")})
    with pytest.raises(RuntimeError, match="another daemon"):
        other.start(timeout_s=10)


def test_hung_qemu_after_restart_is_crashed_but_stoppable(tmp_path) -> None:
    from tests.conftest import FAKE_QEMU

    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "FAKE_QEMU_HANG_LATER": "1"})
    d.start()
    try:
        pid = _create_start(d, "hung")["pid"]
        d.kill9()
        d.start(timeout_s=30)
        vm = d.vm("hung")
        assert vm["state"] == "crashed" and "not answering" in vm["reason"]
        res = d.cli("vm", "start", "hung", check=False)
        assert res.returncode != 0 and "still there" in res.stderr  # never a second QEMU on the same disks
        d.cli("vm", "stop", "hung", "--force")
        assert d.vm("hung")["state"] == "shut off"
        assert not process.alive(process.QemuProcess(pid, process.proc_start_time(pid) or -1))
    finally:
        d.cleanup()


def test_host_reboot_means_shut_off_not_crashed(fake_daemon: Daemon) -> None:
    import sqlite3

    d = fake_daemon
    pid = _create_start(d, "rb")["pid"]
    d.kill9()
    os.kill(pid, signal.SIGKILL)
    db = sqlite3.connect(d.state_dir / "vmkit.db")
    db.execute("UPDATE meta SET value = 'an-earlier-boot' WHERE key = 'boot_id'")
    db.commit()
    db.close()
    d.start()
    vm = d.vm("rb")
    assert (vm["state"], vm["reason"]) == ("shut off", "host rebooted")


def test_socket_path_too_long_is_a_clear_error(tmp_path) -> None:
    from tests.conftest import FAKE_QEMU

    deep = tmp_path / ("r" * 60)
    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "VMKIT_RUN_DIR": str(deep)})
    d.start()
    try:
        name = "n" * 40
        d.cli("vm", "create", name)
        res = d.cli("vm", "start", name, check=False)
        assert res.returncode == 1 and "over the kernel's 107" in res.stderr
        assert d.vm(name)["state"] == "shut off"
        assert not (deep / "vms" / name).exists()
    finally:
        d.cleanup()


def test_daemon_stops_cleanly_with_clients_attached(fake_daemon: Daemon) -> None:
    from websockets.sync.client import unix_connect

    d = fake_daemon
    pid = _create_start(d, "stay")["pid"]
    with unix_connect(str(d.socket), "ws://localhost/v1/events"):
        assert d.proc is not None
        proc = d.proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        d.proc = None
    assert not d.socket.exists()
    os.kill(pid, 0)  # the VM is not the daemon's to stop
    d.start()
    assert d.vm("stay")["state"] == "running"


def test_cli_events_follows_state_changes(fake_daemon: Daemon) -> None:
    d = fake_daemon
    d.cli("vm", "create", "watched")
    follower = subprocess.Popen(
        [sys.executable, "-m", "vmkit", "events", "--json"], env=d.env, stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)  # let it subscribe
        d.cli("vm", "start", "watched")
        d.cli("vm", "stop", "watched", "--force")
        states = []
        assert follower.stdout is not None
        while "shut off" not in states:
            ev = json.loads(follower.stdout.readline())
            if ev["type"] == "vm-state" and ev["vm"] == "watched":
                states.append(ev["state"])
        assert states[0] == "running" and states[-1] == "shut off"
    finally:
        follower.kill()
        follower.wait()


def test_leftovers_of_a_crashed_create_are_removed_on_start(fake_daemon: Daemon) -> None:
    d = fake_daemon
    d.cli("vm", "create", "real", "--disk", "1M")
    d.kill9()
    # What a daemon killed between writing a disk and writing its row would leave behind.
    ghost = d.state_dir / "vms" / "ghost"
    ghost.mkdir()
    (ghost / "disk0.qcow2").write_bytes(b"half-made")
    (d.run_dir / "vms" / "ghost").mkdir()
    d.start()
    assert not ghost.exists() and not (d.run_dir / "vms" / "ghost").exists()
    assert (d.state_dir / "pools" / "default" / "real-disk0.qcow2").exists()
    assert [v["name"] for v in d.api.get("/v1/vms")] == ["real"]
