"""Each VM's QEMU in a cgroup of its own: cgroup v2 where the host has it, the v1 controllers otherwise.

Layout: a VM's cgroup is PARENT/NAME at the top of every hierarchy in use — the one unified hierarchy in v2;
in v1 each mounted hierarchy holding cpu, cpuacct, memory or pids (co-mounted controllers share a directory).
Invariant: we write only inside PARENT. Hierarchy roots and the host's other cgroups are read, never written, so
in v2 the root must already hand cpu and memory down (its cgroup.subtree_control lists them, as systemd's does);
if it does not, v2 counts as unusable and describe() says why.

Limits use v2 semantics (weight 1..10000, percent of one CPU, MiB); v1 gets the equivalent values.
Tests stand in a fake cgroupfs by replacing _mkdir, _rmdir and _write_file: kernfs creates and drops a cgroup's
interface files and checks what is written, plain directories do neither. Importing this module stays cheap
(stdlib only) because `vmkit host check` runs in the CLI process.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import Conflict, InvalidInput, VmkitError

log = logging.getLogger(__name__)

V2_REQUIRED = ("cpu", "memory")
V2_OPTIONAL = ("io", "pids")
V1_REQUIRED = ("cpu", "cpuacct", "memory")
V1_OPTIONAL = ("pids",)
# Controller names that may appear among a v1 mount's options (the rest are mount flags or name=).
V1_KNOWN = frozenset(
    {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio", "blkio", "perf_event"}
    | {"hugetlb", "pids", "rdma", "misc"}
)

CFS_PERIOD_US = 100_000
CPU_WEIGHT_DEFAULT = 100
CPU_WEIGHT_MAX = 10_000
CPU_MAX_PERCENT_MAX = 100_000  # 1000 CPUs: far above any host, far below the kernel's quota ceiling
V1_SHARES_MIN = 2  # the kernel raises smaller values to 2
V1_UNLIMITED = "-1"
MIB = 1024 * 1024
REMOVE_WAIT_S = 0.5  # a cgroup whose last process just exited stays busy for a moment
REMOVE_POLL_S = 0.02

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class CgroupError(VmkitError):
    """A cgroup could not be created, written or read."""


class CgroupBusy(CgroupError, Conflict):
    """A cgroup cannot be removed: it still holds processes (or child cgroups)."""

    status = Conflict.status


@dataclass(frozen=True)
class CgroupLimits:
    cpu_weight: int | None = None  # v2 semantics, 1..10000, default 100 (v1: cpu.shares = weight*1024//100, >= 2)
    cpu_max_percent: int | None = None  # percent of ONE CPU: 50 = half a core, 200 = two cores; None = unlimited
    memory_max_mib: int | None = None  # the whole QEMU incl. its own overhead; None = unlimited

    def __post_init__(self) -> None:
        _check_int("cpu_weight", self.cpu_weight, 1, CPU_WEIGHT_MAX)
        # 1% of a 100 ms period is 1 ms, the smallest quota the kernel accepts.
        _check_int("cpu_max_percent", self.cpu_max_percent, 1, CPU_MAX_PERCENT_MAX)
        _check_int("memory_max_mib", self.memory_max_mib, 1, 1 << 40)


@dataclass(frozen=True)
class CgroupStats:
    cpu_time_ns: int | None  # v2 cpu.stat usage_usec*1000; v1 cpuacct.usage
    memory_bytes: int | None  # v2 memory.current; v1 memory.usage_in_bytes


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and the controllers of it that vmkit may use."""

    mount: Path
    controllers: frozenset[str]


