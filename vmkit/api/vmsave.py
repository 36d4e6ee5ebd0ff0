"""Routes for saved VM states (virsh save / restore / managedsave): parse, call one service method, return its
result.

A save file is a volume (format "save"); it is named like any volume, POOL/NAME:
- POST /v1/vms/{name}/save                  the VM's state into a new save volume; the VM is shut off after
- POST /v1/saves/{pool}/{volume}/restore    the VM that save belongs to runs again from it
- GET  /v1/saves, /v1/saves/{pool}/{volume} save volumes as their headers describe them
- POST|GET|DELETE /v1/vms/{name}/managed-save   the VM's managed save: make (vm stop --save), show, discard
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from vmkit.api.deps import Services, services
from vmkit.api.pools import PoolName
from vmkit.api.vms import VmName
from vmkit.api.volumes import VolName
from vmkit.model.save import SaveInfo, SaveVm
from vmkit.model.vm import VmInfo

router = APIRouter(prefix="/v1", tags=["saves"])
Svc = Annotated[Services, Depends(services)]


@router.post("/vms/{name}/save", status_code=201)
async def save_vm(name: VmName, svc: Svc, req: SaveVm | None = None) -> SaveInfo:
    """Stop a running or paused VM, keeping its RAM and device state in a new save volume (default
    default/NAME.save). The VM is shut off afterwards; restoring the volume brings it back where it was."""
    return await svc.saves.save(name, req or SaveVm())


@router.post("/vms/{name}/managed-save")
async def managed_save_vm(name: VmName, svc: Svc) -> VmInfo:
    """Stop the VM keeping its state in a volume it owns (state `saved`); its next start resumes from it."""
    return await svc.saves.managed_save(name)


@router.get("/vms/{name}/managed-save")
async def get_managed_save(name: VmName, svc: Svc) -> SaveInfo:
    return svc.saves.managed_info(name)


@router.delete("/vms/{name}/managed-save")
async def remove_managed_save(name: VmName, svc: Svc) -> VmInfo:
    """Discard the VM's managed save; its next start boots afresh."""
    return await svc.saves.remove_managed(name)


@router.get("/saves")
async def list_saves(svc: Svc) -> list[SaveInfo]:
    return svc.saves.all()


@router.get("/saves/{pool}/{volume}")
async def get_save(pool: PoolName, volume: VolName, svc: Svc) -> SaveInfo:
    return svc.saves.info(f"{pool}/{volume}")


@router.post("/saves/{pool}/{volume}/restore")
async def restore_save(pool: PoolName, volume: VolName, svc: Svc) -> VmInfo:
    """Start the VM this save belongs to from it (it must be shut off), running or paused as it was saved. The
    volume is kept, unless it is the VM's managed save."""
    return await svc.saves.restore(f"{pool}/{volume}")
