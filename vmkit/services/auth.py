"""API tokens for the TCP listener: created, listed, revoked, and checked on every remote request.

A token is a random 32-byte secret shown once at creation; only its SHA-256 is stored, so a copy of the
database grants nothing. The UNIX socket needs no token (it is root-only).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from vmkit.errors import Conflict, InvalidInput, NotFound
from vmkit.model.vm import check_name
from vmkit.store.db import Store, TokenRow

SECRET_PREFIX = "vmk_"
# last_used_at is written at most this often per token (a busy client must not turn every GET into a write).
_USED_EVERY_S = 10.0


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    name: str
    read_only: bool
    created_at: float
    last_used_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "read_only": self.read_only,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


def _check_name(name: str) -> None:
    try:
        check_name(name, "token")
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def _token(row: TokenRow) -> Token:
    return Token(row.name, row.read_only, row.created_at, row.last_used_at)


class TokenService:
    def __init__(self, *, store: Store) -> None:
        self._store = store
        self._rows = {r.name: r for r in store.tokens()}

    def create(self, name: str, *, read_only: bool) -> tuple[Token, str]:
        """Returns the token and its secret (the only time the secret exists outside the client)."""
        _check_name(name)
        if name in self._rows:
            raise Conflict(f"token {name!r} already exists")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        row = TokenRow(name, _digest(secret), read_only, time.time(), None)
        self._store.add_token(row)
        self._rows[name] = row
        return _token(row), secret

    def list(self) -> list[Token]:
        return [_token(r) for r in sorted(self._rows.values(), key=lambda r: r.name)]

    def revoke(self, name: str) -> None:
        _check_name(name)
        if name not in self._rows:
            raise NotFound(f"no token named {name!r}")
        self._store.delete_token(name)
        del self._rows[name]

    def exists(self, name: str) -> bool:
        """Whether a token of this name is still there (a browser session made with it ends when it is revoked)."""
        return name in self._rows

    def verify(self, secret: str) -> Token | None:
        """The token this secret belongs to, or None. Every row is compared in constant time."""
        digest = _digest(secret)
        found = None
        for row in self._rows.values():
            if hmac.compare_digest(row.secret_sha256, digest):
                found = row
        if found is None:
            return None
        now = time.time()
        if found.last_used_at is None or now - found.last_used_at >= _USED_EVERY_S:
            self._store.set_token_used(found.name, now)
            found = TokenRow(found.name, found.secret_sha256, found.read_only, found.created_at, now)
            self._rows[found.name] = found
        return _token(found)
