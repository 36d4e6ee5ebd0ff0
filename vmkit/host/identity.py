"""Per-VM Unix identities: each VM's QEMU runs as a uid/gid of its own, taken from a range reserved for vmkit.

No login account is made: the kernel needs no /etc/passwd entry to run a process as a uid. What must hold
is that no one else uses those numbers, so a daemon refuses to start on a range that overlaps a user or
group the host knows (NSS), a subordinate-id range (/etc/subuid, /etc/subgid: containers map them), or the
range of another vmkit state dir on this host (a small registry, one file per state dir).

QEMU is started through util-linux's `setpriv`, so it never runs a single instruction as root: it starts
with the VM's uid/gid, no supplementary groups (only `kvm` where KVM is used), no capabilities in any set,
and no_new_privs (so nothing it could exec regains privileges).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import Conflict, InvalidInput, VmkitError

# Above systemd-nspawn's container range (524288-1879048191), below 2^31 (some tools treat ids as signed).
DEFAULT_FIRST = 1_900_000_000
DEFAULT_COUNT = 65_536
ID_MAX = 2**31 - 2
DEFAULT_REGISTRY = Path("/var/lib/vmkit-id-ranges")
SETPRIV = "setpriv"


class RangeConflict(VmkitError):
    status = 409


@dataclass(frozen=True)
class IdRange:
    first: int
    count: int

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.first <= value <= self.last

    def overlaps(self, first: int, last: int) -> bool:
        return first <= self.last and self.first <= last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    @classmethod
    def parse(cls, text: str) -> IdRange:
        """'FIRST-LAST' or 'FIRST:COUNT'. Ids 0-65535 hold system and login accounts and are refused."""
        m = re.fullmatch(r"\s*(\d+)\s*([-:])\s*(\d+)\s*", text)
        if not m:
            raise InvalidInput(f"invalid id range {text!r}: use FIRST-LAST or FIRST:COUNT")
        first, second = int(m.group(1)), int(m.group(3))
        count = second - first + 1 if m.group(2) == "-" else second
        if count < 1:
            raise InvalidInput(f"invalid id range {text!r}: it holds no ids")
        if first < 65_536 or first + count - 1 > ID_MAX:
            raise InvalidInput(f"invalid id range {text!r}: ids must lie within 65536-{ID_MAX}")
        return cls(first, count)


DEFAULT_RANGE = IdRange(DEFAULT_FIRST, DEFAULT_COUNT)


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


def _subid_ranges(path: Path) -> list[tuple[str, int, int]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((parts[0], int(parts[1]), int(parts[1]) + int(parts[2]) - 1))
    return out


def host_conflicts(r: IdRange, *, etc: Path = Path("/etc")) -> list[str]:
    """Users, groups and subordinate-id ranges of this host that lie in r, as sentences."""
    found = [f"user {p.pw_name} (uid {p.pw_uid})" for p in pwd.getpwall() if p.pw_uid in r]
    found += [f"group {g.gr_name} (gid {g.gr_gid})" for g in grp.getgrall() if g.gr_gid in r]
    for name in ("subuid", "subgid"):
        for owner, first, last in _subid_ranges(etc / name):
            if r.overlaps(first, last):
                found.append(f"{owner}'s range {first}-{last} in /etc/{name}")
    return found


def _entry_path(registry: Path, state_dir: Path) -> Path:
    return registry / (hashlib.sha256(str(state_dir).encode()).hexdigest()[:16] + ".json")


def claim(r: IdRange, *, state_dir: Path, registry: Path = DEFAULT_REGISTRY) -> None:
    """Refuse r if it collides with the host's ids or another state dir's range; else record it as ours.

    An entry whose state dir no longer exists is stale (its VMs are gone with it) and is dropped."""
    problems = host_conflicts(r)
    state_dir = state_dir.resolve()
    registry.mkdir(parents=True, exist_ok=True, mode=0o700)
    mine = _entry_path(registry, state_dir)
    for entry in registry.glob("*.json"):
        if entry == mine:
            continue
        try:
            other = json.loads(entry.read_text())
            other_dir, first, last = Path(other["state_dir"]), int(other["first"]), int(other["last"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not (other_dir / "vmkit.db").exists():
            entry.unlink(missing_ok=True)
        elif r.overlaps(first, last):
            problems.append(f"the range {first}-{last} of the vmkit state dir {other_dir}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RangeConflict(
            f"VM id range {r} overlaps {', '.join(problems[:5])}{more}; choose another with --id-range "
            "or VMKIT_ID_RANGE"
        )
    tmp = mine.with_suffix(".tmp")
    tmp.write_text(json.dumps({"state_dir": str(state_dir), "first": r.first, "last": r.last}))
    os.replace(tmp, mine)


def allocate(r: IdRange, used: set[int], after: int | None) -> int:
    """The next free id after `after` (wrapping once): ids of deleted VMs are reused as late as possible,
    so a file a deleted VM may have left somewhere is unlikely to meet its next owner soon."""
    start = (after - r.first + 1) if after is not None and after in r else 0
    for i in range(r.count):
        uid = r.first + (start + i) % r.count
        if uid not in used:
            return uid
    raise Conflict(f"all {r.count} ids of the VM id range {r} are in use; widen it with --id-range")


def launcher(ident: Identity, *, extra_gids: tuple[int, ...] = ()) -> list[str]:
    """The argv prefix that execs the rest as ident, with no capabilities and no_new_privs."""
    groups = ["--groups", ",".join(str(g) for g in extra_gids)] if extra_gids else ["--clear-groups"]
    return [
        SETPRIV, "--reuid", str(ident.uid), "--regid", str(ident.gid), *groups,
        "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
    ]  # fmt: skip


def kvm_gid() -> int | None:
    """Group owning /dev/kvm, for QEMU's supplementary groups where KVM is used."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    return st.st_gid if st.st_mode & stat.S_IRWXG else None


def proc_identity(pid: int) -> Identity | None:
    """The real uid/gid a running process has (from /proc), or None if it is gone."""
    uid = gid = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return Identity(uid, gid) if uid is not None and gid is not None else None
