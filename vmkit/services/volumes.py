"""Volumes: the image files in pools — create, list, inspect, resize, convert, clone, import, export, delete.

Invariants:
- A volume's format is decided once (at creation, import or adoption by `pool refresh`) and recorded; every
  later use passes it explicitly. A guest writing a qcow2 header into a raw volume gains nothing: the volume
  stays raw, and images below a qcow2 take their format from their own rows (`format_of`), never from a header.
- A qcow2 may only be backed by another volume of some pool; one whose header names any other file, or an
  external data file, is refused at import and skipped at adoption.
- New files are written under a hidden temporary name and renamed into place; the row is reserved first
  (state `creating`) and marked `ready` after the rename. A crash at any point leaves a row the next start
  removes together with its file (`recover`), or a temporary file it deletes: never an orphan file, never a
  row without its file. Deletion marks the row `deleting` before unlinking, for the same reason.
- A volume in use by a VM cannot be deleted, converted or resized while that VM runs; one that backs other
  volumes cannot be deleted or converted at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from vmkit.errors import Conflict, InvalidInput, NoSpace, NotFound, VmkitError
from vmkit.model.storage import (
    BackingInfo,
    CloneVolume,
    ConvertVolume,
    CreatePool,
    CreateVolume,
    PoolInfo,
    ResizeVolume,
    VolumeInfo,
    provisioning,
    split_volume,
)
from vmkit.services.operations import Progress
from vmkit.services.pools import PoolService
from vmkit.services.sharedpools import SharedPools
from vmkit.storage import files, qemu_img
from vmkit.storage.qcow2 import ImageError, backing_chain, has_external_data, virtual_size
from vmkit.store.db import Store, VolumeRow

log = logging.getLogger(__name__)

UPLOAD_BUFFER = 8 * 1024 * 1024  # bytes gathered before each write during an upload


def _no_progress(fraction: float, message: str) -> None:
    pass


class VolumeService:
    def __init__(self, *, store: Store, pools: PoolService, shared: SharedPools) -> None:
        self._store = store
        self._pools = pools
        self._shared = shared
        self._locks: dict[str, asyncio.Lock] = {}
        # Set by the daemon once VMs are loaded: which VMs use a volume, and which of them run.
        self._users: Callable[[str], list[str]] = lambda key: []
        self._running_users: Callable[[str], list[str]] = lambda key: []

    def set_users(self, users: Callable[[str], list[str]], running: Callable[[str], list[str]]) -> None:
        self._users, self._running_users = users, running

    # ----- lookups -------------------------------------------------------------------------------
    def row(self, key: str) -> VolumeRow:
        pool, name = self._split(key)
        self._pools.get(pool)
        row = self._store.volume(pool, name)
        if row is None or row.state != "ready":
            raise NotFound(f"no volume {key!r}")
        return row

    @staticmethod
    def _split(key: str) -> tuple[str, str]:
        try:
            return split_volume(key)
        except ValueError as e:
            raise InvalidInput(str(e)) from None

    def path(self, key: str) -> Path:
        """The local file of a volume of a dir pool (409 for a shared pool's: see location)."""
        pool, name = self._split(key)
        return files.resolve(self._pools.dir(pool), name)

    def location(self, key: str) -> str:
        """Where QEMU finds the volume: its file's path, or a shared volume's URL (what DiskSpec.path holds)."""
        pool, name = self._split(key)
        spec = self._pools.get(pool)
        return self._shared.location(spec, name) if spec.shared else str(files.resolve(Path(spec.path), name))

    def shared(self, key: str) -> bool:
        """Whether the volume lives on a storage server other hosts may reach too (an nfs or iscsi pool)."""
        return self._pools.get(self._split(key)[0]).shared

    def _path_of(self, row: VolumeRow) -> Path:
        return files.resolve(self._pools.dir(row.pool), row.name)

    def qemu_format(self, key: str) -> str:
        """The format QEMU opens the volume with (an ISO is raw to it)."""
        fmt = self.row(key).format
        return "raw" if fmt == "iso" else fmt

    def key_of_path(self, path: str | os.PathLike[str]) -> str | None:
        """POOL/NAME of the ready volume whose file is `path`, if any."""
        real = os.path.realpath(path)
        pool = self._pools.pool_of_dir(os.path.dirname(real))
        if pool is None:
            return None
        row = self._store.volume(pool.name, os.path.basename(real))
        return row.key if row is not None and row.state == "ready" else None

    def format_of(self, path: str) -> str | None:
        """The recorded QEMU format of the volume at `path`; None when it is no volume (see qemu/handover.py)."""
        key = self.key_of_path(path)
        return self.qemu_format(key) if key else None

    def dependents(self, key: str) -> list[str]:
        return [r.key for r in self._store.volumes() if r.backing == key and r.state != "deleting"]

    def depth(self, key: str, among: list[str]) -> int:
        """How many of the volumes `among` lie below `key` in its backing chain."""
        n, row = 0, self._store.volume(*self._split(key))
        seen = {key}
        while row is not None and row.backing and row.backing not in seen:
            seen.add(row.backing)
            n += row.backing in among
            row = self._store.volume(*self._split(row.backing))
        return n

    def busy(self, key: str) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked()

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def info(self, key: str, *, chain: bool = False) -> VolumeInfo:
        return self._info(self.row(key), chain=chain)

    def _info(self, row: VolumeRow, *, chain: bool = False) -> VolumeInfo:
        pool = self._pools.get(row.pool)
        if pool.shared:
            capacity, allocation = self._shared.sizes(row.key)  # as of the last scan of the server
            return self._info_of(
                row, self._shared.location(pool, row.name), capacity, allocation, [] if chain else None
            )
        path = self._path_of(row)
        try:
            capacity = virtual_size(path, row.format)
            allocation = files.allocated_bytes(path)
        except (OSError, ImageError):
            capacity = allocation = 0  # the file vanished under us; refresh will say so
        chain_info = None
        if chain and row.format == "qcow2":
            # What the headers say (like `qemu-img info --backing-chain`), each image named by its volume.
            chain_info = []
            for img in backing_chain(str(path), "qcow2", format_of=self.format_of):
                ipath = Path(img.path)
                chain_info.append(
                    BackingInfo(
                        path=img.path,
                        format=img.format,
                        volume=self.key_of_path(ipath),
                        capacity_bytes=virtual_size(ipath, img.format),
                        allocation_bytes=files.allocated_bytes(ipath),
                    )
                )
        elif chain:
            chain_info = []
        return self._info_of(row, str(path), capacity, allocation, chain_info)

    def _info_of(
        self, row: VolumeRow, path: str, capacity: int, allocation: int, chain_info: list[BackingInfo] | None
    ) -> VolumeInfo:
        return VolumeInfo(
            pool=row.pool,
            name=row.name,
            key=row.key,
            path=path,
            format=row.format,  # type: ignore[arg-type]
            prealloc=row.prealloc,
            provisioning=provisioning(row.format, row.prealloc),
            capacity_bytes=capacity,
            allocation_bytes=allocation,
            backing=row.backing,
            used_by=self._users(row.key),
            chain=chain_info,
        )

    async def scan(self, pool: str | None = None) -> None:
        """Read shared pools' servers again (volumes made or deleted by other hosts, sizes, free space) before a
        listing; a server that does not answer leaves its pool marked inactive, and the listing goes on."""
        for spec in self._pools.all():
            if spec.shared and pool in (None, spec.name):
                with contextlib.suppress(VmkitError):
                    await self._shared.scan(spec, self._users)

    async def all(self, pool: str | None = None) -> list[VolumeInfo]:
        if pool is not None:
            self._pools.get(pool)
        await self.scan(pool)
        return [self._info(r) for r in self._store.volumes(pool) if r.state == "ready"]

    def pool_info(self, name: str) -> PoolInfo:
        """A pool's figures; a shared pool's as of its last scan."""
        pool = self._pools.get(name)
        rows = [r for r in self._store.volumes(name) if r.state == "ready"]
        if pool.shared:
            st = self._shared.stats(name)
            return PoolInfo(
                name=pool.name, kind=pool.kind, path=pool.path, shared=True, active=st.active,
                capacity_bytes=st.capacity_bytes, available_bytes=st.available_bytes, volumes=len(rows),
                allocation_bytes=sum(self._shared.sizes(r.key)[1] for r in rows),
            )  # fmt: skip
        active = os.path.isdir(pool.path)
        capacity = available = None
        allocation = 0
        if active:
            capacity, available = files.fs_space(Path(pool.path))
            for r in rows:
                with contextlib.suppress(OSError, VmkitError):
                    allocation += files.allocated_bytes(self._path_of(r))
        return PoolInfo(
            name=pool.name,
            kind=pool.kind,
            path=pool.path,
            active=active,
            capacity_bytes=capacity,
            allocation_bytes=allocation,
            available_bytes=available,
            volumes=len(rows),
        )

    async def pools(self) -> list[PoolInfo]:
        await self.scan()
        return [self.pool_info(p.name) for p in self._pools.all()]

    async def create_pool(self, req: CreatePool) -> PoolInfo:
        await self._pools.create(req)
        await self.scan(req.name)
        return self.pool_info(req.name)

    def delete_pool(self, name: str) -> None:
        in_use = sorted({u for r in self._store.volumes(name) for u in self._users(r.key)})
        self._pools.delete(name, in_use)

    def check_free(self, pool: str, name: str) -> None:
        """Refuse (404/409) a new volume POOL/NAME up front: no such pool, or the name is taken."""
        if self._pools.get(pool).shared:
            if self._store.volume(pool, name) is not None:
                raise Conflict(f"volume {pool}/{name} already exists")
            return  # the server is asked when the volume is made
        directory = self._pools.dir(pool)
        final = files.resolve(directory, name)
        if self._store.volume(pool, name) is not None:
            raise Conflict(f"volume {pool}/{name} already exists")
        if os.path.lexists(final):
            raise Conflict(f"a file named {name!r} already exists in pool {pool!r} (`pool refresh` adopts it)")

    def check_room(self, pool: str, size_bytes: int, prealloc: str) -> None:
        """A thick volume takes its whole size now: refuse it up front when the pool's filesystem lacks the room,
        rather than filling the disk and failing at the end."""
        spec = self._pools.get(pool)
        if spec.shared:
            self._shared.refuse_thick(spec, prealloc)
            return
        if prealloc in ("falloc", "full"):
            _, available = files.fs_space(self._pools.dir(pool))
            if size_bytes > available:
                raise NoSpace(
                    f"not enough space in pool {pool!r} for a thick volume of {size_bytes} bytes ({available} free)"
                )

    def free_name(self, pool: str, stem: str, ext: str) -> str:
        """`stem.ext`, or `stem-N.ext` when taken (by a row or a stray file; a shared pool's rows, as of its last
        scan: a clash with a file made since is refused when the volume is made)."""
        spec = self._pools.get(pool)
        for n in range(1000):
            name = f"{stem}{'' if n == 0 else f'-{n}'}{ext}"
            stray = not spec.shared and os.path.lexists(Path(spec.path) / name)
            if self._store.volume(pool, name) is None and not stray:
                return name
        raise Conflict(f"no free volume name like {stem}{ext} in pool {pool!r}")

    # ----- crash recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or undo what a crash cut short (see the module's invariants). Run at daemon start."""
        for row in self._store.volumes():
            if row.state == "ready":
                continue
            spec = self._pools.get(row.pool)
            if spec.shared:
                self._shared.recover(spec, row)
                continue
            try:
                final = self._path_of(row)
            except VmkitError:
                final = None
            if row.state == "converting" and final is not None:
                # The converted file was complete before the row changed; only the rename may be missing.
                tmp = final.with_name(_convert_tmp(row.name))
                if tmp.exists():
                    os.replace(tmp, final)
                self._store.update_volume(row.pool, row.name, state="ready")
                continue
            if final is not None:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
            log.info("removed volume %s left %s by a crash", row.key, row.state)
            self._store.delete_volume(row.pool, row.name)
        for pool in self._pools.all():
            directory = Path(pool.path)
            if pool.shared or not directory.is_dir():
                continue
            for entry in directory.iterdir():
                if files.is_temp(entry.name):
                    log.info("removing leftover %s", entry)
                    with contextlib.suppress(OSError):
                        entry.unlink()

    # ----- making files --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reserve(
        self, pool: str, name: str, *, fmt: str, prealloc: str, backing: str | None
    ) -> Iterator[tuple[Path, Path]]:
        """Reserve POOL/NAME (row `creating`) and yield (temporary path, final path). The caller writes the
        temporary file; on a clean exit it is renamed into place and the row becomes ready, otherwise both go."""
        directory = self._pools.dir(pool)
        if not directory.is_dir():
            raise Conflict(f"the directory of pool {pool!r} ({directory}) is missing")
        self.check_free(pool, name)
        final = files.resolve(directory, name)
        self._store.add_volume(VolumeRow(pool, name, fmt, prealloc, backing, "creating", time.time()))
        tmp = files.temp_path(directory, name)
        try:
            yield tmp, final
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            self._store.delete_volume(pool, name)
            raise
        self._store.update_volume(pool, name, state="ready")

    def reserve_file(self, pool: str, name: str, *, fmt: str) -> contextlib.AbstractContextManager[tuple[Path, Path]]:
        """_reserve for a file another service writes itself (a VM's saved state: services/vmsave.py)."""
        return self._reserve(pool, name, fmt=fmt, prealloc="off", backing=None)

    async def create(self, pool: str, req: CreateVolume, progress: Progress = _no_progress) -> VolumeInfo:
        if req.format == "raw" and req.prealloc == "metadata":
            raise InvalidInput("raw volumes have no metadata to preallocate: use off, falloc or full")
        self.check_room(pool, req.size_bytes, req.prealloc)
        spec = self._pools.get(pool)
        if spec.shared:
            progress(0.0, f"creating {pool}/{req.name}")
            await self._shared.create(spec, req.name, fmt=req.format, size_bytes=req.size_bytes, prealloc=req.prealloc)
            return self.info(f"{pool}/{req.name}")
        with self._reserve(pool, req.name, fmt=req.format, prealloc=req.prealloc, backing=None) as (tmp, _):
            progress(0.0, f"creating {pool}/{req.name}")
            await asyncio.to_thread(
                qemu_img.create, tmp, fmt=req.format, size_bytes=req.size_bytes, prealloc=req.prealloc
            )
        return self.info(f"{pool}/{req.name}")

    async def create_overlay(self, pool: str, name: str, backing_key: str, size_bytes: int | None = None) -> VolumeInfo:
        """A thin qcow2 on top of backing_key (a linked clone); size None = the backing's size."""
        base = self.row(backing_key)
        if base.format == "iso":
            raise InvalidInput(f"{backing_key} is an ISO image; it cannot back a disk")
        refuse_save(base, "back a disk")
        for key, role in ((backing_key, "the base"), (f"{pool}/{name}", "the overlay")):
            if self.shared(key):
                raise InvalidInput(
                    f"{role} is on shared pool {key.partition('/')[0]!r}: shared pools hold standalone images only "
                    "(make a full copy: volume clone without --linked, or vm create --copy)"
                )
        base_path = self._path_of(base)
        base_size = virtual_size(base_path, base.format)
        if size_bytes is not None and size_bytes < base_size:
            raise InvalidInput(f"an overlay cannot be smaller than {backing_key} ({base_size} bytes)")
        with self._reserve(pool, name, fmt="qcow2", prealloc="off", backing=base.key) as (tmp, _):
            await asyncio.to_thread(
                qemu_img.create,
                tmp,
                fmt="qcow2",
                # Given, so qemu-img need not open the chain (QEMU may hold the base: a live snapshot).
                size_bytes=size_bytes or base_size,
                backing=base_path,
                backing_fmt=base.format,
            )
        return self.info(f"{pool}/{name}")

    async def clone(
        self, src_key: str, req: CloneVolume, progress: Progress = _no_progress, *, frozen: bool = False
    ) -> VolumeInfo:
        """A full copy (a standalone image: an overlay's chain flattened) or a linked one (an overlay on it).
        frozen: the caller made sure no guest writes the source any more (a snapshot of a running VM froze it)."""
        pool, name = self._split(req.target)
        src = self.row(src_key)
        refuse_save(src, "be cloned")
        if req.linked:
            return await self.create_overlay(pool, name, src_key)
        async with self._lock(src_key):
            if not frozen and self._running_users(src_key):
                # A running guest writes under us: the copy would be torn.
                raise Conflict(f"{src_key} is in use by running VM(s) {', '.join(self._running_users(src_key))}")
            target = self._pools.get(pool)
            if target.shared or self.shared(src_key):
                if target.shared:
                    self.check_free(pool, name)

                    def report_in(f: float) -> None:
                        progress(f, f"copying {src_key}")

                    await self._shared.copy_in(
                        self.location(src_key), src.format, target, name, self._disk_format(src), report_in
                    )
                    return self.info(req.target)
                return await self._copy_out(src, pool, name, progress)
            src_path = self._path_of(src)
            with self._reserve(pool, name, fmt=src.format, prealloc=src.prealloc, backing=None) as (tmp, _):
                progress(0.0, f"copying {src_key}")

                def report(f: float) -> None:
                    progress(f, f"copying {src_key}")

                if src.backing is None:
                    # A standalone file: a plain sparse copy is the fastest full clone (see bench/storage.py).
                    await asyncio.to_thread(files.copy_file, src_path, tmp, progress=report)
                    if src.prealloc in ("falloc", "full"):
                        await asyncio.to_thread(files.preallocate, tmp, src.prealloc)
                else:
                    # An overlay: flatten its chain into one standalone image of the same format.
                    await asyncio.to_thread(
                        qemu_img.convert, src_path, src.format, tmp, src.format, prealloc="off", progress=report
                    )
        return self.info(req.target)

    @staticmethod
    def _disk_format(row: VolumeRow) -> str:
        if row.format not in ("raw", "qcow2"):
            raise InvalidInput(f"{row.key} is a {row.format} image: only disk images go to a shared pool")
        return row.format

    async def _copy_out(self, src: VolumeRow, pool: str, name: str, progress: Progress) -> VolumeInfo:
        """A shared volume copied into a dir pool (through qemu-img's network driver)."""
        with self._reserve(pool, name, fmt=src.format, prealloc="off", backing=None) as (tmp, _):

            def report(f: float) -> None:
                progress(f, f"copying {src.key}")

            await asyncio.to_thread(
                qemu_img.convert, qemu_img.Url(self.location(src.key)), src.format, tmp, src.format, progress=report
            )
        return self.info(f"{pool}/{name}")

    async def copy_image(self, src_key: str, pool: str, name: str) -> VolumeInfo:
        """A byte-for-byte copy of a volume's file (holes kept): the same backing image and the same internal
        snapshots, so one of them can be applied to the copy while the original stays as others need it."""
        src = self.row(src_key)
        with self._reserve(pool, name, fmt=src.format, prealloc=src.prealloc, backing=src.backing) as (tmp, _):
            await asyncio.to_thread(files.copy_file, self._path_of(src), tmp)
        return self.info(f"{pool}/{name}")

    def set_backing(self, key: str, backing: str | None) -> None:
        """Record that volume `key` is now an overlay on `backing` (a merge rewrote its header)."""
        pool, name = self._split(key)
        self._store.update_volume(pool, name, backing=backing)

    async def register_file(
        self, pool: str, name: str, src: Path, *, fmt: str, mode: int = 0o600, reuse: bool = False
    ) -> VolumeInfo:
        """Copy a file vmkit made (an image build's output) into a pool as a volume of the given format. With
        reuse, a volume of that name already there (an earlier registration of the same build) is kept as it is."""
        if reuse and self._store.volume(pool, name) is not None:
            return self.info(f"{pool}/{name}")
        with self._reserve(pool, name, fmt=fmt, prealloc="off", backing=None) as (tmp, _):
            await asyncio.to_thread(files.copy_file, src, tmp)
            os.chmod(tmp, mode)
        return self.info(f"{pool}/{name}")

    def check_import_source(self, pool: str, path: str) -> int:
        """The size of the regular file at path, refused up front (400/404/507) when it cannot be imported."""
        real = os.path.realpath(path)
        if real.startswith(("/proc/", "/sys/", "/dev/")):
            raise InvalidInput(f"{path} is not an image file")
        try:
            st = os.stat(real)
        except OSError as e:
            raise NotFound(f"cannot read {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path} is not a regular file")
        _, available = files.fs_space(self._pools.dir(pool))
        if st.st_blocks * 512 > available:
            raise NoSpace(
                f"not enough space in pool {pool!r}: {available} bytes free, {path} takes {st.st_blocks * 512}"
            )
        return st.st_size

    async def import_file(
        self, pool: str, name: str, path: str, size: int, progress: Progress = _no_progress
    ) -> VolumeInfo:
        """Copy the host file at path into a new volume (holes kept). Its format is detected once, here."""
        with self._reserve(pool, name, fmt="raw", prealloc="off", backing=None) as (tmp, _):

            def report(f: float) -> None:
                progress(f, f"copying {os.path.basename(path)}")

            await asyncio.to_thread(files.copy_file, Path(os.path.realpath(path)), tmp, progress=report)
            fmt = await asyncio.to_thread(self._check_new_image, tmp)
            self._store.update_volume(pool, name, format=fmt, backing=self._backing_key(tmp, fmt))
        return self.info(f"{pool}/{name}")

    async def upload(
        self, pool: str, name: str, chunks: AsyncIterator[bytes], length: int | None, *, backing: str | None = None
    ) -> VolumeInfo:
        """Import a file streamed by a client (never held whole in memory). Its format is detected here, once.
        backing: a qcow2 overlay sent from elsewhere is re-pointed at that volume here (`qemu-img rebase -u`)."""
        base = self.row(backing) if backing is not None else None
        directory = self._pools.dir(pool)
        if length is not None:
            _, available = files.fs_space(directory)
            if length > available:
                raise NoSpace(f"not enough space in pool {pool!r}: {available} bytes free, the upload is {length}")
        with self._reserve(pool, name, fmt="raw", prealloc="off", backing=None) as (tmp, final):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                buf = bytearray()
                async for chunk in chunks:
                    buf += chunk
                    if len(buf) >= UPLOAD_BUFFER:
                        await asyncio.to_thread(files.write_all, fd, bytes(buf), tmp)
                        buf.clear()
                if buf:
                    await asyncio.to_thread(files.write_all, fd, bytes(buf), tmp)
            finally:
                os.close(fd)
            if base is not None:
                if files.detect_format(tmp) != "qcow2":
                    raise InvalidInput(f"only a qcow2 image can be an overlay on {base.key}")
                await asyncio.to_thread(qemu_img.rebase_unsafe, tmp, self._path_of(base), base.format)
            fmt = await asyncio.to_thread(self._check_new_image, tmp)
            self._store.update_volume(pool, name, format=fmt, backing=self._backing_key(tmp, fmt))
        return self.info(f"{pool}/{name}")

    def _check_new_image(self, path: Path) -> str:
        """Detect a new file's format (once, now) and refuse images that would reach outside the pools."""
        fmt = files.detect_format(path)
        if fmt == "qcow2":
            if has_external_data(path):
                raise InvalidInput(
                    "a qcow2 with an external data file is not accepted (it names a file outside the pools)"
                )
            try:
                backing_chain(str(path), "qcow2", format_of=self.format_of)
            except ImageError as e:
                raise InvalidInput(f"refused: {e.message}") from None
        return fmt

    def _backing_key(self, path: Path, fmt: str) -> str | None:
        if fmt != "qcow2":
            return None
        chain = backing_chain(str(path), "qcow2", format_of=self.format_of)
        return self.key_of_path(chain[0].path) if chain else None

    async def refresh(self, pool: str) -> dict[str, list[str] | list[dict[str, str]]]:
        """Adopt image files dropped into the pool's directory; drop rows whose file is gone (unless a VM uses
        them). Returns what was adopted, skipped (with why) and forgotten. A shared pool: its server is read."""
        spec = self._pools.get(pool)
        if spec.shared:
            return await self._shared.scan(spec, self._users)
        directory = self._pools.dir(pool)
        if not directory.is_dir():
            raise Conflict(f"the directory of pool {pool!r} ({directory}) is missing")
        known = {r.name: r for r in self._store.volumes(pool)}
        adopted: list[str] = []
        skipped: list[dict[str, str]] = []
        forgotten: list[str] = []
        pending = sorted(n for n in os.listdir(directory) if n not in known and not n.startswith("."))
        # Several passes: an overlay dropped in beside its base is adopted once its base is.
        while pending:
            retry: list[str] = []
            reasons: dict[str, str] = {}
            for name in pending:
                try:
                    path = files.resolve(directory, name)
                    if not path.is_file():
                        continue
                    fmt = await asyncio.to_thread(self._check_new_image, path)
                    backing = self._backing_key(path, fmt)
                except (VmkitError, OSError) as e:
                    retry.append(name)
                    reasons[name] = getattr(e, "message", None) or str(e)
                    continue
                prealloc = "off"
                if fmt == "raw" and files.allocated_bytes(path) >= os.stat(path).st_size > 0:
                    prealloc = "falloc"  # fully allocated: recorded as thick
                self._store.add_volume(VolumeRow(pool, name, fmt, prealloc, backing, "ready", time.time()))
                adopted.append(name)
            if len(retry) == len(pending):
                skipped += [{"name": n, "reason": reasons[n]} for n in retry]
                break
            pending = retry
        for name, row in known.items():
            if row.state == "ready" and not os.path.lexists(directory / name):
                if self._users(row.key) or self.dependents(row.key):
                    skipped.append({"name": name, "reason": "file missing, but a VM or volume still refers to it"})
                    continue
                self._store.delete_volume(pool, name)
                forgotten.append(name)
        return {"adopted": adopted, "skipped": skipped, "forgotten": forgotten}

    def discard(self, key: str) -> None:
        """Remove a volume made moments ago by a step that is being undone (no user can have it yet)."""
        pool, name = self._split(key)
        row = self._store.volume(pool, name)
        if row is None:
            return
        self._store.update_volume(pool, name, state="deleting")
        spec = self._pools.get(pool)
        if spec.shared:
            self._shared.recover(spec, self._store.volume(pool, name) or row)  # removes it (or leaves it for a start)
            return
        with contextlib.suppress(FileNotFoundError, VmkitError):
            self._path_of(row).unlink()
        self._store.delete_volume(pool, name)

    # ----- changing volumes ----------------------------------------------------------------------
    def _refuse_if_running(self, key: str, what: str) -> None:
        running = self._running_users(key)
        if running:
            raise Conflict(f"cannot {what} {key}: VM(s) {', '.join(running)} use it and are running")

    async def resize(self, key: str, req: ResizeVolume, progress: Progress = _no_progress) -> VolumeInfo:
        row = self.row(key)
        if row.format == "iso":
            raise InvalidInput(f"{key} is an ISO image; it cannot be resized")
        refuse_save(row, "be resized")
        async with self._lock(key):
            self._refuse_if_running(key, "resize")
            path = self._path_of(row)
            current = virtual_size(path, row.format)
            if req.size_bytes < current and not req.allow_shrink:
                raise Conflict(
                    f"{key} is {current} bytes; shrinking to {req.size_bytes} loses data at its end "
                    "(pass allow_shrink / --allow-shrink if that is what you want)"
                )
            if req.size_bytes < current and self.dependents(key):
                raise Conflict(f"{key} backs {', '.join(self.dependents(key))}; it cannot shrink")
            progress(0.0, f"resizing {key}")
            prealloc = row.prealloc if row.prealloc in ("falloc", "full") else "off"
            self.check_room(row.pool, req.size_bytes - current, prealloc)
            await asyncio.to_thread(
                qemu_img.resize, path, row.format, req.size_bytes, shrink=req.size_bytes < current, prealloc=prealloc
            )
        return self.info(key)

    async def convert(self, key: str, req: ConvertVolume, progress: Progress = _no_progress) -> VolumeInfo:
        row = self.row(key)
        if row.format == "iso":
            raise InvalidInput(f"{key} is an ISO image; it cannot be converted")
        refuse_save(row, "be converted")
        if req.format == "raw" and req.prealloc == "metadata":
            raise InvalidInput("raw volumes have no metadata to preallocate: use off, falloc or full")
        async with self._lock(key):
            if self._users(key):
                raise Conflict(
                    f"cannot convert {key}: VM(s) {', '.join(self._users(key))} use it (detach it or delete them first)"
                )
            if self.dependents(key):
                raise Conflict(f"cannot convert {key}: it backs {', '.join(self.dependents(key))}")
            path = self._path_of(row)
            self.check_room(row.pool, virtual_size(path, row.format), req.prealloc)
            tmp = path.with_name(_convert_tmp(row.name))
            try:

                def report(f: float) -> None:
                    progress(f, f"converting {key} to {req.format} ({req.prealloc})")

                await asyncio.to_thread(
                    qemu_img.convert, path, row.format, tmp, req.format, prealloc=req.prealloc, progress=report
                )
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            # The row names the new format before the new file takes the old one's place: recover() finishes
            # a rename a crash cut off (state 'converting' only ever points at a complete file).
            with self._store.transaction():
                self._store.update_volume(
                    row.pool, row.name, format=req.format, prealloc=req.prealloc, backing=None, state="converting"
                )
            os.replace(tmp, path)
            self._store.update_volume(row.pool, row.name, state="ready")
        return self.info(key)

    async def delete(self, key: str, *, owner: str | None = None) -> None:
        """Delete a volume; refused while a VM (other than `owner`, the VM being deleted) uses it or another
        volume is backed by it."""
        row = self.row(key)
        async with self._lock(key):
            users = [u for u in self._users(key) if u != owner]
            if users:
                raise Conflict(f"cannot delete {key}: VM(s) {', '.join(users)} use it")
            deps = self.dependents(key)
            if deps:
                raise Conflict(f"cannot delete {key}: volume(s) {', '.join(deps)} are backed by it")
            spec = self._pools.get(row.pool)
            if spec.shared:
                await self._shared.delete(row, spec)
                return
            path = self._path_of(row)
            self._store.update_volume(row.pool, row.name, state="deleting")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._store.delete_volume(row.pool, row.name)


def refuse_save(row: VolumeRow, what: str) -> None:
    """A saved VM state is only ever read back by a restore: no disk may use it, no tool rewrite it (the routes
    call this too, so that the refusal is a 400 at once rather than a failed operation)."""
    if row.format == "save":
        raise InvalidInput(f"{row.key} is a saved VM state (vmkit vm restore {row.key}); it cannot {what}")


def _convert_tmp(name: str) -> str:
    """The fixed temporary name of an in-place convert (recover() must find it again)."""
    return f".vmkit-tmp.{name}.convert"
