"""A state dir written by vmkit before isolation keeps working: its VMs start unprivileged at their next start,
and one still running under the old (root) QEMU is re-attached as it is."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.conftest import FAKE_QEMU, ROOT, Daemon
from vmkit.store.db import SCHEMA_VERSION

FIXTURE = ROOT / "tests" / "fixtures" / "state-v1.sql"
OLD_RUNNING_UUID = "6f1c1f0e-0000-4000-8000-000000000002"


def _old_layout(d: Daemon) -> subprocess.Popen[bytes]:
    """STATE and RUN as the old vmkit left them, with `oldrun`'s QEMU (fake) still running as root."""
    d.state_dir.mkdir(mode=0o700)
    (d.state_dir / "vms" / "old").mkdir(parents=True)
    (d.state_dir / "vms" / "oldrun").mkdir()  # the old launch made it (logs)
    disk = d.state_dir / "vms" / "old" / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    db = sqlite3.connect(d.state_dir / "vmkit.db")
    db.executescript(FIXTURE.read_text().replace("@STATE@", str(d.state_dir)))
    db.commit()
    db.close()
    os.chmod(d.state_dir / "vmkit.db", 0o644)  # as the old daemon's umask left it
    run = d.run_dir / "vms" / "oldrun"
    run.mkdir(parents=True)
    qmp = socket.socket(socket.AF_UNIX)
    qmp.bind(str(run / "qmp.sock"))
    qmp.listen(4)
    argv = [
        str(FAKE_QEMU),
        "-uuid",
        OLD_RUNNING_UUID,
        "-chardev",
        f"socket,id=mon0,fd={qmp.fileno()},server=on,wait=off",
    ]
    proc = subprocess.Popen(argv, pass_fds=[qmp.fileno()], start_new_session=True, env={**os.environ, **d.env})
    qmp.close()
    (run / "argv.json").write_text(json.dumps(argv))
    (run / "qemu.pid").write_text(f"{proc.pid}\n")  # the old QEMU wrote this itself (-pidfile)
    return proc


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_state_dir_from_before_isolation(tmp_path: Path) -> None:
    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU)})
    old_qemu = _old_layout(d)
    try:
        time.sleep(0.3)  # let the fake QEMU take its socket
        d.start()
        first, last = (int(x) for x in d.env["VMKIT_ID_RANGE"].split(":"))
        last += first - 1
        # Migrated to the current schema; the database is private again.
        db = sqlite3.connect(d.state_dir / "vmkit.db")
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        db.close()
        assert (d.state_dir / "vmkit.db").stat().st_mode & 0o077 == 0
        # The running one is re-attached as it is: running, as root, in no cgroup of ours; limits that need
        # a cgroup are refused until it is restarted.
        vm = d.vm("oldrun")
        assert (vm["state"], vm["pid"], vm["uid"], vm["cgroup"]) == ("running", old_qemu.pid, 0, None)
        res = d.cli("vm", "set", "oldrun", "--cpu-max", "50", check=False)
        assert res.returncode != 0 and "restart it" in res.stderr
        # The shut-off one (autostart) started at once, unprivileged, its old disk now its own.
        vm = d.wait_state("old", "running")
        assert vm["state"] == "running"
        assert first <= vm["uid"] <= last and _uid_of(vm["pid"]) == vm["uid"] and vm["cgroup"]
        assert os.stat(vm["disks"][0]["path"]).st_uid == vm["uid"]
        # Restarted, the old one runs unprivileged too, under another identity.
        d.cli("vm", "stop", "oldrun", "--force")
        vm2 = json.loads(d.cli("vm", "start", "oldrun", "--json").stdout)
        assert first <= vm2["uid"] <= last and vm2["uid"] != vm["uid"] and _uid_of(vm2["pid"]) == vm2["uid"]
        d.cli("vm", "set", "oldrun", "--cpu-max", "50")
        # And a daemon restart keeps every identity.
        d.stop()
        d.start()
        assert (d.vm("old")["uid"], d.vm("oldrun")["uid"]) == (vm["uid"], vm2["uid"])
    finally:
        d.cleanup()
        if old_qemu.poll() is None:
            old_qemu.kill()
        old_qemu.wait()
