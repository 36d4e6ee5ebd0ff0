"""The cgroup driver against fake cgroup trees: plain directories under tmp_path standing in for cgroupfs.

FakeCgroupFs plays the kernel's part the driver relies on: mkdir fills in a cgroup's interface files, rmdir drops
them (and refuses while processes or child cgroups remain), writes go only to existing files and are checked the
way the kernel checks them (subtree_control against cgroup.controllers, the 1 ms quota minimum, v1's -1).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmkit.errors import Conflict, InvalidInput, VmkitError
from vmkit.host import cgroups
from vmkit.host.cgroups import (
    CgroupBusy,
    CgroupError,
    CgroupLimits,
    Cgroups,
    CgroupStats,
    Hierarchy,
    parse_cpu_stat_usage_ns,
    parse_mounts,
    parse_proc_cgroup,
    v1_limit_files,
    v1_shares,
    v2_limit_files,
)

V1_UNLIMITED_READBACK = "9223372036854771712"  # what memory.limit_in_bytes shows after writing -1 (4 KiB pages)
MIB = 1024 * 1024

V1_FILES = {
    "cpu": {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.stat": ""},
    "cpuacct": {"cpuacct.usage": "0", "cpuacct.stat": "user 0\nsystem 0"},
    "memory": {
        "memory.limit_in_bytes": V1_UNLIMITED_READBACK,
        "memory.usage_in_bytes": "0",
        "memory.move_charge_at_immigrate": "0",
        "memory.use_hierarchy": "1",
    },
    "pids": {"pids.max": "max", "pids.current": "0"},
}
V2_FILES = {
    "cpu": {"cpu.weight": "100", "cpu.max": "max 100000"},
    "memory": {"memory.max": "max", "memory.current": "0"},
    "io": {"io.weight": "default 100"},
    "pids": {"pids.max": "max", "pids.current": "0"},
}


def _tokens(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class FakeCgroupFs:
    """mounts: mount point -> v1 controllers, or None for a cgroup2 mount."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, mounts: dict[Path, frozenset[str] | None]) -> None:
        self.mounts = mounts
        self.writes: list[tuple[Path, str]] = []
        self.reject: dict[str, int] = {}  # file name -> errno every write to it fails with
        self.busy_rmdirs = 0  # how many rmdirs answer EBUSY before one works (a cgroup just emptied)
        for m in mounts:
            m.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(cgroups, "_mkdir", self.mkdir)
        monkeypatch.setattr(cgroups, "_rmdir", self.rmdir)
        monkeypatch.setattr(cgroups, "_write_file", self.write_file)

    def _controllers(self, path: Path) -> frozenset[str] | None:
        for m, ctrls in self.mounts.items():
            if path.is_relative_to(m):
                return ctrls
        raise AssertionError(f"{path} is outside every fake mount")

    def _interface_files(self, cgroup: Path) -> dict[str, str]:
        ctrls = self._controllers(cgroup)
        if ctrls is not None:
            files = {"cgroup.procs": "", "tasks": "", "notify_on_release": "0"}
            for c in ctrls:
                files |= V1_FILES.get(c, {})
            return files
        enabled = _tokens(cgroup.parent / "cgroup.subtree_control")
        files = {
            "cgroup.procs": "",
            "cgroup.controllers": " ".join(enabled),
            "cgroup.subtree_control": "",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0",
        }
        for c in enabled:
            files |= V2_FILES.get(c, {})
        return files

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        for name, text in self._interface_files(path).items():
            (path / name).write_text(text + "\n" if text else "")

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if any(p.is_dir() for p in path.iterdir()) or _tokens(path / "cgroup.procs") or self.busy_rmdirs > 0:
            self.busy_rmdirs -= 1
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        for f in path.iterdir():
            f.unlink()
        os.rmdir(path)

    def write_file(self, path: Path, value: str) -> None:
        if not path.is_file():  # cgroupfs has no O_CREAT
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if path.name in self.reject:
            raise OSError(self.reject[path.name], os.strerror(self.reject[path.name]), str(path))
        self.writes.append((path, value))
        if path.name == "cgroup.procs":
            path.write_text(path.read_text() + value + "\n")
        elif path.name == "cgroup.subtree_control":
            self._subtree_control(path, value)
        elif path.name == "cpu.cfs_quota_us" and value != "-1" and int(value) < 1000:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        elif path.name == "memory.limit_in_bytes" and value == "-1":
            path.write_text(V1_UNLIMITED_READBACK + "\n")
        else:
            path.write_text(value + "\n")

    def _subtree_control(self, path: Path, value: str) -> None:
        enabled = _tokens(path)
        for tok in value.split():
            sign, ctrl = tok[0], tok[1:]
            if sign not in "+-" or ctrl not in _tokens(path.parent / "cgroup.controllers"):
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            enabled = [c for c in enabled if c != ctrl] + ([ctrl] if sign == "+" else [])
        path.write_text(" ".join(enabled) + "\n")
        for child in (p for p in path.parent.iterdir() if p.is_dir()):  # the kernel adds files to children
            for c in enabled:
                for name, text in V2_FILES.get(c, {}).items():
                    if not (child / name).exists():
                        (child / name).write_text(text + "\n")

    def writes_to(self, name: str) -> list[str]:
        return [v for p, v in self.writes if p.name == name]


