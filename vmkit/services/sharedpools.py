"""Shared pools: volumes that live on a storage server several hosts reach (NFS exports, iSCSI targets).

QEMU and qemu-img reach them through their own userspace drivers (libnfs and libiscsi, Debian's
qemu-block-extra), so no host mounts anything or logs in to a target: a volume's location is a URL,
nfs://SERVER/EXPORT/NAME?uid=U&gid=G or iscsi://HOST:PORT/IQN/LUN, which DiskSpec.path carries and
qemu/argv.py turns into blockdev options. A VM on shared volumes migrates with its RAM only.

Each host keeps its own rows for the volumes of a shared pool. Every listing rescans the server (`scan`):
volumes another host made are adopted (format read once from the header, as a dir pool's refresh does), rows
whose volume is gone are forgotten unless a VM here uses them. So two hosts that define the same pool see the
same volumes.

Invariants:
- NFS: a new volume is written under a temporary name of this host's own (`.vmkit-tmp.HOSTID.NAME`) and
  renamed into place (NFS RENAME is atomic on the server); a crash leaves a `creating` row whose temporary
  file the next start removes by name. Temporary files of other hosts are never touched.
- iSCSI: LUNs are made and removed on the target by its administrator; vmkit lists them (`lunN`, raw,
  thick) and attaches them. Nothing here writes to a target except QEMU through a VM's disk.
- No qcow2 in a shared pool has a backing image: a chain would have to name files by one host's view. Linked
  clones and overlays are refused there; full copies work both ways.
- Security: NFS's AUTH_SYS trusts the uid a client claims. Every QEMU of every host that defines the pool
  presents the pool's uid/gid, so any of them can reach any volume on the export (as with libvirt's netfs
  pools); per-VM identities protect local volumes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from vmkit.errors import Conflict, InvalidInput, VmkitError
from vmkit.model.storage import ISCSI_PORT, PoolSpec
from vmkit.storage import iscsi, nfs, qemu_img
from vmkit.storage.qcow2 import HEADER_BYTES, INCOMPAT_EXTERNAL_DATA, parse_header
from vmkit.store.db import Store, VolumeRow

log = logging.getLogger(__name__)

LUN_PREFIX = "lun"
INITIATOR_PREFIX = "iqn.2026-11.org.vmkit"


@dataclass(frozen=True)
class PoolStats:
    active: bool  # the server answered at the last scan
    capacity_bytes: int | None = None
    available_bytes: int | None = None
    error: str | None = None


def nfs_share(pool: PoolSpec) -> nfs.NfsShare:
    """The share of an nfs pool, from its URL (made by CreatePool.location from checked parts)."""
    u = urlsplit(pool.path)
    q = parse_qs(u.query)
    return nfs.NfsShare(server=u.hostname or "", export=u.path or "/", uid=int(q["uid"][0]), gid=int(q["gid"][0]))


def iscsi_target(pool: PoolSpec) -> iscsi.IscsiTarget:
    u = urlsplit(pool.path)
    return iscsi.IscsiTarget(host=u.hostname or "", iqn=u.path.strip("/"), port=u.port or ISCSI_PORT)


def lun_number(name: str) -> int:
    if not name.startswith(LUN_PREFIX) or not name[len(LUN_PREFIX) :].isdigit():
        raise InvalidInput(f"{name!r} is no LUN of an iscsi pool (they are named lun1, lun2, …)")
    return int(name[len(LUN_PREFIX) :])


def _header_format(head: bytes) -> tuple[str, int | None, str | None]:
    """(format, virtual size for a qcow2, why it cannot be adopted) from an image's first bytes."""
    header = parse_header(head)
    if header is None:
        return "raw", None, None
    if header.backing_offset:
        return "qcow2", header.virtual_size, "a qcow2 with a backing image (shared pools hold standalone images only)"
    if header.incompatible & INCOMPAT_EXTERNAL_DATA:
        return "qcow2", header.virtual_size, "a qcow2 with an external data file"
    return "qcow2", header.virtual_size, None


def host_id(store: Store) -> str:
    """This host's id among the hosts sharing a pool (made once, kept in the state dir): it names this host's
    temporary files on a share, so that a start never removes another host's work in progress."""
    hid = store.get_meta("host_id")
    if hid is None:
        hid = secrets.token_hex(6)
        store.set_meta("host_id", hid)
    return hid


def iscsi_initiator(store: Store) -> str:
    """This host's iSCSI name when it lists a target's LUNs (QEMU presents one per VM, from its UUID)."""
    return f"{INITIATOR_PREFIX}:{host_id(store)}"


def _capacity(fmt: str, head: bytes, size_bytes: int) -> int:
    """A volume's virtual size: a qcow2's from its header (its first bytes, head), a raw file's its length."""
    header = parse_header(head) if fmt == "qcow2" else None
    return header.virtual_size if header is not None else size_bytes


