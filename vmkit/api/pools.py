"""Routes for /v1/pools: storage pools (directories of volumes; shared pools on NFS and iSCSI servers)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import AfterValidator

from vmkit.api.deps import Services, services
from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.storage import CreatePool, PoolInfo

router = APIRouter(prefix="/v1/pools", tags=["storage"])
Svc = Annotated[Services, Depends(services)]
PoolName = Annotated[
    str,
    Path(description="pool name", json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(lambda v: check_name(v, "pool")),
]


@router.get("")
async def list_pools(svc: Svc) -> list[PoolInfo]:
    return await svc.volumes.pools()


@router.post("", status_code=201)
async def create_pool(req: CreatePool, svc: Svc) -> PoolInfo:
    return await svc.volumes.create_pool(req)


@router.get("/{pool}")
async def get_pool(pool: PoolName, svc: Svc) -> PoolInfo:
    svc.pools.get(pool)
    await svc.volumes.scan(pool)
    return svc.volumes.pool_info(pool)


@router.post("/{pool}/refresh")
async def refresh_pool(pool: PoolName, svc: Svc) -> dict[str, Any]:
    """Adopt image files dropped into the pool's directory, or made on a shared pool's server by another host
    (format detected once, now), and forget volumes whose file is gone."""
    return await svc.volumes.refresh(pool)


@router.delete("/{pool}", status_code=204)
async def delete_pool(pool: PoolName, svc: Svc) -> None:
    svc.volumes.delete_pool(pool)
