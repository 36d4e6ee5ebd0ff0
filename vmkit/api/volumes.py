"""Routes for volumes: /v1/volumes (all pools) and /v1/pools/{pool}/volumes/{name}.

Work that may take long (create, clone, convert, resize) answers 202 with an operation to follow
(GET /v1/operations/{id}); what is refused up front (no such pool or volume, a taken name) answers at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import AfterValidator, BaseModel

from vmkit.api.auth import is_remote
from vmkit.api.deps import Services, services
from vmkit.api.pools import PoolName
from vmkit.errors import Conflict, Forbidden, InvalidInput
from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.storage import (
    VOLUME_KEY_PATTERN,
    CloneVolume,
    ConvertVolume,
    CreateVolume,
    ImportVolume,
    ResizeVolume,
    VolumeInfo,
    split_volume,
)
from vmkit.services.operations import Progress
from vmkit.services.volumes import refuse_save

router = APIRouter(prefix="/v1", tags=["storage"])
Svc = Annotated[Services, Depends(services)]
VolName = Annotated[
    str,
    Path(description="volume name (its file name in the pool)", json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(lambda v: check_name(v, "volume")),
]


def _operation(svc: Services, kind: str, work: Callable[[Progress], Awaitable[BaseModel]]) -> JSONResponse:
    async def run(progress: Progress) -> dict[str, Any]:
        return (await work(progress)).model_dump()

    op = svc.ops.start(kind, run)
    return JSONResponse({"operation": op.to_dict()}, status_code=202)


@router.get("/volumes")
async def list_all_volumes(
    svc: Svc,
    pool: Annotated[str | None, Query(json_schema_extra={"pattern": NAME_PATTERN})] = None,
) -> list[VolumeInfo]:
    if pool is not None:
        try:
            check_name(pool, "pool")
        except ValueError as e:
            raise InvalidInput(str(e)) from None
    return await svc.volumes.all(pool)


@router.get("/pools/{pool}/volumes")
async def list_volumes(pool: PoolName, svc: Svc) -> list[VolumeInfo]:
    return await svc.volumes.all(pool)


@router.post("/pools/{pool}/volumes", status_code=202)
async def create_volume(pool: PoolName, req: CreateVolume, svc: Svc) -> JSONResponse:
    svc.volumes.check_free(pool, req.name)
    if req.format == "raw" and req.prealloc == "metadata":
        raise InvalidInput("raw volumes have no metadata to preallocate: use off, falloc or full")
    svc.volumes.check_room(pool, req.size_bytes, req.prealloc)
    return _operation(svc, "volume-create", lambda p: svc.volumes.create(pool, req, p))


@router.get("/pools/{pool}/volumes/{name}")
async def get_volume(pool: PoolName, name: VolName, svc: Svc, chain: bool = False) -> VolumeInfo:
    """One volume; with chain=true, every image below it (like `qemu-img info --backing-chain`)."""
    return svc.volumes.info(f"{pool}/{name}", chain=chain)


@router.delete("/pools/{pool}/volumes/{name}", status_code=204)
async def delete_volume(pool: PoolName, name: VolName, svc: Svc) -> None:
    await svc.volumes.delete(f"{pool}/{name}")


@router.post("/pools/{pool}/volumes/{name}/resize", status_code=202)
async def resize_volume(pool: PoolName, name: VolName, req: ResizeVolume, svc: Svc) -> JSONResponse:
    key = f"{pool}/{name}"
    refuse_save(svc.volumes.row(key), "be resized")
    return _operation(svc, "volume-resize", lambda p: svc.volumes.resize(key, req, p))


@router.post("/pools/{pool}/volumes/{name}/convert", status_code=202)
async def convert_volume(pool: PoolName, name: VolName, req: ConvertVolume, svc: Svc) -> JSONResponse:
    key = f"{pool}/{name}"
    refuse_save(svc.volumes.row(key), "be converted")
    return _operation(svc, "volume-convert", lambda p: svc.volumes.convert(key, req, p))


@router.post("/pools/{pool}/volumes/{name}/clone", status_code=202)
async def clone_volume(pool: PoolName, name: VolName, req: CloneVolume, svc: Svc) -> JSONResponse:
    key = f"{pool}/{name}"
    refuse_save(svc.volumes.row(key), "be cloned")
    svc.volumes.check_free(*split_volume(req.target))
    return _operation(svc, "volume-clone", lambda p: svc.volumes.clone(key, req, p))


@router.post("/pools/{pool}/volumes/{name}/import", status_code=202)
async def import_volume(pool: PoolName, name: VolName, req: ImportVolume, svc: Svc, request: Request) -> JSONResponse:
    """Copy an image file of the daemon's host into a new volume (sparse, at the speed of cp); its format is
    detected once, here. Only over the local UNIX socket: over TCP, upload the file (PUT …/upload)."""
    if is_remote(request.scope):
        raise Forbidden("import by path is only for local callers: upload the file instead (PUT …/upload)")
    svc.volumes.check_free(pool, name)
    size = svc.volumes.check_import_source(pool, req.path)
    return _operation(svc, "volume-import", lambda p: svc.volumes.import_file(pool, name, req.path, size, p))


@router.put(
    "/pools/{pool}/volumes/{name}/upload",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_volume(
    pool: PoolName,
    name: VolName,
    request: Request,
    svc: Svc,
    backing: Annotated[
        str | None,
        Query(
            description="POOL/NAME of the volume this qcow2 is an overlay on here: its header's backing name is "
            "rewritten to it (no data touched), as a migration sends a snapshot chain image by image",
            json_schema_extra={"pattern": VOLUME_KEY_PATTERN},
        ),
    ] = None,
) -> VolumeInfo:
    """Import an image as a new volume, streamed in the request body (never held whole in memory). Its format
    (raw, qcow2 or iso) is detected once, here; a qcow2 backed by anything but a volume is refused."""
    svc.volumes.check_free(pool, name)
    if backing is not None:
        svc.volumes.row(backing)  # 400 for a bad key, 404 when there is no such volume: before any byte is read
    length = request.headers.get("content-length")
    size = int(length) if length and length.isdigit() else None
    return await svc.volumes.upload(pool, name, request.stream(), size, backing=backing)


@router.get("/pools/{pool}/volumes/{name}/download", response_class=FileResponse)
async def download_volume(pool: PoolName, name: VolName, svc: Svc) -> FileResponse:
    """The volume's file as it is (export). An overlay is only meaningful with its backing chain: clone it
    without --linked first (a full, flattened copy) and export that."""
    key = f"{pool}/{name}"
    row = svc.volumes.row(key)
    if row.backing is not None:
        raise Conflict(
            f"{key} is an overlay on {row.backing}; export a full copy instead "
            f"(vmkit volume clone {key} {pool}/NEW, then export NEW)"
        )
    return FileResponse(svc.volumes.path(key), media_type="application/octet-stream", filename=name)
