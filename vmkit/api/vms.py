"""Routes for /v1/vms: parse, call one service method, return its result."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from vmkit.api.deps import Services, services, unless_stopping, ws_services
from vmkit.api.websocket import bridge
from vmkit.model.network import NicRequest
from vmkit.model.vm import (
    DISK_NAME_PATTERN,
    NAME_PATTERN,
    NIC_NAME_PATTERN,
    AttachDisk,
    ChangeMedia,
    CreateVm,
    DiskInfo,
    NicSpec,
    SetVm,
    VmInfo,
    VmState,
    check_name,
)

router = APIRouter(prefix="/v1/vms", tags=["vms"])
Svc = Annotated[Services, Depends(services)]
# Checked at the edge (400 for a malformed name, with check_name's message) and stated in the OpenAPI document.
VmName = Annotated[
    str, Path(description="VM name", json_schema_extra={"pattern": NAME_PATTERN}), AfterValidator(check_name)
]
# RFC 4648 base64 with its padding: what base64.b64encode makes.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_BASE64_RE = re.compile(BASE64_PATTERN)
# What GET /v1/vms/{name}/wait waits for: a state word, or "agent" (the guest agent is connected).
WAIT_WORDS = (*(str(s) for s in VmState), "agent")


def _wait_word(v: str) -> str:
    if v not in WAIT_WORDS:
        raise ValueError("must be one of " + ", ".join(repr(w) for w in WAIT_WORDS))
    return v


def _source_word(v: str) -> str:
    if v not in ("lease", "agent"):
        raise ValueError("must be 'lease' or 'agent'")
    return v


class ShutdownRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    force: bool = False
    # virsh shutdown --mode: ACPI, the guest agent, or ACPI then the agent when the guest ignores ACPI (auto).
    mode: Literal["auto", "acpi", "agent"] = "auto"


class AutostartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    argv: Annotated[list[str], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    input_b64: Annotated[
        str | None,
        Field(
            description="the command's stdin, base64-encoded",
            json_schema_extra={"pattern": BASE64_PATTERN, "contentEncoding": "base64"},
        ),
    ] = None

    @field_validator("input_b64")
    @classmethod
    def _input_b64(cls, v: str | None) -> str | None:
        if v is not None and not _BASE64_RE.fullmatch(v):  # fullmatch: "$" alone would accept a trailing newline
            raise ValueError("must be base64: A-Z a-z 0-9 + /, padded with = to a multiple of 4 characters")
        return v


class ExecResponse(BaseModel):
    exitcode: int | None
    signal: int | None
    stdout_b64: str
    stderr_b64: str


@router.get("")
async def list_vms(svc: Svc) -> list[VmInfo]:
    return svc.vms.all()


@router.post("", status_code=201)
async def create_vm(req: CreateVm, svc: Svc) -> VmInfo:
    return await svc.vms.create(req)


@router.get("/{name}")
async def get_vm(name: VmName, svc: Svc) -> VmInfo:
    return svc.vms.get(name)


@router.patch("/{name}")
async def set_vm(name: VmName, req: SetVm, svc: Svc) -> VmInfo:
    """Change resource limits; a running VM gets them at once."""
    return await svc.vms.set_limits(name, req)


@router.get("/{name}/disks")
async def vm_disks(name: VmName, svc: Svc) -> list[DiskInfo]:
    """The VM's disks; while it runs, `live` holds the I/O limits QEMU enforces (from query-block)."""
    return [DiskInfo.model_validate(d) for d in await svc.vms.disks(name)]


@router.post("/{name}/disks")
async def attach_disk(name: VmName, req: AttachDisk, svc: Svc) -> list[DiskInfo]:
    """Attach a volume as a new disk: hot-plugged while the VM runs, and kept for its next start."""
    return [DiskInfo.model_validate(d) for d in await svc.vmdisks.attach(name, req)]


@router.delete("/{name}/disks/{disk}")
async def detach_disk(
    name: VmName,
    disk: Annotated[str, Path(description="the disk's name (disk1)", pattern=DISK_NAME_PATTERN)],
    svc: Svc,
    timeout_s: Annotated[float, Query(gt=0, le=600, description="how long the guest may take to let go")] = 30.0,
) -> list[DiskInfo]:
    """Detach a disk (the guest must let go of it while running; 504 when it has not within timeout_s, and
    then the disk goes as soon as it does); its volume is kept."""
    return [DiskInfo.model_validate(d) for d in await svc.vmdisks.detach(name, disk, timeout_s=timeout_s)]


