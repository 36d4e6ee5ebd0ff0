"""Routes for migrations: POST /v1/vms/{name}/migrate (the source; an operation to follow), and
/v1/migrations/… (the destination's side, which the source daemon calls with its token)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from vmkit.api.deps import Services, services
from vmkit.api.vms import VmName
from vmkit.model.migration import FinishIncoming, IncomingMigration, IncomingReady, MigrateVm
from vmkit.model.vm import VmInfo
from vmkit.services.operations import Progress

router = APIRouter(prefix="/v1", tags=["migrations"])
Svc = Annotated[Services, Depends(services)]
MigrationId = Annotated[str, Path(description="the incoming migration's id", pattern=r"^[0-9a-f]{32}$")]


@router.post("/vms/{name}/migrate", status_code=202)
async def migrate_vm(name: VmName, req: MigrateVm, svc: Svc) -> JSONResponse:
    """Move the VM to a remote vmkit host while it runs (its disks copied along with --copy-storage); it
    stays here, running as before, if anything fails."""
    svc.migrations.check(name, req)

    async def run(progress: Progress) -> dict[str, Any]:
        return await svc.migrations.migrate(name, req, progress)

    op = svc.ops.start("vm-migrate", run)
    return JSONResponse({"operation": op.to_dict()}, status_code=202)


@router.post("/vms/{name}/migrate-cancel", status_code=204)
async def cancel_migration(name: VmName, svc: Svc) -> None:
    """Stop a migration under way: the VM stays here, running as before, and the destination drops its copy."""
    await svc.migrations.cancel(name)


@router.post("/migrations/incoming", status_code=201)
async def incoming_migration(req: IncomingMigration, svc: Svc) -> IncomingReady:
    """(Called by the source daemon.) Define the VM here with new disks, its QEMU waiting for the streams."""
    return await svc.migrations.prepare(req)


@router.post("/migrations/{mid}/finish")
async def finish_migration(mid: MigrationId, req: FinishIncoming, svc: Svc) -> VmInfo:
    """(Called by the source daemon once the migration completed.) Run the guest here."""
    return await svc.migrations.finish(mid, req)


@router.post("/migrations/{mid}/alive", status_code=204)
async def migration_alive(mid: MigrationId, svc: Svc) -> None:
    """(Called by the source daemon every second while it migrates.) Without it the destination gives up."""
    await svc.migrations.heartbeat(mid)


@router.delete("/migrations/{mid}", status_code=204)
async def abort_migration(mid: MigrationId, svc: Svc) -> None:
    """(Called by the source daemon when it gives up.) Remove the VM that was coming, and its disks."""
    await svc.migrations.abort(mid)
