"""End to end: every VM's QEMU unprivileged, under its own identity, in its own cgroup, with limits that bite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, unique_id_range
from tests.e2e.guest import boot
from vmkit.host.cgroups import Cgroups

pytestmark = pytest.mark.e2e


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _cgroups(d: Daemon) -> Cgroups:
    return Cgroups.detect(parent=d.env["VMKIT_CGROUP_PARENT"])


def _cgroup_files(d: Daemon, vm: dict) -> dict[str, str]:
    cg = _cgroups(d).get(vm["cgroup"].rsplit("/", 1)[1])
    assert cg is not None, vm["cgroup"]
    return cg.read_limits()


def test_qemu_runs_unprivileged_in_its_own_cgroup(daemon: Daemon) -> None:
    d = daemon
    vm = boot(d, "priv")
    info = d.vm("priv")
    st = _status(vm["pid"])
    uids, gids = st["Uid"].split(), st["Gid"].split()
    assert "0" not in uids and "0" not in gids, st
    assert set(uids) == {str(info["uid"])} and set(gids) == {str(info["gid"])}
    assert st["Groups"] == ""  # no supplementary groups under TCG (kvm's group only where KVM is used)
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0 and int(st["CapBnd"], 16) == 0
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    # In its own cgroup, which accounts for it.
    assert info["cgroup"].startswith(f"/{d.env['VMKIT_CGROUP_PARENT']}/priv.")
    cgroup_lines = Path(f"/proc/{vm['pid']}/cgroup").read_text().splitlines()
    assert any(line.endswith(":" + info["cgroup"]) for line in cgroup_lines), cgroup_lines
    assert info["cpu_time_ns"] > 0 and info["memory_bytes"] > 0
    # The CLI shows the same.
    text = d.cli("vm", "info", "priv").stdout
    assert f"uid {info['uid']} gid {info['gid']}" in text and info["cgroup"] in text
    # QEMU was given no path of vmkit's: everything came as a descriptor.
    argv = json.loads((d.run_dir / "vms" / "priv" / "argv.json").read_text())
    assert not [a for a in argv[1:] if str(d.root) in a]
    d.cli("vm", "stop", "priv", "--force")
    # Its cgroup goes with it.
    assert _cgroups(d).get(info["cgroup"].rsplit("/", 1)[1]) is None


_PROBE = r"""
import json, os, socket, sys
results = {}
for label, path in json.loads(sys.argv[1]).items():
    try:
        if path.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
        else:
            with open(path, "rb") as f:
                results[label] = f.read(4).hex()
                continue
        results[label] = "opened"
    except OSError as e:
        results[label] = type(e).__name__
