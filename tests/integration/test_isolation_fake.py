"""Isolation bookkeeping across daemon crashes, against the fake QEMU (fast; the real-QEMU truth is in e2e)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Daemon
from vmkit.host.cgroups import Cgroups


def _start(d: Daemon, name: str) -> dict:
    d.cli("vm", "create", name, "--memory", "64", "--cpu-max", "40")
    return json.loads(d.cli("vm", "start", name, "--json").stdout)


def test_daemon_death_between_spawn_and_cgroup_is_finished_at_restart(fake_daemon: Daemon) -> None:
    d = fake_daemon
    vm = _start(d, "cut")
    d.kill9()
    # As if the daemon died right after spawning: QEMU outside its cgroup, and no pid record yet.
    cg_name = vm["cgroup"].rsplit("/", 1)[1]
    cgroups = Cgroups.detect(parent=d.env["VMKIT_CGROUP_PARENT"])
    cg = cgroups.get(cg_name)
    assert cg is not None and cg.contains(vm["pid"])
    for path in cg.dirs:
        (path.parent.parent / "cgroup.procs").write_text(str(vm["pid"]))
    assert not cg.contains(vm["pid"])
    (d.run_dir / "vms" / "cut" / "qemu.pid").unlink()
    d.start()
    again = d.vm("cut")
    assert (again["state"], again["pid"], again["uid"]) == ("running", vm["pid"], vm["uid"])
    assert again["cgroup"] == vm["cgroup"] and cg.contains(vm["pid"])
    assert cg.read_limits()["cpu.cfs_quota_us" if cgroups.mode == "v1" else "cpu.max"].startswith("40000")
    d.cli("vm", "stop", "cut", "--force")
    assert cgroups.get(cg_name) is None


def test_identities_are_distinct_and_stable(fake_daemon: Daemon) -> None:
    d = fake_daemon
    a, b = _start(d, "a"), _start(d, "b")
    assert a["uid"] != b["uid"] and a["uid"] == a["gid"]
    for vm in (a, b):
        status = Path(f"/proc/{vm['pid']}/status").read_text()
        assert f"Uid:\t{vm['uid']}\t{vm['uid']}" in status
    d.cli("vm", "stop", "a", "--force")
    d.cli("vm", "delete", "a")
    d.cli("vm", "create", "c", "--memory", "64")
    # A deleted VM's id is not handed out again at once.
    assert d.vm("c")["uid"] not in (a["uid"], b["uid"])
    d.cli("vm", "stop", "b", "--force")
