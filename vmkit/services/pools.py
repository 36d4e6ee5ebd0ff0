"""Storage pools: directories that hold volumes (libvirt's dir pools, Proxmox's directory storages), and shared
pools whose volumes live on a storage server (nfs, iscsi: services/sharedpools.py).

A pool is a row (name, kind, path) plus its directory, or for a shared pool its server's URL. `default` (VMs'
disks) and `images` (what VMs are made from) exist from the first daemon start, under the state dir. A dir
pool's path is stored resolved (symlinks followed once, at creation), and no pool may contain another: a file
belongs to one pool only.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmkit.errors import Conflict, InvalidInput, NotFound
from vmkit.model.storage import DEFAULT_POOL, IMAGES_POOL, CreatePool, PoolSpec
from vmkit.services.sharedpools import SharedPools
from vmkit.store.db import Store

BUILTIN_POOLS = (DEFAULT_POOL, IMAGES_POOL)


class PoolService:
    def __init__(self, *, store: Store, state_dir: Path, shared: SharedPools) -> None:
        self._store = store
        self._state_dir = state_dir
        self._shared = shared

    def ensure_builtin(self) -> None:
        """Create the built-in pools (rows and directories) when missing; idempotent."""
        known = {name for name, _, _ in self._store.pools()}
        for name in BUILTIN_POOLS:
            path = self._state_dir / "pools" / name
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if name not in known:
                self._store.add_pool(name, "dir", os.path.realpath(path))

    def all(self) -> list[PoolSpec]:
        return [PoolSpec(name=n, kind=k, path=p) for n, k, p in self._store.pools()]  # type: ignore[arg-type]

    def get(self, name: str) -> PoolSpec:
        for pool in self.all():
            if pool.name == name:
                return pool
        raise NotFound(f"no pool named {name!r}")

    def dir(self, name: str) -> Path:
        """A dir pool's directory; a shared pool has none (409: what asked is not possible there)."""
        pool = self.get(name)
        if pool.shared:
            raise Conflict(f"pool {name!r} is an {pool.kind} pool: its volumes are on a server, not in a directory")
        return Path(pool.path)

    def pool_of_dir(self, directory: str) -> PoolSpec | None:
        """The pool whose directory is `directory` (a resolved path), if any."""
        return next((p for p in self.all() if p.path == directory and not p.shared), None)

    async def create(self, req: CreatePool) -> PoolSpec:
        if any(p.name == req.name for p in self.all()):
            raise Conflict(f"a pool named {req.name!r} already exists")
        if req.kind != "dir":
            spec = PoolSpec(name=req.name, kind=req.kind, path=req.location())
            same = next((p.name for p in self.all() if p.path == spec.path), None)
            if same is not None:
                raise Conflict(f"pool {same!r} is already {spec.path}")
            await self._shared.probe(spec)  # 400 when the server does not answer: nothing is recorded
            self._store.add_pool(req.name, req.kind, spec.path)
            return self.get(req.name)
        assert req.path is not None  # CreatePool: a dir pool has its path
        path = os.path.realpath(req.path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise InvalidInput(f"{req.path} exists and is not a directory")
        if path == "/":
            raise InvalidInput("the root directory cannot be a pool")
        for other in (p for p in self.all() if not p.shared):
            inside = path == other.path or path.startswith(other.path.rstrip("/") + "/")
            contains = other.path.startswith(path.rstrip("/") + "/")
            if inside or contains:
                raise Conflict(
                    f"{path} {'is inside' if inside else 'contains'} pool {other.name!r} ({other.path}): "
                    "a file may belong to one pool only"
                )
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise InvalidInput(f"cannot create {path}: {e.strerror}") from None
        self._store.add_pool(req.name, req.kind, path)
        return self.get(req.name)

    def delete(self, name: str, in_use: list[str]) -> None:
        """Forget a pool (its directory is removed only when empty). A dir pool is refused while it holds
        volumes; a shared one while a VM here uses one of its volumes (in_use), and its volumes stay on the
        server: only this host's rows of them go (other hosts may still use them)."""
        pool = self.get(name)
        if name in BUILTIN_POOLS:
            raise Conflict(f"pool {name!r} is built in and cannot be deleted")
        if pool.shared:
            if in_use:
                raise Conflict(f"pool {name!r}: VM(s) {', '.join(in_use)} use its volumes")
            with self._store.transaction():
                for row in self._store.volumes(name):
                    self._store.delete_volume(name, row.name)
                self._store.delete_pool(name)
            return
        count = len(self._store.volumes(name))
        if count:
            raise Conflict(f"pool {name!r} still holds {count} volume(s); delete them first")
        self._store.delete_pool(name)
        try:
            os.rmdir(pool.path)
        except OSError:
            pass  # not empty (files vmkit does not manage) or already gone: left as it is
