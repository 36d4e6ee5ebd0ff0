"""The pure pieces of snapshots: the request model, the argv of a start from an internal snapshot, a live
overlay's nodes, how overlays are named and dropped, and the CLI's tree."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.unit.test_argv import PATHS, SPECS, TCG, handover
from vmkit.cli.snapshots import _tree_lines
from vmkit.model.snapshot import CreateSnapshot, SnapshotRecord
from vmkit.qemu.argv import overlay_blockdevs, qemu_argv
from vmkit.qemu.blocksnap import _next_overlay
from vmkit.qemu.hotplug import _deletion_order


@pytest.mark.parametrize("name", ["123", "../x", "a/b", "", "-x", "x" * 64])
def test_bad_snapshot_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        CreateSnapshot(name=name)


def test_create_snapshot_is_strict() -> None:
    assert CreateSnapshot(name="before-upgrade.1").disk_only is False
    for bad in ({"name": "a", "disk_only": "yes"}, {"name": "a", "extra": 1}, {"name": "a", "description": "\0"}):
        with pytest.raises(ValidationError):
            CreateSnapshot.model_validate(bad)


def test_start_from_an_internal_snapshot() -> None:
    spec, host = SPECS["demo"]
    argv = qemu_argv(spec, PATHS, host, handover(spec), loadvm="before,upgrade")
    i = argv.index("-loadvm")
    assert argv[i + 1] == "before,,upgrade"  # escaped like every value in an option string
    assert "-S" in argv  # still paused until `cont`
    assert "-loadvm" not in qemu_argv(spec, PATHS, TCG, handover(spec))


def test_a_live_overlay_has_no_backing_until_the_snapshot_gives_it_one() -> None:
    fmt, file = overlay_blockdevs("disk0-o2", "/dev/fdset/7")[::-1]
    assert file == {"driver": "file", "filename": "/dev/fdset/7", "node-name": "disk0-o2-file",
                    "cache": {"direct": False}, "discard": "unmap"}  # fmt: skip
    assert fmt["backing"] is None and fmt["file"] == "disk0-o2-file" and fmt["node-name"] == "disk0-o2"


def test_overlays_are_numbered_per_disk() -> None:
    assert _next_overlay("disk0", ["disk0", "disk0-b1", "disk1-o4"]) == "disk0-o1"
    assert _next_overlay("disk0", ["disk0-o1", "disk0-o3", "disk0-o3-file", "disk10-o9"]) == "disk0-o4"


def test_overlays_are_dropped_before_what_they_stand_on() -> None:
    nodes = ["disk0-b1-file", "disk0", "disk0-o1-file", "disk0-b1", "disk0-o2", "disk0-file", "disk0-o1"]
    order = sorted(nodes, key=lambda n: _deletion_order(n, "disk0"))
    assert order == ["disk0-o2", "disk0-o1", "disk0-o1-file", "disk0", "disk0-file", "disk0-b1", "disk0-b1-file"]


def _snap(name: str, parent: str | None, current: bool = False) -> dict:
    return {"name": name, "parent": parent, "current": current, "kind": "external", "memory": False,
            "state": "running", "created_at": 0.0}  # fmt: skip


def test_the_tree_as_people_read_it() -> None:
    snaps = [_snap("s1", None), _snap("s2", "s1"), _snap("s3", "s2"), _snap("s4", "s1", current=True), _snap("t", None)]
    names = [row[0] for row in _tree_lines(snaps)]
    assert names == ["s1", "├─ s2", "│  └─ s3", "└─ s4 *", "t"]


def test_a_record_names_the_images_holding_it() -> None:
    spec, _ = SPECS["readonly-disk"]
    spec = spec.model_copy(update={"disks": [d.model_copy(update={"volume": f"default/{d.name}"}) for d in spec.disks]})
    rec = SnapshotRecord(name="s", kind="external", state="shut off", created_at=1.0, spec=spec)
    assert rec.images() == ["default/disk0"]  # the read-only disk is never part of a snapshot