def _check_int(field: str, value: int | None, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{field} must be an integer from {low} to {high}, not {value!r}")


def check_name(name: str, what: str = "cgroup") -> str:
    """Refuse anything that is not one plain path component (callers validate already; this is the last line)."""
    if not isinstance(name, str) or "/" in name or name in (".", "..") or not _NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid {what} name {name!r}")
    return name


# ---- pure: mounts text and limit files -------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> tuple[list[Path], list[Hierarchy]]:
    """The cgroup2 mount points and the v1 hierarchies (with their controllers) in /proc/self/mounts text.

    A hierarchy mounted twice (bind mounts) is listed once: the first mount of a controller wins.
    """
    v2: list[Path] = []
    v1: list[Hierarchy] = []
    seen: set[str] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, fstype, options = Path(_unescape(fields[1])), fields[2], fields[3].split(",")
        if fstype == "cgroup2" and mount not in v2:
            v2.append(mount)
        elif fstype == "cgroup":
            controllers = frozenset(o for o in options if o in V1_KNOWN)
            if controllers and not controllers & seen:
                seen |= controllers
                v1.append(Hierarchy(mount, controllers))
    return v2, v1


def v2_limit_files(limits: CgroupLimits) -> dict[str, str]:
    """File name -> value for a v2 cgroup; None resets to the kernel's default."""
    weight = limits.cpu_weight if limits.cpu_weight is not None else CPU_WEIGHT_DEFAULT
    quota = "max" if limits.cpu_max_percent is None else str(_quota_us(limits.cpu_max_percent))
    memory = "max" if limits.memory_max_mib is None else str(limits.memory_max_mib * MIB)
    return {"cpu.weight": str(weight), "cpu.max": f"{quota} {CFS_PERIOD_US}", "memory.max": memory}


def v1_limit_files(limits: CgroupLimits) -> dict[str, str]:
    """File name -> value for the v1 controllers, in the order to write them (the period before its quota)."""
    weight = limits.cpu_weight if limits.cpu_weight is not None else CPU_WEIGHT_DEFAULT
    quota = V1_UNLIMITED if limits.cpu_max_percent is None else str(_quota_us(limits.cpu_max_percent))
    memory = V1_UNLIMITED if limits.memory_max_mib is None else str(limits.memory_max_mib * MIB)
    return {
        "cpu.shares": str(v1_shares(weight)),
        "cpu.cfs_period_us": str(CFS_PERIOD_US),
        "cpu.cfs_quota_us": quota,
        "memory.limit_in_bytes": memory,
    }


def v1_shares(weight: int) -> int:
    """cpu.shares for a v2 weight: the defaults match (100 -> 1024)."""
    return max(V1_SHARES_MIN, weight * 1024 // 100)


def _quota_us(percent: int) -> int:
    return percent * CFS_PERIOD_US // 100


def parse_cpu_stat_usage_ns(text: str) -> int | None:
    """usage_usec from a v2 cpu.stat, in ns."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) * 1000
    return None


def parse_proc_cgroup(text: str) -> list[tuple[frozenset[str], str]]:
    """/proc/PID/cgroup lines as (controllers, path); the v2 line has no controllers."""
    entries = []
    for line in text.splitlines():
        parts = line.split(":", 2)  # the path itself may contain ':'
        if len(parts) == 3:
            entries.append((frozenset(c for c in parts[1].split(",") if c), parts[2]))
    return entries


# ---- file system seams (tests replace these with a fake cgroupfs) ----------------------------------------------


def _mkdir(path: Path) -> None:
    os.mkdir(path, 0o755)


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def _write_file(path: Path, value: str) -> None:
    # One write(2) per value: cgroupfs parses each write on its own. No O_CREAT: every file we write exists.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    try:
        _write_file(path, value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror or e}") from e


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _tokens(path: Path) -> list[str]:
    # cgroup.controllers / cgroup.subtree_control: "cpu io memory"; a leading '+' is tolerated.
    return [t.lstrip("+") for t in (_read(path) or "").split()]


def _procs(cgroup_dir: Path) -> list[int]:
    return [int(p) for p in (_read(cgroup_dir / "cgroup.procs") or "").split() if p.isdigit()]


# ---- the driver -------------------------------------------------------------------------------------------------


class VmCgroup:
    """One VM's cgroup: the same relative path in every hierarchy in use."""

    def __init__(self, *, mode: str, path: str, dirs: list[tuple[Hierarchy, Path]], proc_root: Path) -> None:
        self.mode = mode
        self.path = path
        self._dirs = dirs
        self._proc_root = proc_root

    def __repr__(self) -> str:
        return f"VmCgroup({self.mode} {self.path})"

    @property
    def dirs(self) -> list[Path]:
        return [d for _, d in self._dirs]

    def _dir(self, controller: str) -> Path:
        if self.mode == "v2":
            return self._dirs[0][1]
        for hier, d in self._dirs:
            if controller in hier.controllers:
                return d
        raise CgroupError(f"{self.path}: controller {controller} is not in use")

    def _limit_files(self, limits: CgroupLimits) -> dict[str, str]:
        return v2_limit_files(limits) if self.mode == "v2" else v1_limit_files(limits)

    def apply(self, limits: CgroupLimits) -> None:
        """Write every limit (None resets to unlimited or the default weight); fine while QEMU runs.

        Lowering memory below what QEMU uses makes the kernel reclaim; v1 refuses (EBUSY) if it cannot,
        v2 OOM-kills. Either way the caller gets a CgroupError or a dead QEMU, never a silent no-op.
        """
        for fname, value in self._limit_files(limits).items():
            _write(self._dir(fname.split(".", 1)[0]) / fname, value)

    def read_limits(self) -> dict[str, str]:
        """Raw contents of the limit files, keyed by file name ('' for an unreadable one)."""
        return {
            fname: _read(self._dir(fname.split(".", 1)[0]) / fname) or "" for fname in self._limit_files(CgroupLimits())
        }

    def attach(self, pid: int) -> None:
        """Move process pid with all its threads in (cgroup.procs in each hierarchy)."""
        for _, d in self._dirs:
            try:
                _write_file(d / "cgroup.procs", str(pid))
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise CgroupError(f"cannot move process {pid} into {self.path}: no such process") from e
                raise CgroupError(f"cannot move process {pid} into {d}: {e.strerror or e}") from e

    def contains(self, pid: int) -> bool:
        """Whether pid is in this cgroup in every hierarchy in use (False once it is gone)."""
        try:
            entries = parse_proc_cgroup((self._proc_root / str(pid) / "cgroup").read_text())
        except OSError:
            return False
        if self.mode == "v2":
            return any(not ctrls and path == self.path for ctrls, path in entries)
        return all(
            any(ctrls & hier.controllers and path == self.path for ctrls, path in entries) for hier, _ in self._dirs
        )

    def procs(self) -> list[int]:
        """Processes in the cgroup (v1: in any of its hierarchies)."""
        return sorted({p for _, d in self._dirs for p in _procs(d)})

    def stats(self) -> CgroupStats:
        if self.mode == "v2":
            d = self._dir("cpu")
            cpu_stat = _read(d / "cpu.stat")
            return CgroupStats(
                cpu_time_ns=parse_cpu_stat_usage_ns(cpu_stat) if cpu_stat is not None else None,
                memory_bytes=_read_int(d / "memory.current"),
            )
        return CgroupStats(
            cpu_time_ns=_read_int(self._dir("cpuacct") / "cpuacct.usage"),
            memory_bytes=_read_int(self._dir("memory") / "memory.usage_in_bytes"),
        )


class Cgroups:
    """Host-wide: which mode, where each controller lives; every VM cgroup sits under one parent dir named
    `parent` at the top of each hierarchy.

    Mount points come from the mounts text, so a test points the whole driver at a fake tree by passing its own.
    """

    def __init__(
        self,
        *,
        mode: str,
        parent: str,
        hierarchies: list[Hierarchy],
        controllers: list[str],
        missing: list[str],
        notes: list[str],
        proc_root: Path,
    ) -> None:
        self.mode = mode
        self.parent = parent
        self.controllers = controllers  # in use, required first
        self.hierarchies = hierarchies
        self._missing = missing
        self._notes = notes
        self._proc_root = proc_root
        # v1 charge moving was removed in Linux 6.13 (the file stays but takes only 0); learnt on first try.
        self.move_charge: bool | None = None

    def __repr__(self) -> str:
        return f"Cgroups({self.describe()!r})"

    @classmethod
    def detect(cls, *, parent: str = "vmkit", mounts: str | None = None, proc_root: Path = Path("/proc")) -> Cgroups:
        """Find the hierarchies from /proc/self/mounts (or `mounts`) and pick v2, else v1, else none.

        Cheap: one read of the mounts text plus the v2 root's two controller lists; nothing is written.
        """
        check_name(parent, "cgroup parent")
        if mounts is None:
            try:
                mounts = Path("/proc/self/mounts").read_text()
            except OSError as e:
                return cls(
                    mode="none",
                    parent=parent,
                    hierarchies=[],
                    controllers=[],
                    missing=list(V2_REQUIRED),
                    notes=[f"cannot read /proc/self/mounts: {e.strerror or e}"],
                    proc_root=proc_root,
                )
        v2_mounts, v1 = parse_mounts(mounts)
        notes: list[str] = []
        best_v2_missing: list[str] | None = None
        for mount in v2_mounts:
            available = _tokens(mount / "cgroup.controllers")
            delegated = _tokens(mount / "cgroup.subtree_control")
            lacking = [c for c in V2_REQUIRED if c not in delegated]
            if not lacking:
                controllers = list(V2_REQUIRED) + [c for c in V2_OPTIONAL if c in delegated]
                return cls(
                    mode="v2",
                    parent=parent,
                    hierarchies=[Hierarchy(mount, frozenset(controllers))],
                    controllers=controllers,
                    missing=[],
                    notes=[],
                    proc_root=proc_root,
                )
            absent = [c for c in lacking if c not in available]
            undelegated = [c for c in lacking if c in available]
            if absent:
                notes.append(f"cgroup2 at {mount} lacks {', '.join(absent)} (bound to v1 or not built in)")
            if undelegated:
                plus = " ".join(f"+{c}" for c in undelegated)
                notes.append(
                    f"cgroup2 at {mount} does not enable {', '.join(undelegated)} for child cgroups "
                    f"(vmkit does not change the root; to allow it: echo '{plus}' > {mount}/cgroup.subtree_control)"
                )
            if best_v2_missing is None or len(lacking) < len(best_v2_missing):
                best_v2_missing = lacking

        by_controller: dict[str, Hierarchy] = {}
        for hier in v1:
            for c in hier.controllers:
                by_controller.setdefault(c, hier)
        v1_missing = [c for c in V1_REQUIRED if c not in by_controller]
        if not v1_missing:
            controllers = list(V1_REQUIRED) + [c for c in V1_OPTIONAL if c in by_controller]
            used: list[Hierarchy] = []
            for c in controllers:
                if by_controller[c] not in used:
                    used.append(by_controller[c])
            return cls(
                mode="v1",
                parent=parent,
                hierarchies=used,
                controllers=controllers,
                missing=[],
                notes=[],
                proc_root=proc_root,
            )
        if v1:
            notes.append(f"cgroup v1 lacks {', '.join(v1_missing)}")
        if not v2_mounts and not v1:
            notes.append("no cgroup file system is mounted")
        # Report what the nearer of the two would need; v2 on a tie (it is where hosts are going).
        if best_v2_missing is not None and (not v1 or len(best_v2_missing) <= len(v1_missing)):
            missing = best_v2_missing
        else:
            missing = v1_missing if v1 else list(V2_REQUIRED)
        return cls(
            mode="none",
            parent=parent,
            hierarchies=[],
            controllers=[],
            missing=missing,
            notes=notes,
            proc_root=proc_root,
        )

    def describe(self) -> str:
        """One line for `vmkit host check`."""
        if self.mode == "none":
            return f"none: {'; '.join(self._notes)} (missing: {', '.join(self._missing)})"
        return f"{self.mode} ({', '.join(self.controllers)})"

    def missing(self) -> list[str]:
        """Required controllers that are not usable ([] unless mode is "none")."""
        return list(self._missing)

    def _dirs(self, name: str) -> list[tuple[Hierarchy, Path]]:
        check_name(name)
        return [(h, h.mount / self.parent / name) for h in self.hierarchies]

    def _vm(self, name: str) -> VmCgroup:
        return VmCgroup(mode=self.mode, path=f"/{self.parent}/{name}", dirs=self._dirs(name), proc_root=self._proc_root)

    def create(self, name: str, limits: CgroupLimits) -> VmCgroup:
        """Make (or reuse) the VM's cgroup in every hierarchy and apply limits.

        A cgroup this call created is removed again if applying the limits fails.
        """
        if self.mode == "none":
            raise CgroupError(f"cgroups are not usable on this host: {self.describe()}")
        dirs = self._dirs(name)
        created: list[Path] = []
        try:
            for hier, d in dirs:
                _make_dir(d.parent)
                if self.mode == "v2":
                    self._delegate(d.parent)
                if _make_dir(d):
                    created.append(d)
                if self.mode == "v1" and "memory" in hier.controllers:
                    self._move_charge(d)
            cg = self._vm(name)
            cg.apply(limits)
        except BaseException:
            # Only the VM's own dirs: the parent may serve other VMs by now, and an empty one costs nothing.
            for d in reversed(created):
                try:
                    _rmdir(d)
                except OSError:
                    log.warning("could not remove %s after a failed create", d)
            raise
        return cg

    def _delegate(self, parent: Path) -> None:
        # Enable in our parent's subtree_control the controllers the root hands down but it does not yet pass on.
        enabled = _tokens(parent / "cgroup.subtree_control")
        wanted = [c for c in self.controllers if c not in enabled]
        if wanted:
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def _move_charge(self, d: Path) -> None:
        # Charge pages QEMU touched before attach to its cgroup: 3 = anonymous and file pages.
        path = d / "memory.move_charge_at_immigrate"
        if self.move_charge is False or not path.exists():
            return
        try:
            _write_file(path, "3")
            self.move_charge = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise CgroupError(f"cannot write '3' to {path}: {e.strerror or e}") from e
            log.debug("memory.move_charge_at_immigrate: this kernel no longer moves charges")
            self.move_charge = False

    def get(self, name: str) -> VmCgroup | None:
        """The VM's cgroup if it exists in every hierarchy in use, else None (create() completes a partial one)."""
        dirs = self._dirs(name)
        if not dirs:
            return None
        return self._vm(name) if all(d.is_dir() for _, d in dirs) else None

    def names(self) -> list[str]:
        """Children of the parent in any hierarchy (leftovers to clean up at daemon start)."""
        found: set[str] = set()
        for h in self.hierarchies:
            try:
                entries = list(os.scandir(h.mount / self.parent))
            except OSError:
                continue
            found |= {e.name for e in entries if e.is_dir(follow_symlinks=False) and _NAME_RE.fullmatch(e.name)}
        return sorted(found)

    def remove(self, name: str) -> None:
        """rmdir the VM's cgroup in every hierarchy; an absent one is fine.

        Raises CgroupBusy if it still holds processes after ~REMOVE_WAIT_S: a cgroup stays busy for a moment
        after its last process has exited, so EBUSY is retried until then.
        """
        deadline = time.monotonic() + REMOVE_WAIT_S
        for _, d in self._dirs(name):
            _remove_dir(d, deadline)

    def remove_parent(self) -> None:
        """rmdir the parent itself in every hierarchy (when vmkit is uninstalled, or a test ends)."""
        deadline = time.monotonic() + REMOVE_WAIT_S
        for h in self.hierarchies:
            _remove_dir(h.mount / self.parent, deadline)


def _make_dir(path: Path) -> bool:
    """mkdir; True if this call created it."""
    try:
        _mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror or e}") from e


def _remove_dir(d: Path, deadline: float) -> None:
    while True:
        try:
            _rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove cgroup {d}: {e.strerror or e}") from e
            if time.monotonic() >= deadline:
                pids = _procs(d)
                what = f"processes {', '.join(map(str, pids))}" if pids else "child cgroups or exiting processes"
                raise CgroupBusy(f"cannot remove cgroup {d}: it still holds {what}") from e
        time.sleep(REMOVE_POLL_S)
