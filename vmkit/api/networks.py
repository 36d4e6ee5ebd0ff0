"""Routes for /v1/networks."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import AfterValidator, BaseModel, ConfigDict

from vmkit.api.deps import Services, services
from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.network import AddForward, CreateNetwork, Lease, NetworkInfo, PortForward

router = APIRouter(prefix="/v1/networks", tags=["networks"])
Svc = Annotated[Services, Depends(services)]
NetName = Annotated[
    str,
    Path(description="network name", json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(lambda v: check_name(v, "network")),
]


class AutostartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool


@router.get("")
async def list_networks(svc: Svc) -> list[NetworkInfo]:
    return svc.networks.all()


@router.post("", status_code=201)
async def create_network(req: CreateNetwork, svc: Svc) -> NetworkInfo:
    return await svc.networks.create(req)


@router.get("/{name}")
async def get_network(name: NetName, svc: Svc) -> NetworkInfo:
    return svc.networks.info(name)


@router.post("/{name}/start")
async def start_network(name: NetName, svc: Svc) -> NetworkInfo:
    return await svc.networks.start(name)


@router.post("/{name}/stop")
async def stop_network(name: NetName, svc: Svc) -> NetworkInfo:
    return await svc.networks.stop(name)


@router.put("/{name}/autostart")
async def autostart_network(name: NetName, req: AutostartRequest, svc: Svc) -> NetworkInfo:
    return await svc.networks.set_autostart(name, req.enabled)


@router.get("/{name}/leases")
async def network_leases(name: NetName, svc: Svc) -> list[Lease]:
    """DHCP leases handed out by the network's dnsmasq, each with the VM whose NIC has that MAC."""
    return svc.networks.leases(name)


@router.delete("/{name}", status_code=204)
async def delete_network(name: NetName, svc: Svc) -> None:
    await svc.networks.delete(name)


@router.get("/{name}/forwards")
async def list_forwards(name: NetName, svc: Svc) -> list[PortForward]:
    return svc.networks.info(name).forwards


@router.post("/{name}/forwards", status_code=201)
async def add_forward(name: NetName, req: AddForward, svc: Svc) -> NetworkInfo:
    """Forward a port of the host's own addresses to a VM's port (nat networks). Applied at once, atomically."""
    return await svc.networks.add_forward(name, req, svc.vms.network_hosts(name))


@router.delete("/{name}/forwards/{proto}/{host_port}")
async def delete_forward(
    name: NetName,
    proto: Literal["tcp", "udp"],
    host_port: Annotated[int, Path(ge=1, le=65535)],
    svc: Svc,
) -> NetworkInfo:
    return await svc.networks.delete_forward(name, proto, host_port)
