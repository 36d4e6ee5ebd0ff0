"""A state database of an earlier schema is migrated in place and keeps every row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vmkit.model.snapshot import SnapshotRecord
from vmkit.model.vm import DiskSpec
from vmkit.store.db import _MIGRATIONS, SCHEMA_VERSION, RemoteRow, SchemaTooNew, Store, TokenRow, VolumeRow

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "state-v1.sql"


def test_v1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "vmkit.db"
    con = sqlite3.connect(db)
    con.executescript(FIXTURE.read_text().replace("@STATE@", str(tmp_path)))
    con.close()
    store = Store(db)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    rows = {r.spec.name: r for r in store.vms()}
    assert set(rows) == {"old", "oldrun"} and rows["old"].autostart and rows["old"].uid is None
    assert rows["old"].spec.disks[0].path == f"{tmp_path}/vms/old/disk0.qcow2"
    store.set_vm_uid("old", 1_900_000_001)
    with pytest.raises(sqlite3.IntegrityError):  # one identity per VM
        store.set_vm_uid("oldrun", 1_900_000_001)
    store.close()
    assert {r.spec.name: r.uid for r in Store(db).vms()} == {"old": 1_900_000_001, "oldrun": None}


def test_v2_database_is_migrated(tmp_path: Path) -> None:
    # A v2 database: the v1 fixture brought to v2 the way vmkit 2 did it.
    db = tmp_path / "vmkit.db"
    con = sqlite3.connect(db)
    con.executescript(FIXTURE.read_text().replace("@STATE@", str(tmp_path)))
    for stmt in _MIGRATIONS[2]:
        con.execute(stmt)
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.execute("UPDATE vms SET uid = 1900000005 WHERE name = 'old'")
    con.commit()
    assert con.execute("SELECT 1 FROM sqlite_master WHERE name = 'tokens'").fetchone() is None
    con.close()
    store = Store(db)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION) == "7"
    assert {r.spec.name: r.uid for r in store.vms()} == {"old": 1_900_000_005, "oldrun": None}
    assert store.tokens() == []
    store.add_token(TokenRow("ci", "00" * 32, True, 1.0, None))
    store.close()
    assert Store(db).tokens() == [TokenRow("ci", "00" * 32, True, 1.0, None)]


def test_v3_database_gets_pools_and_volumes(tmp_path: Path) -> None:
    db = tmp_path / "vmkit.db"
    con = sqlite3.connect(db)
    con.executescript(FIXTURE.read_text().replace("@STATE@", str(tmp_path)))
    for version in (2, 3):
        for stmt in _MIGRATIONS[version]:
            con.execute(stmt)
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    store = Store(db)
    assert store.get_meta("schema_version") == "7" and store.pools() == [] and store.volumes() == []
    assert store.networks() == []
    store.add_pool("default", "dir", str(tmp_path))
    store.add_volume(VolumeRow("default", "a.qcow2", "qcow2", "off", None, "ready", 1.0))
    with store.transaction():
        store.update_volume("default", "a.qcow2", state="deleting")
    with pytest.raises(RuntimeError), store.transaction():
        store.update_volume("default", "a.qcow2", state="ready")
        raise RuntimeError("rolled back")
    assert store.volume("default", "a.qcow2") == VolumeRow("default", "a.qcow2", "qcow2", "off", None, "deleting", 1.0)
    with pytest.raises(ValueError):
        store.update_volume("default", "a.qcow2", created_at="2")
    assert [r.key for r in store.volumes("default")] == ["default/a.qcow2"]


def test_v5_database_gets_snapshots_and_a_journal(tmp_path: Path) -> None:
    db = tmp_path / "vmkit.db"
    con = sqlite3.connect(db)
    con.executescript(FIXTURE.read_text().replace("@STATE@", str(tmp_path)))
    for version in (2, 3, 4, 5):
        for stmt in _MIGRATIONS[version]:
            con.execute(stmt)
    con.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    store = Store(db)
    assert store.get_meta("schema_version") == "7"
    old = store.vms()[0].spec
    assert store.snapshots(old.name) == [] and store.journals() == {}
    s1 = SnapshotRecord(name="s1", kind="internal", state="shut off", created_at=1.0, spec=old)
    s2 = SnapshotRecord(name="s2", kind="external", parent="s1", state="running", created_at=2.0, spec=old)
    store.add_snapshot(old.name, s2)
    store.add_snapshot(old.name, s1)
    store.set_current_snapshot(old.name, "s2")
    store.set_journal(old.name, {"op": "delete", "snapshot": "s1"})
    assert [r.name for r in store.snapshots(old.name)] == ["s1", "s2"]  # oldest first
    on_disk = old.model_copy(update={"disks": [DiskSpec(name="disk0", path="/p", format="qcow2", volume="default/a")]})
    store.add_snapshot(old.name, SnapshotRecord(name="s3", kind="external", state="shut off", created_at=3.0,
                                                spec=on_disk))  # fmt: skip
    assert store.snapshots_naming("default/a") == [(old.name, "s3")]  # which snapshots need a volume
    assert store.snapshots_naming("default/b") == []
    store.delete_snapshot(old.name, "s3")
    assert store.current_snapshot(old.name) == "s2" and store.journal(old.name) == {"op": "delete", "snapshot": "s1"}
    store.delete_vm(old.name)  # its snapshots and its journal go with it
    assert store.snapshots(old.name) == [] and store.journals() == {}


def test_v6_database_gets_remotes(tmp_path: Path) -> None:
    db = tmp_path / "vmkit.db"
    con = sqlite3.connect(db)
    con.executescript(FIXTURE.read_text().replace("@STATE@", str(tmp_path)))
    for version in (2, 3, 4, 5, 6):
        for stmt in _MIGRATIONS[version]:
            con.execute(stmt)
    con.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    con.commit()
    assert con.execute("SELECT 1 FROM sqlite_master WHERE name = 'remotes'").fetchone() is None
    con.close()
    store = Store(db)
    assert store.get_meta("schema_version") == "7"
    assert {r.spec.name for r in store.vms()} == {"old", "oldrun"}  # the rows of before are all there
    assert store.remotes() == [] and store.remote("b") is None
    b = RemoteRow("b", "https://192.0.2.2:8443", "vmk_secret", "ab" * 32, 2.0)
    a = RemoteRow("a", "http://127.0.0.1:8006", "vmk_other", None, 1.0)
    store.add_remote(b)
    store.add_remote(a)
    with pytest.raises(sqlite3.IntegrityError):  # one remote per name
        store.add_remote(RemoteRow("b", "https://192.0.2.3:8443", "t", None, 3.0))
    assert "vmk_secret" not in repr(b)  # a row in a log line or a traceback does not give the token away
    store.close()
    store = Store(db)
    assert store.remotes() == [a, b] and store.remote("b") == b
    assert store.delete_remote("b") and not store.delete_remote("b")
    assert store.remotes() == [a]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "vmkit.db"
    Store(db).set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(SchemaTooNew, match="newer vmkit"):
        Store(db)
