"""iSCSI LUNs through libiscsi's command-line tools (libiscsi-bin): no kernel initiator, no iscsiadm.

QEMU opens iSCSI disks with its own userspace libiscsi driver; vmkit lists a target's LUNs with the tools of
that same library. `iscsi-ls -s` says which LUNs a target has and their types, but prints sizes rounded down
from READ CAPACITY(10)'s last block address (a 64 MiB LUN shows as "Size:63M"), so each disk LUN's exact
capacity comes from `iscsi-readcapacity16 -s` (prints the byte count alone).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from vmkit.errors import CommandFailed, VmkitError
from vmkit.model.storage import check_iqn
from vmkit.util.proc import Result, run

DEFAULT_PORT = 3260


class IscsiError(VmkitError):
    """The portal could not be reached, or the target or a LUN is not there (a bad gateway from the API's view)."""

    status = 502


@dataclass(frozen=True)
class IscsiTarget:
    host: str
    iqn: str
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if not self.host or any(c in self.host for c in "/?#@[] \0"):
            raise ValueError(f"invalid iSCSI portal host {self.host!r}: give a host name or an IP address")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid iSCSI port {self.port}")
        check_iqn(self.iqn)

    @property
    def portal(self) -> str:
        """HOST:PORT, an IPv6 address in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, lun: int) -> str:
        """The iscsi:// URL of one LUN, as QEMU and libiscsi's tools take it."""
        return f"iscsi://{self.portal}/{self.iqn}/{lun}"


@dataclass(frozen=True)
class Lun:
    lun: int
    size_bytes: int


_TARGET_LINE = re.compile(r"Target:(\S+) Portal:(\S+)")
# "Lun:1    Type:DIRECT_ACCESS (Size:63M)"; the controller LUN has no size: "Lun:0    Type:STORAGE_ARRAY_CONTROLLER"
_LUN_LINE = re.compile(r"Lun:(\d+)\s+Type:(\S+)(?: \(Size:(\d+)([ kMGT]?)\))?")
_UNITS = {"": 1, " ": 1, "k": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_luns(text: str, iqn: str | None = None) -> list[Lun]:
    """The disk LUNs (type DIRECT_ACCESS; not tgt's controller LUN 0) in `iscsi-ls -s` output, sorted by number.

    iscsi-ls lists every target the portal reports, once per portal of each: with iqn, only that target's LUNs
    (its first portal's list), else those of the first target. size_bytes is what iscsi-ls printed, a rounded
    figure just below the real capacity; luns() replaces it with the exact one.
    """
    found: dict[int, Lun] = {}
    current: str | None = None  # the target whose LUN lines follow
    chosen: str | None = iqn
    done = False  # the chosen target's first portal block is over
    for line in text.splitlines():
        if m := _TARGET_LINE.match(line.strip()):
            if current is not None and current == chosen:
                done = True
            current = m.group(1)
            chosen = chosen or current
            continue
        m = _LUN_LINE.match(line.strip())
        if not m or done or current is None or current != chosen:
            continue
        number, kind, size, unit = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if kind == "DIRECT_ACCESS" and size is not None:
            found[number] = Lun(number, int(size) * _UNITS[unit])
    return [found[n] for n in sorted(found)]


def targets_in(text: str) -> set[str]:
    """The target names in `iscsi-ls` output."""
    return {m.group(1) for line in text.splitlines() if (m := _TARGET_LINE.match(line.strip()))}


def parse_capacity(text: str) -> int:
    """The byte count `iscsi-readcapacity16 -s` prints (the LUN's block count times its block size)."""
    value = text.strip()
    if not value.isdigit():
        raise ValueError(f"unexpected iscsi-readcapacity16 output {value[:80]!r}")
    return int(value)


def _run(argv: list[str], what: str, deadline: float, target: IscsiTarget, *, check: bool = True) -> Result:
    """Run one libiscsi tool within what is left of the deadline; its failure (with check) as IscsiError naming
    `what` and the tool's last line."""
    try:
        res = run(argv, check=False, timeout_s=max(0.5, deadline - time.monotonic()))
    except CommandFailed as e:  # not installed, or timed out (an unreachable host, a portal that does not answer)
        raise IscsiError(f"iSCSI {target.portal}: cannot {what}: {e.message}") from e
    if check and not res.ok:
        raise _failed(res, what, target)
    return res


def _failed(res: Result, what: str, target: IscsiTarget) -> IscsiError:
    lines = (res.stderr.strip() or res.stdout.strip() or f"exit status {res.returncode}").splitlines()
    return IscsiError(f"iSCSI {target.portal}: cannot {what}: {lines[-1]}")


def _listed_whole(text: str, iqn: str) -> bool:
    """Whether iscsi-ls got past target iqn's LUN list: another target's line follows it (iscsi-ls prints a
    target's line before logging in to it, and stops at the first target it cannot log in to)."""
    names = [m.group(1) for line in text.splitlines() if (m := _TARGET_LINE.match(line.strip()))]
    return iqn in names and names.index(iqn) < len(names) - 1


def luns(target: IscsiTarget, initiator: str, timeout_s: float = 15) -> list[Lun]:
    """The target's disk LUNs with their exact sizes, asked as initiator `initiator` (which a target's ACL may
    restrict); all within timeout_s. IscsiError when the portal cannot be reached or the target is not there."""
    check_iqn(initiator)
    deadline = time.monotonic() + timeout_s
    # iscsi-ls logs in for discovery at the portal (the URL's target part is ignored), then to every target it
    # reports, in turn, to list its LUNs.
    what = "list the targets"
    res = _run(["iscsi-ls", "-s", "-i", initiator, f"iscsi://{target.portal}"], what, deadline, target, check=False)
    # Another target of the portal that will not have us (CHAP, an ACL) stops iscsi-ls: that is no failure
    # when ours was listed before it.
    if not res.ok and not _listed_whole(res.stdout, target.iqn):
        raise _failed(res, what, target)
    if target.iqn not in targets_in(res.stdout):
        raise IscsiError(
            f"iSCSI {target.portal}: no target {target.iqn} there (or initiator {initiator} may not see it)"
        )
    exact = []
    for lun in parse_luns(res.stdout, target.iqn):
        out = _run(
            ["iscsi-readcapacity16", "-s", "-i", initiator, target.url(lun.lun)],
            f"read the capacity of LUN {lun.lun} of {target.iqn}",
            deadline,
            target,
        ).stdout
        try:
            exact.append(Lun(lun.lun, parse_capacity(out)))
        except ValueError as e:
            raise IscsiError(f"iSCSI {target.portal}: LUN {lun.lun} of {target.iqn}: {e}") from e
    return exact
