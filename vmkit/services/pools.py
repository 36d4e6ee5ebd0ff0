"""Storage pools: directories that hold volumes (libvirt's dir pools, Proxmox's directory storages).

A pool is a row (name, kind, path) plus its directory. `default` (VMs' disks) and `images` (what VMs are
made from) exist from the first daemon start, under the state dir. A pool's path is stored resolved
(symlinks followed once, at creation), and no pool may contain another: a file belongs to one pool only.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmkit.errors import Conflict, InvalidInput, NotFound
from vmkit.model.storage import DEFAULT_POOL, IMAGES_POOL, CreatePool, PoolSpec
from vmkit.store.db import Store

BUILTIN_POOLS = (DEFAULT_POOL, IMAGES_POOL)


class PoolService:
    def __init__(self, *, store: Store, state_dir: Path) -> None:
        self._store = store
        self._state_dir = state_dir

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
        return Path(self.get(name).path)

    def pool_of_dir(self, directory: str) -> PoolSpec | None:
        """The pool whose directory is `directory` (a resolved path), if any."""
        return next((p for p in self.all() if p.path == directory), None)

    def create(self, req: CreatePool) -> PoolSpec:
        if any(p.name == req.name for p in self.all()):
            raise Conflict(f"a pool named {req.name!r} already exists")
        path = os.path.realpath(req.path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise InvalidInput(f"{req.path} exists and is not a directory")
        if path == "/":
            raise InvalidInput("the root directory cannot be a pool")
        for other in self.all():
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

    def delete(self, name: str) -> None:
        """Forget a pool (its directory is removed only when empty). Refused while it holds volumes."""
        pool = self.get(name)
        if name in BUILTIN_POOLS:
            raise Conflict(f"pool {name!r} is built in and cannot be deleted")
        count = len(self._store.volumes(name))
        if count:
            raise Conflict(f"pool {name!r} still holds {count} volume(s); delete them first")
        self._store.delete_pool(name)
        try:
            os.rmdir(pool.path)
        except OSError:
            pass  # not empty (files vmkit does not manage) or already gone: left as it is
