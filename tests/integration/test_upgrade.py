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

import pytest

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


FIXTURE_V3 = ROOT / "tests" / "fixtures" / "state-v3.sql"
BUILD = "demo-6.1.0-56-amd64-12ae031d1605fe63"


def _layout_v3(state: Path) -> dict[str, Path]:
    """STATE as vmkit left it before pools: files plus the v3 database of tests/fixtures/state-v3.sql."""
    build = state / "images" / "demo" / BUILD
    build.mkdir(parents=True)
    (state / "vms" / "web").mkdir(parents=True)
    (state / "vms" / "blank").mkdir(parents=True)
    (state / "kept-disks").mkdir()
    files = {
        "kernel": build / "vmlinux",
        "initrd": build / "initrd.gz",
        "base": build / "disk.qcow2",
        "web": state / "vms" / "web" / "disk0.qcow2",
        "blank": state / "vms" / "blank" / "disk0.qcow2",
        "kept": state / "kept-disks" / "old-disk0.qcow2",
    }
    files["kernel"].write_bytes(b"\x7fELF kernel")
    files["initrd"].write_bytes(b"\x1f\x8b initrd")
    img = ["qemu-img", "create", "-q", "-f", "qcow2"]
    subprocess.run([*img, str(files["base"]), "16M"], check=True)
    subprocess.run([*img, "-b", str(files["base"]), "-F", "qcow2", str(files["web"])], check=True)
    subprocess.run([*img, str(files["blank"]), "8M"], check=True)
    subprocess.run([*img, str(files["kept"]), "4M"], check=True)
    # What users wrote: checked byte for byte after the upgrade.
    for name, pattern in (("base", "0x11"), ("web", "0x22"), ("blank", "0x33"), ("kept", "0x44")):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(files[name])], check=True,
                       capture_output=True)  # fmt: skip
    (state / "vms" / "web" / "serial.log").write_text("old boot log")
    db = sqlite3.connect(state / "vmkit.db")
    db.executescript(FIXTURE_V3.read_text().replace("@STATE@", str(state)))
    db.commit()
    db.close()
    return files


def _reads(path: str, pattern: str) -> bool:
    res = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} 0 1M", path], capture_output=True, text=True
    )
    return res.returncode == 0 and "Pattern verification failed" not in res.stdout


def test_state_dir_from_before_pools(tmp_path: Path) -> None:
    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU)})
    d.state_dir.mkdir(mode=0o700)
    _layout_v3(d.state_dir)
    try:
        d.start()
        vols = {v["key"]: v for v in d.api.get("/v1/volumes")}
        base, web = f"images/{BUILD}-disk.qcow2", "default/web-disk0.qcow2"
        assert {base, f"images/{BUILD}-vmlinux", f"images/{BUILD}-initrd.gz", web, "default/blank-disk0.qcow2",
                "default/old-disk0.qcow2"} == set(vols)  # fmt: skip
        assert vols[web]["backing"] == base and vols[base]["used_by"] == [] and vols[web]["used_by"] == ["web"]
        # The overlay's header follows its base to its new home; every byte users wrote is where it was.
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", vols[web]["path"]],
                                         capture_output=True, check=True).stdout)  # fmt: skip
        assert info["backing-filename"] == vols[base]["path"]
        assert _reads(vols[base]["path"], "0x11") and _reads(vols[web]["path"], "0x22")
        assert _reads(vols["default/blank-disk0.qcow2"]["path"], "0x33")
        assert _reads(vols["default/old-disk0.qcow2"]["path"], "0x44")
        vm = d.vm("web")
        assert vm["disks"][0]["volume"] == web and vm["kernel"] == vols[f"images/{BUILD}-vmlinux"]["path"]
        assert d.vm("blank")["disks"][0]["iops_total"] == 100
        assert (d.state_dir / "vms" / "web" / "serial.log").read_text() == "old boot log"  # logs stay
        assert not (d.state_dir / "images").exists() and not (d.state_dir / "kept-disks").exists()
        image = d.api.get("/v1/images/demo")
        assert image["disk_volume"] == base and image["disk"] == vols[base]["path"]
        # The VM starts from its moved disk, its chain handed over as descriptors.
        d.cli("vm", "start", "web")
        argv = (d.run_dir / "vms" / "web" / "argv.json").read_text()
        assert "disk0-b1" in argv
        d.cli("vm", "stop", "web", "--force")
        # New VMs can use the taken-over image; deleting a VM deletes its taken-over disk.
        d.cli("vm", "create", "web2", "--image", "demo")
        d.cli("vm", "delete", "blank")
        assert "default/blank-disk0.qcow2" not in {v["key"] for v in d.api.get("/v1/volumes")}
        d.stop()
        d.start()  # a second start takes nothing over again
        assert len(d.api.get("/v1/volumes")) == 6
    finally:
        d.cleanup()


def test_takeover_interrupted_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon killed half-way through the takeover (files moved, headers or records not yet) finishes it."""
    from vmkit.services import upgrade
    from vmkit.services.pools import PoolService
    from vmkit.services.sharedpools import SharedPools
    from vmkit.storage import qemu_img
    from vmkit.store.db import Store

    state = tmp_path / "state"
    state.mkdir()
    files = _layout_v3(state)
    store = Store(state / "vmkit.db")
    pools = PoolService(store=store, state_dir=state, shared=SharedPools(store=store, host_id="t", initiator="t"))
    real_rebase = qemu_img.rebase_unsafe

    def crash(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(qemu_img, "rebase_unsafe", crash)
    with pytest.raises(KeyboardInterrupt):
        upgrade.take_over(store, pools, state)
    assert not files["web"].exists() and store.volumes() == []  # moved, not yet recorded
    monkeypatch.setattr(qemu_img, "rebase_unsafe", real_rebase)
    assert upgrade.take_over(store, pools, state) == 6
    assert upgrade.take_over(store, pools, state) == 0
    web = store.volume("default", "web-disk0.qcow2")
    assert web is not None and web.backing == f"images/{BUILD}-disk.qcow2"
    spec = {r.spec.name: r.spec for r in store.vms()}["web"]
    assert spec.disks[0].path == str(state / "pools" / "default" / "web-disk0.qcow2")
    assert _reads(spec.disks[0].path, "0x22")
    store.close()