@router.post("/{name}/nics")
async def attach_nic(name: VmName, req: NicRequest, svc: Svc) -> list[NicSpec]:
    """Add a NIC on a network: hot-plugged while the VM runs, and kept for its next start."""
    return [NicSpec.model_validate(n) for n in await svc.vmnics.attach(name, req)]


@router.delete("/{name}/nics/{nic}")
async def detach_nic(
    name: VmName,
    nic: Annotated[str, Path(description="the NIC's name (net1)", pattern=NIC_NAME_PATTERN)],
    svc: Svc,
) -> list[NicSpec]:
    """Remove a NIC (the guest lets go of it while running)."""
    return [NicSpec.model_validate(n) for n in await svc.vmnics.detach(name, nic)]


@router.get("/{name}/ifaddr")
async def vm_ifaddr(
    name: VmName,
    svc: Svc,
    source: Annotated[
        str,
        Query(description="lease or agent", json_schema_extra={"enum": ["lease", "agent"]}),
        AfterValidator(_source_word),
    ] = "lease",  # fmt: skip
) -> list[dict[str, str | None]]:
    """The guest's addresses (virsh domifaddr): from its networks' DHCP leases, or from its guest agent."""
    return await svc.vms.ifaddr(name, source=source)


@router.post("/{name}/media")
async def change_media(name: VmName, req: ChangeMedia, svc: Svc) -> list[DiskInfo]:
    """Insert a medium into a CD-ROM drive, or eject it (source null); also while the VM runs."""
    return [DiskInfo.model_validate(d) for d in await svc.vmdisks.change_media(name, req)]


@router.delete("/{name}", status_code=204)
async def delete_vm(name: VmName, svc: Svc, keep_disks: bool = False) -> None:
    await svc.vms.delete(name, keep_disks=keep_disks)


@router.post("/{name}/start")
async def start_vm(name: VmName, svc: Svc) -> VmInfo:
    return await svc.vms.start(name)


@router.post("/{name}/shutdown")
async def shutdown_vm(name: VmName, svc: Svc, req: ShutdownRequest | None = None) -> VmInfo:
    req = req or ShutdownRequest()
    return await svc.vms.shutdown(name, timeout_s=req.timeout_s, force=req.force, mode=req.mode)


@router.post("/{name}/destroy")
async def destroy_vm(name: VmName, svc: Svc) -> VmInfo:
    return await svc.vms.destroy(name)


@router.post("/{name}/reboot")
async def reboot_vm(name: VmName, svc: Svc) -> VmInfo:
    return await svc.vms.reboot(name)


@router.post("/{name}/pause")
async def pause_vm(name: VmName, svc: Svc) -> VmInfo:
    return await svc.vms.pause(name)


@router.post("/{name}/resume")
async def resume_vm(name: VmName, svc: Svc) -> VmInfo:
    return await svc.vms.resume(name)


@router.put("/{name}/autostart")
async def autostart_vm(name: VmName, req: AutostartRequest, svc: Svc) -> VmInfo:
    return await svc.vms.set_autostart(name, req.enabled)


@router.get("/{name}/wait")
async def wait_vm(
    name: VmName,
    svc: Svc,
    request: Request,
    state: Annotated[
        str,
        Query(description="a state word, or 'agent' for guest agent up", json_schema_extra={"enum": list(WAIT_WORDS)}),
        AfterValidator(_wait_word),
    ] = "running",
    timeout_s: Annotated[float, Query(gt=0, le=3600)] = 60.0,
) -> VmInfo:
    return await unless_stopping(request, svc.vms.wait(name, want=state, timeout_s=timeout_s))


@router.post("/{name}/exec")
async def exec_vm(name: VmName, req: ExecRequest, svc: Svc) -> ExecResponse:
    data = base64.b64decode(req.input_b64, validate=True) if req.input_b64 is not None else None
    res = await svc.vms.exec(name, req.argv, timeout_s=req.timeout_s, input_data=data)
    return ExecResponse(
        exitcode=res.exitcode,
        signal=res.signal,
        stdout_b64=base64.b64encode(res.stdout).decode(),
        stderr_b64=base64.b64encode(res.stderr).decode(),
    )


@router.get("/{name}/log", response_class=Response)
async def vm_log(name: VmName, svc: Svc) -> Response:
    return Response(svc.vms.serial_log(name), media_type="application/octet-stream")


@router.websocket("/{name}/console")
async def vm_console(ws: WebSocket, name: str) -> None:
    """Binary frames both ways between the client and the VM's serial port."""
    await bridge(ws, ws_services(ws).vms.console(name))
