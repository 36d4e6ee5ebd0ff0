"""Routes for a VM's cloud-init NoCloud seed: parse, call one service method, return its result.

- GET /v1/vms/{name}/cloud-init   the seed's files as the guest reads them, and the settings they come from
- PUT /v1/vms/{name}/cloud-init   replace the settings and make the seed again (the VM shut off: else 409)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from vmkit.api.deps import Services, services
from vmkit.api.vms import VmName
from vmkit.model.cloudinit import CloudInitInfo, CloudInitRequest

router = APIRouter(prefix="/v1/vms", tags=["vms"])
Svc = Annotated[Services, Depends(services)]


@router.get("/{name}/cloud-init")
async def get_cloud_init(name: VmName, svc: Svc) -> CloudInitInfo:
    """What the VM's seed holds (meta-data, user-data, network-config) and who it lets in over SSH; 404 when the
    VM has no seed."""
    return await svc.cloudinit.show(name)


@router.put("/{name}/cloud-init")
async def set_cloud_init(name: VmName, req: CloudInitRequest, svc: Svc) -> CloudInitInfo:
    """Replace the seed's settings and make it again (a VM without one gets one); its next boot is a first boot
    for cloud-init (a new instance-id). Only while the VM is shut off."""
    return await svc.cloudinit.set(name, req)
