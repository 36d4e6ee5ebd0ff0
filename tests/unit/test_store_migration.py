"""A state database of an earlier schema is migrated in place and keeps every row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vmkit.store.db import SCHEMA_VERSION, SchemaTooNew, Store

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


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "vmkit.db"
    Store(db).set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(SchemaTooNew, match="newer vmkit"):
        Store(db)
