"""Routes for /v1/images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from vmkit.api.deps import Services, services
from vmkit.model.vm import NAME_PATTERN, check_name

router = APIRouter(prefix="/v1/images", tags=["images"])
Svc = Annotated[Services, Depends(services)]


@router.get("")
async def list_images(svc: Svc) -> list[dict[str, Any]]:
    return svc.images.list()


@router.get("/{name}")
async def get_image(
    name: Annotated[
        str,
        Path(description="image name", json_schema_extra={"pattern": NAME_PATTERN}),
        AfterValidator(lambda v: check_name(v, "image")),
    ],
    svc: Svc,
) -> dict[str, Any]:
    return svc.images.get(name)


@router.post("/demo", status_code=202)
async def build_demo(svc: Svc) -> JSONResponse:
    """Build the demo guest as an operation; answers 200 with the image at once when it is cached."""
    ready = svc.images.demo_ready()
    if ready:
        return JSONResponse({"image": ready}, status_code=200)
    op = svc.ops.start("image-demo", svc.images.build_demo)
    return JSONResponse({"operation": op.to_dict()}, status_code=202)
