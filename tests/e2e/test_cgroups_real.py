"""The cgroup driver on this host's real cgroups (root only).

Everything lives under a parent named after this test process, so runs side by side never collide, and the
parent is removed at the end in every hierarchy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.host.cgroups import CgroupBusy, CgroupLimits, Cgroups, VmCgroup

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MIB = 1024 * 1024
BURN = "while True: pass"


@pytest.fixture
def cg() -> Iterator[Cgroups]:
    cgroups = Cgroups.detect(parent=f"vmkit-test-{os.getpid()}")
    if cgroups.mode == "none":
        pytest.skip(f"no usable cgroups: {cgroups.describe()}")
    try:
        yield cgroups
    finally:
        for name in cgroups.names():
            cgroups.remove(name)
        cgroups.remove_parent()
        assert [h.mount / cgroups.parent for h in cgroups.hierarchies if (h.mount / cgroups.parent).exists()] == []


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def _expected_limits(cg: Cgroups, weight: int, percent: int | None, mib: int | None) -> dict[str, str]:
    if cg.mode == "v2":
        return {
            "cpu.weight": str(weight),
            "cpu.max": f"{percent * 1000 if percent else 'max'} 100000",
            "memory.max": str(mib * MIB) if mib else "max",
        }
    return {
        "cpu.shares": str(weight * 1024 // 100),
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": str(percent * 1000) if percent else "-1",
        # -1 reads back as the largest page-aligned counter value.
        "memory.limit_in_bytes": str(mib * MIB) if mib else str((2**63 - 1) // 4096 * 4096),
    }


def test_limits_attach_stats_remove(cg: Cgroups) -> None:
    vm = cg.create("web", CgroupLimits(cpu_weight=50, cpu_max_percent=20, memory_max_mib=256))
    assert vm.path == f"/{cg.parent}/web"
    assert vm.read_limits() == _expected_limits(cg, 50, 20, 256)
    assert cg.create("web", CgroupLimits(cpu_weight=50, cpu_max_percent=20, memory_max_mib=256)).dirs == vm.dirs
    vm.apply(CgroupLimits(cpu_weight=200, memory_max_mib=512))
    assert vm.read_limits() == _expected_limits(cg, 200, None, 512)
    vm.apply(CgroupLimits())
    assert vm.read_limits() == _expected_limits(cg, 100, None, None)
    assert cg.names() == ["web"]
    assert cg.get("web") is not None

    procs: list[subprocess.Popen[bytes]] = []
    try:
        sleeper = subprocess.Popen(["sleep", "30"])
        procs.append(sleeper)
        assert not vm.contains(sleeper.pid)
        vm.attach(sleeper.pid)
        assert vm.contains(sleeper.pid)
        lines = Path(f"/proc/{sleeper.pid}/cgroup").read_text().splitlines()
        ours = [line for line in lines if line.split(":", 2)[2] == vm.path]
        assert len(ours) == len(cg.hierarchies), lines
        assert vm.procs() == [sleeper.pid]
        stats = vm.stats()
        assert isinstance(stats.cpu_time_ns, int) and stats.cpu_time_ns >= 0
        assert isinstance(stats.memory_bytes, int) and stats.memory_bytes >= 0

        with pytest.raises(CgroupBusy, match=str(sleeper.pid)):
            cg.remove("web")
    finally:
        _kill(procs)
    assert not vm.contains(sleeper.pid)
    cg.remove("web")
    assert cg.get("web") is None
    assert cg.names() == []
    assert all(not d.exists() for d in vm.dirs)


def _nr_throttled(cg: Cgroups, vm: VmCgroup) -> int:
    cpu_dir = next(d for h, d in zip(cg.hierarchies, vm.dirs, strict=True) if "cpu" in h.controllers)
    stat = dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())
    return int(stat["nr_throttled"])


def test_cpu_quota_holds_a_burner_to_its_share(cg: Cgroups) -> None:
    vm = cg.create("burn", CgroupLimits(cpu_max_percent=20))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        burner = subprocess.Popen([sys.executable, "-c", BURN])
        procs.append(burner)
        vm.attach(burner.pid)
        time.sleep(0.3)  # past the first period, whose quota may already be spent
        before, t0 = vm.stats().cpu_time_ns, time.monotonic_ns()
        time.sleep(2)
        after, t1 = vm.stats().cpu_time_ns, time.monotonic_ns()
        assert before is not None and after is not None
        share = (after - before) / (t1 - t0)
        assert 0.08 <= share <= 0.35, f"burner used {share:.2f} of a core under a 20% quota"
        throttled = _nr_throttled(cg, vm)
        assert throttled > 0
        # Lifted live: no more throttling (a load-independent sign, unlike the share the burner then gets).
        vm.apply(CgroupLimits())
        time.sleep(0.3)
        throttled = _nr_throttled(cg, vm)
        time.sleep(0.5)
        assert _nr_throttled(cg, vm) == throttled
    finally:
        _kill(procs)
    # Right after the burner has been reaped (the driver retries a briefly busy cgroup itself).
    cg.remove("burn")
    assert cg.names() == []


def test_remove_right_after_kill_without_reaping(cg: Cgroups) -> None:
    # A QEMU the daemon re-attached to is not its child: it is killed, never waited for, then removed.
    vm = cg.create("gone", CgroupLimits())
    proc = subprocess.Popen(["sleep", "30"])
    try:
        vm.attach(proc.pid)
        proc.kill()
        cg.remove("gone")
        assert cg.get("gone") is None
    finally:
        _kill([proc])
