"""Taking over a state dir laid out by a vmkit from before pools (layout 1) into pools and volumes (layout 2).

Layout 1 kept each VM's disks in STATE/vms/NAME/, images' files in STATE/images/IMAGE/BUILD/, and disks kept
by `vm delete --keep-disks` in STATE/kept-disks/. Layout 2 keeps every one of them as a volume: VM disks and
kept disks in pool `default`, image files in pool `images`, with deterministic names so that the takeover
can simply run again after a crash:

1. move each file to its new name (a rename on the same filesystem; skipped when already done),
2. point each qcow2 overlay's header at its backing file's new path (`qemu-img rebase -u`: header only),
3. in one transaction: register the volumes, rewrite VM specs and image records, record layout 2.

A QEMU still running from before keeps its open files through the renames. Logs stay in STATE/vms/NAME/.
Nothing is deleted; a file the old layout did not know is left where it is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.model.storage import DEFAULT_POOL, IMAGES_POOL
from vmkit.model.vm import VmSpec
from vmkit.services.pools import PoolService
from vmkit.storage import files, qemu_img
from vmkit.store.db import Store, VolumeRow

log = logging.getLogger(__name__)

LAYOUT = 2


@dataclass(frozen=True)
class _Move:
    old: Path
    pool: str
    name: str
    new: Path
    format: str


def take_over(store: Store, pools: PoolService, state_dir: Path) -> int:
    """Bring an older layout into pools (idempotent); returns how many files became volumes."""
    pools.ensure_builtin()
    if store.get_meta("layout") == str(LAYOUT):
        return 0
    default_dir, images_dir = pools.dir(DEFAULT_POOL), pools.dir(IMAGES_POOL)
    moves: dict[str, _Move] = {}  # by old path
    taken: set[tuple[str, str]] = set()

    def plan(old: str, pool: str, name: str, fmt: str) -> None:
        if old in moves:
            return
        stem, dot, ext = name.partition(".")
        n = 0
        while (pool, name) in taken:  # e.g. a kept disk and a new VM's disk of the same VM name
            n += 1
            name = f"{stem}-{n}{dot}{ext}"
        taken.add((pool, name))
        directory = default_dir if pool == DEFAULT_POOL else images_dir
        moves[old] = _Move(Path(old), pool, name, directory / name, fmt)

    images = store.images()
    rows = store.vms()
    journal = store.get_meta("takeover_plan")
    if journal:
        # An interrupted takeover: follow its plan exactly, whatever has moved since.
        for old, pool, name, fmt in json.loads(journal):
            plan(old, pool, name, fmt)
    for data in images.values():
        for field in ("kernel", "initrd", "disk"):
            path = data.get(field)
            if path and _under(path, state_dir / "images"):
                build = Path(path).parent.name
                plan(path, IMAGES_POOL, f"{build}-{Path(path).name}", "qcow2" if field == "disk" else "raw")
    # Older builds' files still back overlays; they sit beside the current one.
    old_images = state_dir / "images"
    if old_images.is_dir():
        for f in sorted(old_images.glob("*/*/*")):
            if f.is_file() and not f.name.startswith("."):
                fmt = files.detect_format(f)
                plan(str(f), IMAGES_POOL, f"{f.parent.name}-{f.name}", "qcow2" if fmt == "qcow2" else "raw")
    for row in rows:
        for d in row.spec.disks:
            if _under(d.path, state_dir / "vms"):
                plan(d.path, DEFAULT_POOL, f"{row.spec.name}-{Path(d.path).name}", d.format)
    kept = state_dir / "kept-disks"
    if kept.is_dir():
        for f in sorted(kept.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                plan(str(f), DEFAULT_POOL, f.name, files.detect_format(f))
    if not moves and not rows and not images:
        store.set_meta("layout", str(LAYOUT))
        return 0

    # The plan is recorded before the first file moves, so a rerun maps every file the same way.
    store.set_meta("takeover_plan", json.dumps([[old, m.pool, m.name, m.format] for old, m in moves.items()]))
    # 1. Files.
    for m in moves.values():
        if m.old.exists() and not os.path.lexists(m.new):
            os.rename(m.old, m.new)
            log.info("moved %s to volume %s/%s", m.old, m.pool, m.name)
    by_new = {str(m.new): m for m in moves.values()}
    # 2. Overlay headers.
    backing_of: dict[str, str] = {}
    for m in moves.values():
        if m.format != "qcow2" or not m.new.exists():
            continue
        info = qemu_img.info(m.new, "qcow2")
        if info.backing_file is None:
            continue
        bf = info.backing_file
        # Its old path (not rebased yet) or its new one (rebased by an interrupted takeover).
        target = moves.get(bf) or by_new.get(bf)
        if target is None:
            log.warning("%s is backed by %s, which vmkit did not make; left as it is", m.new, info.backing_file)
            continue
        if info.backing_file != str(target.new):
            qemu_img.rebase_unsafe(m.new, target.new, target.format)
        backing_of[str(m.new)] = f"{target.pool}/{target.name}"
    # 3. Records.
    new_path = {old: str(m.new) for old, m in moves.items()}
    with store.transaction():
        for m in moves.values():
            if m.new.exists() and store.volume(m.pool, m.name) is None:
                store.add_volume(
                    VolumeRow(m.pool, m.name, m.format, "off", backing_of.get(str(m.new)), "ready", time.time())
                )
        for row in rows:
            spec = _moved_spec(row.spec, new_path, moves)
            if spec != row.spec:
                store.set_vm_spec(spec)
        for img_name, data in images.items():
            store.put_image(img_name, _moved_image(data, new_path, moves))
        store.set_meta("layout", str(LAYOUT))
        store.set_meta("takeover_plan", "")
    for leftover in (kept, *sorted(old_images.glob("*/*")), *sorted(old_images.glob("*")), old_images):
        try:
            leftover.rmdir()  # only when empty: anything unknown stays
        except OSError:
            pass
    return len(moves)


def _under(path: str, directory: Path) -> bool:
    return path.startswith(str(directory).rstrip("/") + "/")


def _moved_spec(spec: VmSpec, new_path: dict[str, str], moves: dict[str, _Move]) -> VmSpec:
    disks = [
        d.model_copy(update={"path": new_path[d.path], "volume": f"{moves[d.path].pool}/{moves[d.path].name}"})
        if d.path in new_path
        else d
        for d in spec.disks
    ]
    update: dict[str, Any] = {"disks": disks}
    for field in ("kernel", "initrd"):
        value = getattr(spec, field)
        if value in new_path:
            update[field] = new_path[value]
    return spec.model_copy(update=update)


def _moved_image(data: dict[str, Any], new_path: dict[str, str], moves: dict[str, _Move]) -> dict[str, Any]:
    out = dict(data)
    for field in ("kernel", "initrd", "disk"):
        old = data.get(field)
        if old in new_path:
            out[field] = new_path[old]
            out[f"{field}_volume"] = f"{moves[old].pool}/{moves[old].name}"
    return out
