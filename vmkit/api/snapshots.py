"""Routes for /v1/vms/{name}/snapshots: parse, call one service method, return its result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import AfterValidator

from vmkit.api.deps import Services, services
from vmkit.api.vms import VmName
from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.snapshot import CreateSnapshot, SnapshotInfo
from vmkit.model.vm import VmInfo

router = APIRouter(prefix="/v1/vms/{name}/snapshots", tags=["snapshots"])
Svc = Annotated[Services, Depends(services)]


def _snapshot_name(v: str) -> str:
    return check_name(v, "snapshot")


SnapName = Annotated[
    str,
    Path(description="snapshot name", json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(_snapshot_name),
]


@router.get("")
async def list_snapshots(name: VmName, svc: Svc) -> list[SnapshotInfo]:
    """The VM's snapshot tree, oldest first (each with its parent and children; `current` marks the one the
    VM's present state grew from)."""
    return svc.snapshots.all(name)


@router.post("", status_code=201)
async def create_snapshot(name: VmName, req: CreateSnapshot, svc: Svc) -> SnapshotInfo:
    """Internal (disks, plus RAM and device state while the VM runs; qcow2 only), or disk-only (external: a
    new overlay on every disk, in one transaction)."""
    return await svc.snapshots.create(name, req)


@router.get("/{snapshot}")
async def get_snapshot(name: VmName, snapshot: SnapName, svc: Svc) -> SnapshotInfo:
    return svc.snapshots.info(name, snapshot)


@router.post("/{snapshot}/revert")
async def revert_snapshot(name: VmName, snapshot: SnapName, svc: Svc) -> VmInfo:
    """Return the VM to the snapshot: running from its RAM state when it has one, else shut off."""
    return await svc.snapshots.revert(name, snapshot)


@router.delete("/{snapshot}", status_code=204)
async def delete_snapshot(name: VmName, snapshot: SnapName, svc: Svc) -> None:
    """Delete a snapshot, leaf or middle; every other one stays revertable."""
    await svc.snapshots.delete(name, snapshot)