# ---- hosts ------------------------------------------------------------------------------------------------------

V1_SEPARATE = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


def v1_separate_mounts(root: Path) -> str:
    """This machine's shape: each v1 controller on its own, name=systemd, and an empty-ish cgroup2."""
    lines = [f"tmpfs {root} tmpfs rw,nosuid,nodev,noexec,mode=755 0 0"]
    lines += [f"cgroup {root}/{c} cgroup rw,nosuid,nodev,noexec,relatime,{c} 0 0" for c in V1_SEPARATE]
    lines += [
        f"cgroup {root}/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0",
        f"cgroup2 {root}/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0",
    ]
    return "\n".join(lines) + "\n"


def v1_comounted_mounts(root: Path) -> str:
    """The common Debian 10/Ubuntu 20.04 shape: cpu,cpuacct co-mounted (with symlinks), no pids here."""
    return (
        f"sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
        f"cgroup {root}/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0\n"
        f"cgroup {root}/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n"
        f"cgroup {root}/net_cls,net_prio cgroup rw,nosuid,nodev,noexec,relatime,net_cls,net_prio 0 0\n"
    )


def v2_mounts(root: Path) -> str:
    return f"cgroup2 {root} cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n"


@pytest.fixture
def v1_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeCgroupFs, Cgroups]:
    root = tmp_path / "cgroup"
    mounts = {root / c: frozenset([c]) for c in V1_SEPARATE}
    mounts[root / "systemd"] = frozenset()
    fs = FakeCgroupFs(monkeypatch, {**mounts, root / "unified": None})
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (root / "unified" / "cgroup.subtree_control").write_text("\n")
    return fs, Cgroups.detect(mounts=v1_separate_mounts(root), proc_root=tmp_path / "proc")


@pytest.fixture
def v1co_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeCgroupFs, Cgroups]:
    root = tmp_path / "cgroup"
    fs = FakeCgroupFs(
        monkeypatch,
        {
            root / "cpu,cpuacct": frozenset({"cpu", "cpuacct"}),
            root / "memory": frozenset({"memory"}),
            root / "net_cls,net_prio": frozenset({"net_cls", "net_prio"}),
        },
    )
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    return fs, Cgroups.detect(mounts=v1_comounted_mounts(root), proc_root=tmp_path / "proc")


def make_v2_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, delegated: str = "cpu io memory pids"
) -> tuple[FakeCgroupFs, Cgroups]:
    root = tmp_path / "cgroup"
    fs = FakeCgroupFs(monkeypatch, {root: None})
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text(delegated + "\n")
    return fs, Cgroups.detect(mounts=v2_mounts(root), proc_root=tmp_path / "proc")