class SharedPools:
    def __init__(self, *, store: Store, host_id: str, initiator: str) -> None:
        self._store = store
        self._host_id = host_id
        self._initiator = initiator  # this host's iSCSI name, for listing LUNs (QEMU uses one per VM)
        self._sizes: dict[str, tuple[int, int]] = {}  # POOL/NAME → (capacity, allocation) at the last scan
        self._pools: dict[str, PoolStats] = {}

    # ----- where things are ----------------------------------------------------------------------
    def location(self, pool: PoolSpec, name: str) -> str:
        """The URL QEMU and qemu-img open volume `name` of a shared pool by."""
        if pool.kind == "iscsi":
            return iscsi_target(pool).url(lun_number(name))
        share = nfs_share(pool)
        return share.url(name)

    def _temp(self, name: str) -> str:
        return f".vmkit-tmp.{self._host_id}.{name}"

    def sizes(self, key: str) -> tuple[int, int]:
        return self._sizes.get(key, (0, 0))

    def stats(self, pool: str) -> PoolStats:
        return self._pools.get(pool, PoolStats(active=False, error="not scanned yet"))

    # ----- talking to the server -----------------------------------------------------------------
    async def probe(self, pool: PoolSpec) -> None:
        """Refuse a pool whose server does not answer (at `pool create`): 400 naming what failed."""
        try:
            if pool.kind == "nfs":
                await asyncio.to_thread(nfs.probe, nfs_share(pool))
            else:
                await asyncio.to_thread(iscsi.luns, iscsi_target(pool), self._initiator)
        except VmkitError as e:
            raise InvalidInput(e.message) from None

    async def scan(
        self, pool: PoolSpec, users: Callable[[str], list[str]]
    ) -> dict[str, list[str] | list[dict[str, str]]]:
        """Read what the server holds: adopt volumes made elsewhere, forget those gone (unless a VM here uses
        them), and note sizes and free space. A server that does not answer leaves the rows as they are and
        marks the pool inactive (not an error: a listing still works)."""
        try:
            found, space = await asyncio.to_thread(self._read_server, pool)
        except VmkitError as e:
            self._pools[pool.name] = PoolStats(active=False, error=e.message)
            raise
        self._pools[pool.name] = PoolStats(active=True, capacity_bytes=space[0], available_bytes=space[1])
        known = {r.name: r for r in self._store.volumes(pool.name)}
        adopted: list[str] = []
        skipped: list[dict[str, str]] = []
        forgotten: list[str] = []
        for name, (fmt, capacity, allocation, why) in sorted(found.items()):
            key = f"{pool.name}/{name}"
            self._sizes[key] = (capacity, allocation)
            row = known.get(name)
            if row is not None:
                continue
            if why is not None:
                skipped.append({"name": name, "reason": why})
                continue
            prealloc = "full" if pool.kind == "iscsi" else "off"
            self._store.add_volume(VolumeRow(pool.name, name, fmt, prealloc, None, "ready", time.time()))
            adopted.append(name)
        for name, row in known.items():
            if row.state == "ready" and name not in found:
                if users(row.key):
                    skipped.append({"name": name, "reason": "gone from the server, but a VM here still uses it"})
                    continue
                self._store.delete_volume(pool.name, name)
                self._sizes.pop(row.key, None)
                forgotten.append(name)
        return {"adopted": adopted, "skipped": skipped, "forgotten": forgotten}

    def _read_server(
        self, pool: PoolSpec
    ) -> tuple[dict[str, tuple[str, int, int, str | None]], tuple[int | None, int | None]]:
        """name → (format, capacity, allocation, why not adoptable), and (capacity, available) of the pool."""
        if pool.kind == "iscsi":
            luns = iscsi.luns(iscsi_target(pool), self._initiator)
            total = sum(lun.size_bytes for lun in luns)
            return {f"{LUN_PREFIX}{lun.lun}": ("raw", lun.size_bytes, lun.size_bytes, None) for lun in luns}, (
                total,
                0,
            )
        rows = {r.name: r for r in self._store.volumes(pool.name)}
        found: dict[str, tuple[str, int, int, str | None]] = {}
        with nfs.session(nfs_share(pool)) as s:
            for f in s.listdir():
                if f.name.startswith(".") or not f.is_file:
                    continue
                row = rows.get(f.name)
                head = s.read(f.name, 0, HEADER_BYTES)
                fmt, _, why = _header_format(head)
                if row is not None:
                    fmt = row.format  # decided once: a raw volume stays raw whatever its first bytes become
                found[f.name] = (fmt, _capacity(fmt, head, f.size_bytes), f.allocated_bytes, None if row else why)
            space = s.space()
        return found, space

    # ----- making and removing volumes -----------------------------------------------------------
    def refuse_thick(self, pool: PoolSpec, prealloc: str) -> None:
        if pool.kind == "iscsi":
            raise InvalidInput(f"pool {pool.name!r} is an iscsi pool: its LUNs are made on the target, not by vmkit")
        if prealloc in ("falloc", "full"):
            raise InvalidInput(
                f"pool {pool.name!r} is an nfs pool: QEMU's NFS client cannot preallocate (use off or metadata)"
            )

    @contextlib.asynccontextmanager
    async def _reserve(self, pool: PoolSpec, name: str, fmt: str, prealloc: str):  # type: ignore[no-untyped-def]
        """Row `creating` first, then the caller writes location(temp); renamed into place at a clean exit,
        otherwise both go. Yields the temporary file's URL."""
        self.refuse_thick(pool, prealloc)
        share = nfs_share(pool)
        if self._store.volume(pool.name, name) is not None:
            raise Conflict(f"volume {pool.name}/{name} already exists")
        tmp = self._temp(name)
        if await asyncio.to_thread(self._clear, share, name, tmp):
            raise Conflict(f"a file named {name!r} already exists in pool {pool.name!r} (`pool refresh` adopts it)")
        self._store.add_volume(VolumeRow(pool.name, name, fmt, prealloc, None, "creating", time.time()))
        try:
            yield share.url(tmp)
            await asyncio.to_thread(self._put_in_place, share, tmp, f"{pool.name}/{name}", fmt)
        except BaseException:
            with contextlib.suppress(VmkitError):
                await asyncio.to_thread(self._remove, share, tmp)
            self._store.delete_volume(pool.name, name)
            raise
        self._store.update_volume(pool.name, name, state="ready")

    async def create(self, pool: PoolSpec, name: str, *, fmt: str, size_bytes: int, prealloc: str) -> None:
        async with self._reserve(pool, name, fmt, prealloc) as url:
            await asyncio.to_thread(
                qemu_img.create, qemu_img.Url(url), fmt=fmt, size_bytes=size_bytes, prealloc=prealloc
            )

    async def copy_in(
        self, src: str, src_fmt: str, pool: PoolSpec, name: str, fmt: str, progress: Callable[[float], None]
    ) -> None:
        """A standalone copy of the image at src (a local path or a shared volume's URL) as volume `name`."""
        async with self._reserve(pool, name, fmt, "off") as url:
            source = qemu_img.Url(src) if "://" in src else Path(src)
            await asyncio.to_thread(qemu_img.convert, source, src_fmt, qemu_img.Url(url), fmt, progress=progress)

    async def delete(self, row: VolumeRow, pool: PoolSpec) -> None:
        if pool.kind == "iscsi":
            raise InvalidInput(f"{row.key} is a LUN of an iscsi pool: LUNs are removed on the target, not by vmkit")
        self._store.update_volume(row.pool, row.name, state="deleting")
        await asyncio.to_thread(self._remove, nfs_share(pool), row.name)
        self._store.delete_volume(row.pool, row.name)
        self._sizes.pop(row.key, None)

    def recover(self, pool: PoolSpec, row: VolumeRow) -> None:
        """At start: a `creating` row's temporary file and a `deleting` row's file go, then the row (a server
        that does not answer leaves both for the next start)."""
        if pool.kind != "nfs":
            self._store.delete_volume(row.pool, row.name)
            return
        share = nfs_share(pool)
        try:
            self._remove(share, self._temp(row.name) if row.state == "creating" else row.name)
        except VmkitError as e:
            log.warning("pool %s: cannot finish what a crash left of %s yet: %s", pool.name, row.key, e.message)
            return
        self._store.delete_volume(row.pool, row.name)

    # Blocking helpers (run in a thread), each one NFS session (a mount costs a few round trips).
    @staticmethod
    def _clear(share: nfs.NfsShare, name: str, tmp: str) -> bool:
        """Whether file `name` is on the share, once this host's leftover temporary file of it (an earlier
        failed try) is gone."""
        with nfs.session(share) as s:
            s.unlink(tmp)
            return s.stat(name) is not None

    @staticmethod
    def _remove(share: nfs.NfsShare, name: str) -> None:
        with nfs.session(share) as s:
            s.unlink(name)

    def _put_in_place(self, share: nfs.NfsShare, tmp: str, key: str, fmt: str) -> None:
        """Rename the finished temporary file to volume `key`'s name, and note its sizes (best effort: the next
        scan notes them anyway)."""
        name = key.split("/", 1)[1]
        with nfs.session(share) as s:
            s.rename(tmp, name)
            with contextlib.suppress(VmkitError):
                f = s.stat(name)
                if f is not None:
                    self._sizes[key] = (_capacity(fmt, s.read(name, 0, HEADER_BYTES), f.size_bytes), f.allocated_bytes)
