"""Routes for /v1/remotes: other vmkit daemons this one talks to (their tokens are never answered)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from pydantic import AfterValidator

from vmkit.api.deps import Services, services
from vmkit.api.ui import caller
from vmkit.errors import Forbidden
from vmkit.model.names import NAME_PATTERN, check_name
from vmkit.model.remote import CreateRemote, RemoteAdded, RemoteInfo, RemoteStatus

router = APIRouter(prefix="/v1/remotes", tags=["remotes"])
Svc = Annotated[Services, Depends(services)]
RemoteName = Annotated[
    str,
    Path(description="remote name", json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(lambda v: check_name(v, "remote")),
]


def _may_change(request: Request) -> None:
    """The UNIX socket, or a token (session) that may change things. (TokenAuth already refuses a read-only
    token anything but reading; this says it again where a token for another host is handed over.)"""
    if caller(request).read_only:
        raise Forbidden("read-only token")


@router.get("")
async def list_remotes(svc: Svc) -> list[RemoteInfo]:
    return svc.remotes.list()


@router.post("", status_code=201)
async def add_remote(req: CreateRemote, svc: Svc, request: Request) -> RemoteAdded:
    """Check the remote at once (its certificate: the fingerprint given, or the one it presents now is pinned;
    the token; whether the token may change things) and keep it; nothing is kept when a check fails."""
    _may_change(request)
    return await svc.remotes.add(req)


@router.get("/{name}")
async def get_remote(name: RemoteName, svc: Svc) -> RemoteStatus:
    """The remote, and whether it answers now with its token and pinned certificate."""
    return await svc.remotes.status(name)


@router.delete("/{name}", status_code=204)
async def remove_remote(name: RemoteName, svc: Svc, request: Request) -> None:
    _may_change(request)
    svc.remotes.remove(name)