@pytest.fixture
def v2_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeCgroupFs, Cgroups]:
    return make_v2_host(tmp_path, monkeypatch)


# ---- detection --------------------------------------------------------------------------------------------------


def test_parse_mounts_separate_v1_and_hybrid_v2() -> None:
    v2, v1 = parse_mounts(v1_separate_mounts(Path("/sys/fs/cgroup")))
    assert v2 == [Path("/sys/fs/cgroup/unified")]
    assert [h.mount.name for h in v1] == list(V1_SEPARATE)  # name=systemd has no controller
    assert all(h.controllers == {h.mount.name} for h in v1)


def test_parse_mounts_comounted_escaped_and_bind_mounted() -> None:
    text = (
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0\n"
        "cgroup /srv/my\\040tree/memory cgroup rw,memory 0 0\n"
        "cgroup /var/lib/ct/sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"  # the same hierarchy again
        "garbage\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    v2, v1 = parse_mounts(text)
    assert v2 == [Path("/sys/fs/cgroup/unified")]
    assert v1 == [
        Hierarchy(Path("/sys/fs/cgroup/cpu,cpuacct"), frozenset({"cpu", "cpuacct"})),
        Hierarchy(Path("/srv/my tree/memory"), frozenset({"memory"})),
    ]


def test_detect_v1_separate(v1_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    _, cg = v1_host
    assert cg.mode == "v1"
    assert cg.describe() == "v1 (cpu, cpuacct, memory, pids)"
    assert cg.missing() == []
    assert [h.mount.name for h in cg.hierarchies] == ["cpu", "cpuacct", "memory", "pids"]


def test_detect_v1_comounted(v1co_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    _, cg = v1co_host
    assert cg.mode == "v1"
    assert cg.describe() == "v1 (cpu, cpuacct, memory)"
    assert [h.mount.name for h in cg.hierarchies] == ["cpu,cpuacct", "memory"]


def test_detect_v2(v2_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    _, cg = v2_host
    assert cg.mode == "v2"
    assert cg.describe() == "v2 (cpu, memory, io, pids)"
    assert cg.missing() == []


def test_detect_v2_without_optional_controllers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cg = make_v2_host(tmp_path, monkeypatch, delegated="memory cpu")
    assert cg.describe() == "v2 (cpu, memory)"


def test_detect_v2_root_not_delegating_is_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, cg = make_v2_host(tmp_path, monkeypatch, delegated="cpu pids")
    assert cg.mode == "none"
    assert cg.missing() == ["memory"]
    assert "echo '+memory' >" in cg.describe()
    with pytest.raises(CgroupError, match="not usable"):
        cg.create("web", CgroupLimits())
    assert fs.writes == []  # never touches the root


def test_detect_prefers_v2_over_v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cgroup"
    FakeCgroupFs(monkeypatch, {root / "unified": None, root / "memory": frozenset({"memory"})})
    (root / "unified" / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "unified" / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    cg = Cgroups.detect(mounts=v1_separate_mounts(root))
    assert cg.mode == "v2"
    assert cg.hierarchies == [Hierarchy(root / "unified", frozenset({"cpu", "memory", "io", "pids"}))]


def test_detect_this_machine_shape_uses_v1(v1_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    # The hybrid cgroup2 offers only hugetlb: v1 it is.
    assert v1_host[1].mode == "v1"


@pytest.mark.parametrize(
    ("mounts", "missing"),
    [
        ("proc /proc proc rw 0 0\n", ["cpu", "memory"]),
        ("cgroup /x/memory cgroup rw,memory 0 0\n", ["cpu", "cpuacct"]),
        ("cgroup /x/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n", ["memory"]),
    ],
)
def test_detect_none(mounts: str, missing: list[str], tmp_path: Path) -> None:
    cg = Cgroups.detect(mounts=mounts)
    assert cg.mode == "none"
    assert cg.missing() == missing
    assert cg.describe().startswith("none: ")
    assert ", ".join(missing) in cg.describe()
    assert cg.get("web") is None
    assert cg.names() == []
    cg.remove("web")  # nothing to remove is fine
    with pytest.raises(InvalidInput):
        cg.get("..")
    with pytest.raises(CgroupError):
        cg.create("web", CgroupLimits())


def test_detect_reads_real_mounts_by_default() -> None:
    assert Cgroups.detect().mode in ("v1", "v2", "none")


# ---- limits -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weight", "shares"), [(1, 10), (50, 512), (100, 1024), (250, 2560), (10000, 102400)])
def test_weight_to_shares(weight: int, shares: int) -> None:
    assert v1_shares(weight) == shares
    assert v1_limit_files(CgroupLimits(cpu_weight=weight))["cpu.shares"] == str(shares)


def test_shares_floor() -> None:
    assert v1_shares(0) == 2


def test_limit_files_values() -> None:
    limits = CgroupLimits(cpu_weight=200, cpu_max_percent=150, memory_max_mib=512)
    assert v2_limit_files(limits) == {"cpu.weight": "200", "cpu.max": "150000 100000", "memory.max": str(512 * MIB)}
    assert v1_limit_files(limits) == {
        "cpu.shares": "2048",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "150000",
        "memory.limit_in_bytes": str(512 * MIB),
    }
    # The period is written before its quota.
    assert list(v1_limit_files(limits)).index("cpu.cfs_period_us") < list(v1_limit_files(limits)).index(
        "cpu.cfs_quota_us"
    )


def test_limit_files_none_means_unlimited() -> None:
    assert v2_limit_files(CgroupLimits()) == {"cpu.weight": "100", "cpu.max": "max 100000", "memory.max": "max"}
    assert v1_limit_files(CgroupLimits()) == {
        "cpu.shares": "1024",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "-1",
        "memory.limit_in_bytes": "-1",
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_weight": 0},
        {"cpu_weight": 10001},
        {"cpu_weight": True},
        {"cpu_max_percent": 0},
        {"cpu_max_percent": -5},
        {"cpu_max_percent": 50.5},
        {"memory_max_mib": 0},
        {"memory_max_mib": "256"},
    ],
)
def test_bad_limits_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        CgroupLimits(**kwargs)  # type: ignore[arg-type]


# ---- create / apply / read --------------------------------------------------------------------------------------


def test_create_v1_separate(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    fs, cg = v1_host
    root = tmp_path / "cgroup"
    vm = cg.create("web.1a2b3c4d", CgroupLimits(cpu_weight=50, cpu_max_percent=20, memory_max_mib=256))
    assert vm.path == "/vmkit/web.1a2b3c4d"
    d = {c: root / c / "vmkit" / "web.1a2b3c4d" for c in ("cpu", "cpuacct", "memory", "pids")}
    assert all(p.is_dir() for p in d.values())
    assert not (root / "cpuset" / "vmkit").exists()  # only the hierarchies vmkit uses
    assert not (root / "unified" / "vmkit").exists()
    assert (d["cpu"] / "cpu.shares").read_text() == "512\n"
    assert (d["cpu"] / "cpu.cfs_period_us").read_text() == "100000\n"
    assert (d["cpu"] / "cpu.cfs_quota_us").read_text() == "20000\n"
    assert (d["memory"] / "memory.limit_in_bytes").read_text() == f"{256 * MIB}\n"
    assert (d["memory"] / "memory.move_charge_at_immigrate").read_text() == "3\n"
    assert fs.writes_to("memory.use_hierarchy") == []
    assert cg.move_charge is True
    assert vm.read_limits() == {
        "cpu.shares": "512",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "20000",
        "memory.limit_in_bytes": str(256 * MIB),
    }
    # Live change, then reset to unlimited.
    vm.apply(CgroupLimits(cpu_max_percent=200))
    assert vm.read_limits()["cpu.cfs_quota_us"] == "200000"
    vm.apply(CgroupLimits())
    assert vm.read_limits() == {
        "cpu.shares": "1024",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "-1",
        "memory.limit_in_bytes": V1_UNLIMITED_READBACK,
    }
    # Nothing outside our own cgroups was written.
    assert all(p.relative_to(root).parts[1] == "vmkit" for p, _ in fs.writes)


def test_create_v1_comounted(v1co_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v1co_host
    vm = cg.create("db", CgroupLimits(cpu_weight=300, memory_max_mib=64))
    cpu_dir = tmp_path / "cgroup" / "cpu,cpuacct" / "vmkit" / "db"
    assert vm.dirs == [cpu_dir, tmp_path / "cgroup" / "memory" / "vmkit" / "db"]
    assert (cpu_dir / "cpu.shares").read_text() == "3072\n"
    assert (cpu_dir / "cpuacct.usage").exists()
    assert vm.read_limits()["memory.limit_in_bytes"] == str(64 * MIB)
    assert not (tmp_path / "cgroup" / "net_cls,net_prio" / "vmkit").exists()


def test_create_v2(v2_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    fs, cg = v2_host
    root = tmp_path / "cgroup"
    vm = cg.create("web", CgroupLimits(cpu_weight=500, cpu_max_percent=50, memory_max_mib=1024))
    assert (root / "vmkit" / "cgroup.subtree_control").read_text().split() == ["cpu", "memory", "io", "pids"]
    d = root / "vmkit" / "web"
    assert (d / "cpu.weight").read_text() == "500\n"
    assert (d / "cpu.max").read_text() == "50000 100000\n"
    assert (d / "memory.max").read_text() == f"{1024 * MIB}\n"
    assert vm.read_limits() == {"cpu.weight": "500", "cpu.max": "50000 100000", "memory.max": str(1024 * MIB)}
    vm.apply(CgroupLimits())
    assert vm.read_limits() == {"cpu.weight": "100", "cpu.max": "max 100000", "memory.max": "max"}
    # Idempotent; subtree_control is written once, the host root never.
    again = cg.create("web", CgroupLimits(memory_max_mib=300))
    assert again.read_limits()["memory.max"] == str(300 * MIB)
    cg.create("db", CgroupLimits())
    assert fs.writes_to("cgroup.subtree_control") == ["+cpu +memory +io +pids"]
    assert all(p.is_relative_to(root / "vmkit") for p, _ in fs.writes)
    assert cg.names() == ["db", "web"]


def test_create_v2_enables_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, cg = make_v2_host(tmp_path, monkeypatch, delegated="cpu memory")
    (tmp_path / "cgroup" / "vmkit").mkdir()
    (tmp_path / "cgroup" / "vmkit" / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup" / "vmkit" / "cgroup.subtree_control").write_text("memory\n")
    cg.create("web", CgroupLimits(cpu_weight=10))
    assert fs.writes_to("cgroup.subtree_control") == ["+cpu"]


def test_move_charge_refused_by_new_kernels(v1_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    # Linux >= 6.13 keeps memory.move_charge_at_immigrate but accepts only 0.
    fs, cg = v1_host
    fs.reject["memory.move_charge_at_immigrate"] = errno.EINVAL
    cg.create("a", CgroupLimits(memory_max_mib=100))
    assert cg.move_charge is False
    del fs.reject["memory.move_charge_at_immigrate"]
    cg.create("b", CgroupLimits())
    assert fs.writes_to("memory.move_charge_at_immigrate") == []  # not tried again


def test_create_rolls_back_on_failure(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    fs, cg = v1_host
    fs.reject["memory.limit_in_bytes"] = errno.EBUSY
    with pytest.raises(CgroupError, match="memory.limit_in_bytes"):
        cg.create("web", CgroupLimits(memory_max_mib=16))
    assert cg.names() == []
    assert cg.get("web") is None
    assert (tmp_path / "cgroup" / "memory" / "vmkit").is_dir()  # the parent may serve other VMs


def test_apply_error_is_clear(v1_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    fs, cg = v1_host
    vm = cg.create("web", CgroupLimits())
    fs.reject["cpu.cfs_quota_us"] = errno.EINVAL
    with pytest.raises(CgroupError, match=r"cannot write '20000' to .*/vmkit/web/cpu.cfs_quota_us: Invalid argument"):
        vm.apply(CgroupLimits(cpu_max_percent=20))


# ---- attach / contains / stats ----------------------------------------------------------------------------------


def _proc(tmp_path: Path, pid: int, text: str) -> None:
    (tmp_path / "proc" / str(pid)).mkdir(parents=True)
    (tmp_path / "proc" / str(pid) / "cgroup").write_text(text)


def test_attach_and_contains_v1(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    fs, cg = v1_host
    vm = cg.create("web", CgroupLimits())
    vm.attach(4242)
    assert [p.parent.parent.parent.name for p, v in fs.writes if p.name == "cgroup.procs" and v == "4242"] == [
        "cpu",
        "cpuacct",
        "memory",
        "pids",
    ]
    assert vm.procs() == [4242]
    lines = "9:name=systemd:/\n8:pids:{p}\n4:memory:{p}\n3:cpuset:/\n2:cpuacct:{p}\n1:cpu:{p}\n0::/\n"
    _proc(tmp_path, 4242, lines.format(p="/vmkit/web"))
    assert vm.contains(4242)
    _proc(tmp_path, 4343, lines.format(p="/vmkit/web").replace("4:memory:/vmkit/web", "4:memory:/other"))
    assert not vm.contains(4343)  # not in every hierarchy
    assert not vm.contains(99999)  # gone


def test_contains_comounted(v1co_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v1co_host
    vm = cg.create("db", CgroupLimits())
    _proc(tmp_path, 7, "5:net_cls,net_prio:/\n3:memory:/vmkit/db\n2:cpu,cpuacct:/vmkit/db\n1:name=systemd:/x\n")
    assert vm.contains(7)


def test_contains_v2(v2_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v2_host
    vm = cg.create("web", CgroupLimits())
    _proc(tmp_path, 7, "0::/vmkit/web\n")
    _proc(tmp_path, 8, "0::/vmkit/web2\n")
    assert vm.contains(7)
    assert not vm.contains(8)


def test_parse_proc_cgroup_keeps_colons_in_paths() -> None:
    assert parse_proc_cgroup("1:cpu,cpuacct:/a:b\n0::/x\n") == [
        (frozenset({"cpu", "cpuacct"}), "/a:b"),
        (frozenset(), "/x"),
    ]


def test_stats_v1(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v1_host
    vm = cg.create("web", CgroupLimits())
    root = tmp_path / "cgroup"
    (root / "cpuacct" / "vmkit" / "web" / "cpuacct.usage").write_text("123456789\n")
    (root / "memory" / "vmkit" / "web" / "memory.usage_in_bytes").write_text("268435456\n")
    assert vm.stats() == CgroupStats(cpu_time_ns=123456789, memory_bytes=268435456)
    (root / "memory" / "vmkit" / "web" / "memory.usage_in_bytes").write_text("garbage\n")
    (root / "cpuacct" / "vmkit" / "web" / "cpuacct.usage").unlink()
    assert vm.stats() == CgroupStats(cpu_time_ns=None, memory_bytes=None)


def test_stats_v2(v2_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v2_host
    vm = cg.create("web", CgroupLimits())
    d = tmp_path / "cgroup" / "vmkit" / "web"
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n")
    (d / "memory.current").write_text("4096\n")
    assert vm.stats() == CgroupStats(cpu_time_ns=1_500_000, memory_bytes=4096)


def test_parse_cpu_stat() -> None:
    assert parse_cpu_stat_usage_ns("user_usec 3\nusage_usec 7\n") == 7000
    assert parse_cpu_stat_usage_ns("usage_usecs 7\n") is None
    assert parse_cpu_stat_usage_ns("") is None


# ---- names, get, remove -----------------------------------------------------------------------------------------


BAD_NAMES = ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "-a", "a" * 64, "a b", "a\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused(name: str, v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    fs, cg = v1_host
    calls: list[Callable[[], object]] = [
        lambda: cg.create(name, CgroupLimits()),
        lambda: cg.get(name),
        lambda: cg.remove(name),
    ]
    for call in calls:
        with pytest.raises(InvalidInput):
            call()
    assert fs.writes == []
    assert not (tmp_path / "cgroup" / "cpu" / "vmkit").exists()


@pytest.mark.parametrize("parent", ["", "..", "a/b", "../vmkit"])
def test_bad_parent_refused(parent: str) -> None:
    with pytest.raises(InvalidInput):
        Cgroups.detect(parent=parent, mounts="")


def test_names_get_and_leftovers(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v1_host
    assert cg.names() == []  # no parent yet
    cg.create("b", CgroupLimits())
    cg.create("a", CgroupLimits())
    # A leftover present in one hierarchy only, and a stray file: listed / ignored.
    (tmp_path / "cgroup" / "memory" / "vmkit" / "half").mkdir()
    (tmp_path / "cgroup" / "memory" / "vmkit" / "notes.txt").write_text("x")
    assert cg.names() == ["a", "b", "half"]
    a = cg.get("a")
    assert a is not None and a.path == "/vmkit/a"
    assert cg.get("half") is None  # incomplete: create() completes it
    assert cg.get("nope") is None
    cg.remove("half")
    assert cg.names() == ["a", "b"]


def test_remove(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    fs, cg = v1_host
    cg.remove("never-made")  # no parent either: fine
    cg.create("web", CgroupLimits(memory_max_mib=64))
    cg.remove("web")
    cg.remove("web")  # already gone: fine
    assert cg.names() == []
    cg.remove_parent()
    cg.remove_parent()
    assert [p.name for p in (tmp_path / "cgroup" / "memory").iterdir()] == []


def test_remove_retries_a_briefly_busy_cgroup(v2_host: tuple[FakeCgroupFs, Cgroups]) -> None:
    fs, cg = v2_host
    cg.create("web", CgroupLimits())
    fs.busy_rmdirs = 3
    cg.remove("web")
    assert cg.get("web") is None


def test_remove_with_live_processes_raises(
    v1_host: tuple[FakeCgroupFs, Cgroups], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "REMOVE_WAIT_S", 0.05)
    _, cg = v1_host
    vm = cg.create("web", CgroupLimits())
    vm.attach(4242)
    with pytest.raises(CgroupBusy, match="still holds processes 4242") as exc:
        cg.remove("web")
    assert isinstance(exc.value, VmkitError) and isinstance(exc.value, Conflict)
    assert exc.value.status == 409
    assert cg.get("web") is not None


def test_remove_parent_with_children_raises(
    v2_host: tuple[FakeCgroupFs, Cgroups], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "REMOVE_WAIT_S", 0.05)
    _, cg = v2_host
    cg.create("web", CgroupLimits())
    with pytest.raises(CgroupBusy, match="child cgroups"):
        cg.remove_parent()


def test_other_parent_names_are_separate(v1_host: tuple[FakeCgroupFs, Cgroups], tmp_path: Path) -> None:
    _, cg = v1_host
    other = Cgroups.detect(parent="vmkit-test-1", mounts=v1_separate_mounts(tmp_path / "cgroup"))
    cg.create("web", CgroupLimits())
    vm = other.create("web", CgroupLimits())
    assert vm.path == "/vmkit-test-1/web"
    assert other.names() == ["web"]
    other.remove("web")
    other.remove_parent()
    assert cg.names() == ["web"]
