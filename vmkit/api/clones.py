"""Route for POST /v1/vms/{name}/clone: a long copy, so it answers 202 with an operation to follow; what is
refused up front (no such VM, a taken name) answers at once."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from vmkit.api.deps import Services, services
from vmkit.api.vms import VmName
from vmkit.model.vm import CloneVm
from vmkit.services.operations import Progress

router = APIRouter(prefix="/v1/vms", tags=["vms"])
Svc = Annotated[Services, Depends(services)]


@router.post("/{name}/clone", status_code=202)
async def clone_vm(name: VmName, req: CloneVm, svc: Svc) -> JSONResponse:
    """A new VM like this one (new UUID, MACs and disks): full copies, or linked (overlays on its current
    images, which become read-only bases of both). From a shut-off VM or a running one."""
    svc.clones.check(name, req)

    async def run(progress: Progress) -> dict[str, Any]:
        return (await svc.clones.clone(name, req, progress)).model_dump()

    op = svc.ops.start("vm-clone", run)
    return JSONResponse({"operation": op.to_dict()}, status_code=202)
