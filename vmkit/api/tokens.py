"""Routes for /v1/tokens: the API tokens of the TCP listener (the secret is answered once, at creation)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from vmkit.api.deps import Services, services
from vmkit.model.vm import NAME_PATTERN, check_name

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
Svc = Annotated[Services, Depends(services)]
TokenName = Annotated[
    str,
    Path(description="token name", json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(lambda v: check_name(v, "token")),
]


class CreateToken(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[
        str,
        Field(description="token name", json_schema_extra={"pattern": NAME_PATTERN}),
        AfterValidator(lambda v: check_name(v, "token")),
    ]
    read_only: bool = False


class TokenInfo(BaseModel):
    name: str
    read_only: bool
    created_at: float
    last_used_at: float | None


class NewToken(TokenInfo):
    secret: str = Field(description="shown this once; send it as Authorization: Bearer SECRET")


@router.get("")
async def list_tokens(svc: Svc) -> list[TokenInfo]:
    return [TokenInfo(**t.to_dict()) for t in svc.auth.list()]


@router.post("", status_code=201)
async def create_token(req: CreateToken, svc: Svc) -> NewToken:
    token, secret = svc.auth.create(req.name, read_only=req.read_only)
    return NewToken(**token.to_dict(), secret=secret)


@router.delete("/{name}", status_code=204)
async def revoke_token(name: TokenName, svc: Svc) -> None:
    svc.auth.revoke(name)