print(json.dumps(results))
"""


def test_one_vm_identity_cannot_reach_another_vm_or_the_daemon(daemon: Daemon) -> None:
    d = daemon
    a, b = boot(d, "ida"), boot(d, "idb")
    ia, ib = d.vm("ida"), d.vm("idb")
    assert ia["uid"] != ib["uid"] and ia["gid"] != ib["gid"]

    def disk_fd(pid: int, disk: str) -> str:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            if os.readlink(fd) == disk:
                return str(fd)
        raise AssertionError(f"{disk} not open in {pid}")

    b_run, b_state = d.run_dir / "vms" / "idb", d.state_dir / "vms" / "idb"
    targets = {
        "own disk, through its QEMU's descriptor": disk_fd(a["pid"], ia["disks"][0]["path"]),
        "own disk by path": ia["disks"][0]["path"],
        "B's disk by path": ib["disks"][0]["path"],
        "B's disk through B's QEMU": disk_fd(b["pid"], ib["disks"][0]["path"]),
        "B's serial log": str(b_state / "serial.log"),
        "B's QEMU log": str(b_state / "qemu.log"),
        "B's QMP socket": str(b_run / "qmp.sock"),
        "B's agent socket": str(b_run / "qga.sock"),
        "B's serial socket": str(b_run / "serial.sock"),
        "the state database": str(d.state_dir / "vmkit.db"),
        "the API socket": str(d.socket),
        "the demo image": d.api.get("/v1/images/demo")["disk"],
    }
    res = subprocess.run(
        ["setpriv", "--reuid", str(ia["uid"]), "--regid", str(ia["gid"]), "--clear-groups", "--no-new-privs",
         "--", sys.executable, "-c", _PROBE, json.dumps(targets)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    got = json.loads(res.stdout)
    assert got.pop("own disk, through its QEMU's descriptor") == b"QFI\xfb".hex()  # a qcow2 header
    assert got == dict.fromkeys(got, "PermissionError"), got
    for n in ("ida", "idb"):
        d.cli("vm", "stop", n, "--force")


def test_limits_land_in_the_cgroup_and_change_live(daemon: Daemon) -> None:
    d = daemon
    boot(d, "lim", "--memory-max", "1024", "--cpu-max", "50", "--cpu-weight", "300")
    vm = d.vm("lim")
    assert (vm["memory_max_mib"], vm["cpu_max_percent"], vm["cpu_weight"]) == (1024, 50, 300)
    files = _cgroup_files(d, vm)
    cg = _cgroups(d)
    if cg.mode == "v1":
        assert files["memory.limit_in_bytes"] == str(1024 * 2**20)
        assert (files["cpu.cfs_quota_us"], files["cpu.cfs_period_us"]) == ("50000", "100000")
        assert files["cpu.shares"] == str(300 * 1024 // 100)
    else:
        assert files["memory.max"] == str(1024 * 2**20)
        assert files["cpu.max"] == "50000 100000" and files["cpu.weight"] == "300"
    # Changed live, like virsh schedinfo/memtune; `none` removes a limit.
    out = json.loads(d.cli("vm", "set", "lim", "--cpu-max", "20", "--memory-max", "none", "--json").stdout)
    assert (out["cpu_max_percent"], out["memory_max_mib"], out["cpu_weight"]) == (20, None, 300)
    files = _cgroup_files(d, d.vm("lim"))
    if cg.mode == "v1":
        assert files["cpu.cfs_quota_us"] == "20000"
        assert int(files["memory.limit_in_bytes"]) > 2**60  # unlimited
    else:
        assert files["cpu.max"] == "20000 100000" and files["memory.max"] == "max"
    # Kept for the next start.
    d.cli("vm", "stop", "lim", "--force")
    d.cli("vm", "start", "lim")
    assert _cgroup_files(d, d.vm("lim"))["cpu.cfs_quota_us" if cg.mode == "v1" else "cpu.max"].startswith("20000")
    d.cli("vm", "stop", "lim", "--force")


def _guest_exec(d: Daemon, name: str, script: str, timeout_s: float = 120) -> tuple[dict, float]:
    t0 = time.monotonic()
    res = d.cli("vm", "exec", name, "--json", "--timeout", str(timeout_s), "--", "sh", "-c", script, check=False)
    took = time.monotonic() - t0
    assert res.stdout, res.stderr
    return json.loads(res.stdout), took


def test_cpu_max_caps_a_cpu_burner(daemon: Daemon) -> None:
    d = daemon
    boot(d, "burn", "--cpu-max", "20")
    d.cli("vm", "wait", "burn", "--for", "agent", "--timeout", "60")
    _guest_exec(d, "burn", "while :; do :; done </dev/null >/dev/null 2>&1 &")
    time.sleep(1)  # let the burner reach its steady state
    t0, c0 = time.monotonic(), d.vm("burn")["cpu_time_ns"]
    time.sleep(4)
    t1, c1 = time.monotonic(), d.vm("burn")["cpu_time_ns"]
    share = (c1 - c0) / 1e9 / (t1 - t0)
    # About a fifth of one CPU (the guest alone would take a whole one under TCG); generous for a shared host.
    assert 0.08 <= share <= 0.35, share
    d.cli("vm", "stop", "burn", "--force")


def test_iops_limit_shows_in_query_block_and_slows_the_guest(daemon: Daemon) -> None:
    d = daemon
    boot(d, "io", "--disk", "iops=20")
    d.cli("vm", "wait", "io", "--for", "agent", "--timeout", "60")
    disk = json.loads(d.cli("vm", "disks", "io", "--json").stdout)[0]
    assert disk["iops_total"] == 20 and disk["live"]["iops"] == 20 and disk["live"]["group"] == "disk0"
    read = "dd if=/dev/vda of=/dev/null bs=4096 count=80 skip={} iflag=direct 2>&1"
    res, throttled = _guest_exec(d, "io", read.format(0))
    assert res["exitcode"] == 0, res
    # 80 reads at 20 per second: about 4 s (QEMU lets a small burst through first).
    assert throttled >= 2.5, throttled
    d.cli("vm", "set", "io", "--disk", "disk0,iops=none")
    assert json.loads(d.cli("vm", "disks", "io", "--json").stdout)[0]["live"]["iops"] == 0
    res, free = _guest_exec(d, "io", read.format(1000))  # other blocks, so no cache helps
    assert res["exitcode"] == 0, res
    assert free < throttled / 2, (free, throttled)
    d.cli("vm", "stop", "io", "--force")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "create", "x", "--cpu-max", "0"], "cpu_max_percent"),
        (["vm", "create", "x", "--cpu-max", "999999"], "cpu_max_percent"),
        (["vm", "create", "x", "--cpu-max", str(100 * (os.cpu_count() or 1) + 1)], "exceeds the host's"),
        (["vm", "create", "x", "--cpu-weight", "0"], "cpu_weight"),
        (["vm", "create", "x", "--cpu-weight", "10001"], "cpu_weight"),
        (["vm", "create", "x", "--memory", "256", "--memory-max", "128"], "below the guest's memory_mib"),
        (["vm", "create", "x", "--disk", "1G,iops=0"], "iops_total"),
        (["vm", "create", "x", "--disk", "1G,iops=lots"], "invalid iops"),
        (["vm", "create", "x", "--disk", "iops=10"], "needs a SIZE"),
        (["vm", "create", "x", "--disk", "1G,colour=red"], "unknown disk option"),
        (["vm", "set", "keep", "--cpu-max", "-3"], "cpu_max_percent"),
        (["vm", "set", "keep", "--disk", "disk7,iops=5"], "has no disk 'disk7'"),
        (["vm", "set", "keep", "--memory-max", "64"], "below the guest's memory_mib"),
        (["vm", "set", "keep"], "nothing to set"),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(daemon: Daemon, args: list[str], message: str) -> None:
    d = daemon
    if not any(v["name"] == "keep" for v in d.api.get("/v1/vms")):
        d.cli("vm", "create", "keep", "--image", "demo", "--memory", "256", "--cpu-max", "30")
    before = d.api.get("/v1/vms")
    res = d.cli(*args, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert d.api.get("/v1/vms") == before


def test_an_id_range_another_state_dir_uses_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    taken = daemon.env["VMKIT_ID_RANGE"]
    first = int(taken.split(":")[0])
    other = Daemon(tmp_path, {"VMKIT_ID_RANGE": f"{first + 10}-{first + 5000}"})
    try:
        with pytest.raises(RuntimeError, match=f"overlaps the range .* of the vmkit state dir {daemon.state_dir}"):
            other.start()
        assert not (tmp_path / "run" / "vmkit.sock").exists()
        # A free range is fine.
        other.env["VMKIT_ID_RANGE"] = unique_id_range()
        other.start()
    finally:
        other.cleanup()
