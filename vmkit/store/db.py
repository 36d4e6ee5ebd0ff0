"""SQLite state store (WAL). The daemon is its only writer.

Rows hold what must survive a daemon restart: VM specs, autostart, and the last state seen (so a VM whose
QEMU vanished while the daemon was away can be told apart from one that was shut off). What QEMU itself
knows (running, paused) is re-read from QEMU on start, never trusted from here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.model.network import NetworkSpec
from vmkit.model.snapshot import SnapshotRecord
from vmkit.model.vm import VmSpec, VmState

SCHEMA_VERSION = 7

# API tokens for the TCP listener: only a SHA-256 of each secret is kept.
_TOKENS_TABLE = """
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    read_only INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL
)"""

# Storage pools and their volumes. A volume row in state 'creating' or 'deleting' marks work a crash may
# have cut short: the next daemon start removes its file and the row (services/volumes.py).
_STORAGE_TABLES = """
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    pool TEXT NOT NULL REFERENCES pools(name),
    name TEXT NOT NULL,
    format TEXT NOT NULL,
    prealloc TEXT NOT NULL,
    backing TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (pool, name)
)"""

# Networks: `active` is the state the user asked for (started or stopped), which the daemon restores at start.
_NETWORKS_TABLE = """
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    autostart INTEGER NOT NULL,
    active INTEGER NOT NULL,
    created_at REAL NOT NULL
)"""

# Snapshots (model/snapshot.py; one tree per VM, `current` flags the parent of what the VM runs now) and the
# journal of multi-step work on a VM (one entry per VM at most: the VM's lock is held while it runs), which the
# next daemon start finishes or undoes after a crash (services/snapshots.py).
_SNAPSHOT_TABLES = """
CREATE TABLE IF NOT EXISTS snapshots (
    vm TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    current INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    PRIMARY KEY (vm, name)
);
CREATE TABLE IF NOT EXISTS journal (
    vm TEXT PRIMARY KEY,
    data TEXT NOT NULL
)"""

# Other vmkit daemons this one talks to (services/remotes.py): their TCP API's URL, an API token of theirs (in
# clear: it is sent; the database is 0600) and the pinned SHA-256 of their TLS certificate (null over http).
_REMOTES_TABLE = """
CREATE TABLE IF NOT EXISTS remotes (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    token TEXT NOT NULL,
    fingerprint TEXT,
    created_at REAL NOT NULL
)"""

# The schema a fresh state dir gets; an older one is brought here by _MIGRATIONS, in order.
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    autostart INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    uid INTEGER UNIQUE
);
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
    + _TOKENS_TABLE
    + ";\n"
    + _STORAGE_TABLES
    + ";\n"
    + _NETWORKS_TABLE
    + ";\n"
    + _SNAPSHOT_TABLES
    + ";\n"
    + _REMOTES_TABLE
    + ";\n"
)

# version -> statements that bring the previous version to it. Each runs in one transaction with the
# version bump, so a crash leaves either the old schema or the new one.
_MIGRATIONS: dict[int, list[str]] = {
    # 2: each VM's QEMU runs as its own uid (gid = uid); VMs defined before get one at the next daemon start.
    2: [
        "ALTER TABLE vms ADD COLUMN uid INTEGER",
        "CREATE UNIQUE INDEX IF NOT EXISTS vms_uid ON vms(uid)",
    ],
    # 3: API tokens for remote access (TCP listener).
    3: [_TOKENS_TABLE],
    # 4: pools and volumes. The files of an earlier layout (STATE/vms/NAME/*.qcow2, STATE/images/…) are
    # moved into pools by services/upgrade.py at the next daemon start (meta 'layout').
    4: [stmt for stmt in _STORAGE_TABLES.split(";") if stmt.strip()],
    # 5: networks (VMs made before keep their user-mode NICs).
    5: [_NETWORKS_TABLE],
    # 6: snapshots and the per-VM journal.
    6: [stmt for stmt in _SNAPSHOT_TABLES.split(";") if stmt.strip()],
    # 7: remotes (other daemons, for migration).
    7: [_REMOTES_TABLE],
}


class SchemaTooNew(Exception):
    pass


@dataclass(frozen=True)
class VmRow:
    spec: VmSpec
    autostart: bool
    state: VmState
    reason: str | None
    uid: int | None


@dataclass(frozen=True)
class VolumeRow:
    pool: str
    name: str
    format: str
    prealloc: str
    backing: str | None  # POOL/NAME
    state: str  # ready | creating | deleting
    created_at: float

    @property
    def key(self) -> str:
        return f"{self.pool}/{self.name}"


@dataclass(frozen=True)
class TokenRow:
    name: str
    secret_sha256: str  # hex
    read_only: bool
    created_at: float
    last_used_at: float | None


@dataclass(frozen=True)
class RemoteRow:
    name: str
    url: str  # http(s)://HOST:PORT
    token: str = field(repr=False)  # the remote's API token, in clear (never answered by the API)
    fingerprint: str | None  # SHA-256 of its certificate, hex; None over plain http
    created_at: float


class Store:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        fresh = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'vms'").fetchone() is None
        if fresh:
            self._db.executescript(_SCHEMA)
            self.set_meta("schema_version", str(SCHEMA_VERSION))
            return
        version = int(self.get_meta("schema_version") or 1)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"this state dir was written by a newer vmkit (schema {version}, this one knows {SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _MIGRATIONS[target]:
                    self._db.execute(stmt)
                self.set_meta("schema_version", str(target))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # VMs
    def add_vm(self, spec: VmSpec, *, autostart: bool, uid: int) -> None:
        self._db.execute(
            "INSERT INTO vms(name, uuid, spec, autostart, state, reason, created_at, uid) VALUES (?,?,?,?,?,?,?,?)",
            (
                spec.name,
                spec.uuid,
                spec.model_dump_json(),
                int(autostart),
                VmState.SHUTOFF,
                None,
                time.time(),
                uid,
            ),
        )

    def vms(self) -> list[VmRow]:
        rows = self._db.execute("SELECT spec, autostart, state, reason, uid FROM vms ORDER BY name").fetchall()
        return [VmRow(VmSpec.model_validate_json(s), bool(a), VmState(st), r, u) for s, a, st, r, u in rows]

    def set_vm_spec(self, spec: VmSpec) -> None:
        self._db.execute("UPDATE vms SET spec = ? WHERE name = ?", (spec.model_dump_json(), spec.name))

    def set_vm_uid(self, name: str, uid: int) -> None:
        self._db.execute("UPDATE vms SET uid = ? WHERE name = ?", (uid, name))

    def has_vm(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is not None

    def set_vm_state(self, name: str, state: VmState, reason: str | None) -> None:
        self._db.execute("UPDATE vms SET state = ?, reason = ? WHERE name = ?", (state, reason, name))

    def set_autostart(self, name: str, enabled: bool) -> None:
        self._db.execute("UPDATE vms SET autostart = ? WHERE name = ?", (int(enabled), name))

    def delete_vm(self, name: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM vms WHERE name = ?", (name,))
            self._db.execute("DELETE FROM snapshots WHERE vm = ?", (name,))
            self._db.execute("DELETE FROM journal WHERE vm = ?", (name,))  # never to be taken for a new VM's

    # Images
    def put_image(self, name: str, data: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO images(name, data, created_at) VALUES (?,?,?)",
            (name, json.dumps(data), time.time()),
        )

    def image(self, name: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM images WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def images(self) -> dict[str, dict[str, Any]]:
        rows = self._db.execute("SELECT name, data FROM images ORDER BY name").fetchall()
        return {n: json.loads(d) for n, d in rows}

    # Pools and volumes
    def add_pool(self, name: str, kind: str, path: str) -> None:
        self._db.execute(
            "INSERT INTO pools(name, kind, path, created_at) VALUES (?,?,?,?)", (name, kind, path, time.time())
        )

    def pools(self) -> list[tuple[str, str, str]]:
        """(name, kind, path) of every pool, by name."""
        return [tuple(r) for r in self._db.execute("SELECT name, kind, path FROM pools ORDER BY name")]

    def delete_pool(self, name: str) -> None:
        self._db.execute("DELETE FROM pools WHERE name = ?", (name,))

    _VOL_COLS = "pool, name, format, prealloc, backing, state, created_at"

    def add_volume(self, row: VolumeRow) -> None:
        self._db.execute(
            f"INSERT INTO volumes({self._VOL_COLS}) VALUES (?,?,?,?,?,?,?)",
            (row.pool, row.name, row.format, row.prealloc, row.backing, row.state, row.created_at),
        )

    def volumes(self, pool: str | None = None) -> list[VolumeRow]:
        sql = f"SELECT {self._VOL_COLS} FROM volumes"
        rows = (
            self._db.execute(sql + " WHERE pool = ? ORDER BY name", (pool,))
            if pool is not None
            else self._db.execute(sql + " ORDER BY pool, name")
        )
        return [VolumeRow(*r) for r in rows]

    def volume(self, pool: str, name: str) -> VolumeRow | None:
        r = self._db.execute(
            f"SELECT {self._VOL_COLS} FROM volumes WHERE pool = ? AND name = ?", (pool, name)
        ).fetchone()
        return VolumeRow(*r) if r else None

    def update_volume(self, pool: str, name: str, **fields: str | None) -> None:
        allowed = {"format", "prealloc", "backing", "state"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE volumes SET {cols} WHERE pool = ? AND name = ?", (*fields.values(), pool, name))

    def delete_volume(self, pool: str, name: str) -> None:
        self._db.execute("DELETE FROM volumes WHERE pool = ? AND name = ?", (pool, name))

    # Networks
    def add_network(self, spec: NetworkSpec, *, autostart: bool) -> None:
        self._db.execute(
            "INSERT INTO networks(name, spec, autostart, active, created_at) VALUES (?,?,?,?,?)",
            (spec.name, spec.model_dump_json(), int(autostart), 0, time.time()),
        )

    def networks(self) -> list[tuple[NetworkSpec, bool, bool]]:
        """(spec, autostart, active) of every network, by name."""
        rows = self._db.execute("SELECT spec, autostart, active FROM networks ORDER BY name").fetchall()
        return [(NetworkSpec.model_validate_json(s), bool(a), bool(ac)) for s, a, ac in rows]

    def set_network_spec(self, spec: NetworkSpec) -> None:
        self._db.execute("UPDATE networks SET spec = ? WHERE name = ?", (spec.model_dump_json(), spec.name))

    def set_network_flags(self, name: str, *, autostart: bool | None = None, active: bool | None = None) -> None:
        if autostart is not None:
            self._db.execute("UPDATE networks SET autostart = ? WHERE name = ?", (int(autostart), name))
        if active is not None:
            self._db.execute("UPDATE networks SET active = ? WHERE name = ?", (int(active), name))

    def delete_network(self, name: str) -> None:
        self._db.execute("DELETE FROM networks WHERE name = ?", (name,))

    # Snapshots
    def add_snapshot(self, vm: str, rec: SnapshotRecord) -> None:
        self._db.execute(
            "INSERT INTO snapshots(vm, name, data, current, created_at) VALUES (?,?,?,0,?)",
            (vm, rec.name, rec.model_dump_json(), rec.created_at),
        )

    def snapshots(self, vm: str) -> list[SnapshotRecord]:
        """The VM's snapshots, oldest first."""
        rows = self._db.execute("SELECT data FROM snapshots WHERE vm = ? ORDER BY created_at, name", (vm,))
        return [SnapshotRecord.model_validate_json(d) for (d,) in rows]

    def snapshots_naming(self, volume: str) -> list[tuple[str, str]]:
        """(VM, snapshot) of every snapshot one of whose disks is volume POOL/NAME, by VM then age (one query:
        every volume listing asks it for each volume)."""
        rows = self._db.execute(
            "SELECT vm, name FROM snapshots WHERE EXISTS (SELECT 1 FROM json_each(data, '$.spec.disks') "
            "WHERE json_extract(value, '$.volume') = ?) ORDER BY vm, created_at, name",
            (volume,),
        )
        return [(str(v), str(n)) for v, n in rows]

    def put_snapshot(self, vm: str, rec: SnapshotRecord) -> None:
        self._db.execute(
            "UPDATE snapshots SET data = ? WHERE vm = ? AND name = ?", (rec.model_dump_json(), vm, rec.name)
        )

    def delete_snapshot(self, vm: str, name: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE vm = ? AND name = ?", (vm, name))

    def current_snapshot(self, vm: str) -> str | None:
        row = self._db.execute("SELECT name FROM snapshots WHERE vm = ? AND current = 1", (vm,)).fetchone()
        return str(row[0]) if row else None

    def set_current_snapshot(self, vm: str, name: str | None) -> None:
        self._db.execute("UPDATE snapshots SET current = (name IS ?) WHERE vm = ?", (name, vm))

    # The journal of multi-step work on a VM
    def journal(self, vm: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM journal WHERE vm = ?", (vm,)).fetchone()
        return json.loads(row[0]) if row else None

    def journals(self) -> dict[str, dict[str, Any]]:
        return {vm: json.loads(d) for vm, d in self._db.execute("SELECT vm, data FROM journal ORDER BY vm")}

    def set_journal(self, vm: str, data: dict[str, Any] | None) -> None:
        if data is None:
            self._db.execute("DELETE FROM journal WHERE vm = ?", (vm,))
        else:
            self._db.execute("INSERT OR REPLACE INTO journal(vm, data) VALUES (?,?)", (vm, json.dumps(data)))

    def transaction(self) -> _Transaction:
        """`with store.transaction():` — the statements inside commit together or not at all."""
        return _Transaction(self._db)

    # API tokens
    def add_token(self, row: TokenRow) -> None:
        self._db.execute(
            "INSERT INTO tokens(name, secret_sha256, read_only, created_at, last_used_at) VALUES (?,?,?,?,?)",
            (row.name, row.secret_sha256, int(row.read_only), row.created_at, row.last_used_at),
        )

    def tokens(self) -> list[TokenRow]:
        rows = self._db.execute(
            "SELECT name, secret_sha256, read_only, created_at, last_used_at FROM tokens ORDER BY name"
        ).fetchall()
        return [TokenRow(n, h, bool(r), c, u) for n, h, r, c, u in rows]

    def delete_token(self, name: str) -> bool:
        return self._db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount > 0

    def set_token_used(self, name: str, when: float) -> None:
        self._db.execute("UPDATE tokens SET last_used_at = ? WHERE name = ?", (when, name))

    # Remotes (other vmkit daemons)
    def add_remote(self, row: RemoteRow) -> None:
        """sqlite3.IntegrityError when the name is taken."""
        self._db.execute(
            "INSERT INTO remotes(name, url, token, fingerprint, created_at) VALUES (?,?,?,?,?)",
            (row.name, row.url, row.token, row.fingerprint, row.created_at),
        )

    def remotes(self) -> list[RemoteRow]:
        rows = self._db.execute("SELECT name, url, token, fingerprint, created_at FROM remotes ORDER BY name")
        return [RemoteRow(*r) for r in rows]

    def remote(self, name: str) -> RemoteRow | None:
        r = self._db.execute(
            "SELECT name, url, token, fingerprint, created_at FROM remotes WHERE name = ?", (name,)
        ).fetchone()
        return RemoteRow(*r) if r else None

    def delete_remote(self, name: str) -> bool:
        return self._db.execute("DELETE FROM remotes WHERE name = ?", (name,)).rowcount > 0


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
