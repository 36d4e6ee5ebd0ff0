"""Routes for /v1/images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from vmkit.api.deps import Services, services
from vmkit.images.debian import MAX_PACKAGES, PACKAGE_PATTERN
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


class BuildImage(BaseModel):
    """What `image build` may vary; images/debian.py checks it (400 with a message for people)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    size_bytes: int | None = Field(
        default=None, description="the disk's virtual size (1 GiB to 1 TiB, whole MiB; 4 GiB)"
    )
    packages: list[Annotated[str, Field(json_schema_extra={"pattern": PACKAGE_PATTERN})]] = Field(
        default_factory=list, description="Debian packages installed besides the base system", max_length=MAX_PACKAGES
    )


@router.post("/build/{release}", status_code=202)
async def build_image(
    release: Annotated[str, Path(description="what to build: debian-12")], svc: Svc, req: BuildImage | None = None
) -> JSONResponse:
    """Build an image from Debian packages as an operation; 200 with the image at once when this daemon has
    already registered one built from the same recipe (release, size, packages, mirror)."""
    req = req or BuildImage()
    recipe = svc.images.debian_recipe(release, size_bytes=req.size_bytes, packages=req.packages)
    ready = svc.images.debian_ready(recipe)
    if ready:
        return JSONResponse({"image": ready}, status_code=200)
    op = svc.ops.start(f"image-build-{recipe.release}", lambda progress: svc.images.build_debian(recipe, progress))
    return JSONResponse({"operation": op.to_dict()}, status_code=202)
