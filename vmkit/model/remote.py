"""Pure data types for remotes: other vmkit daemons this one talks to, over their TCP API (TLS and a token).

A remote's URL is always `http(s)://HOST:PORT` (no path), plain HTTP only on loopback, as for the daemon's own
listener (host/tls.py). Its token is kept in the database (0600) and never shown again after `remote add`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from vmkit.host.tls import is_loopback
from vmkit.model.names import NAME_PATTERN, check_name, valid_host

# What the OpenAPI document states; parse_url below is the rule (and says what is wrong).
URL_PATTERN = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}/?$"
URL_MAX = 300
# A token goes into an HTTP header: visible ASCII only (no spaces, no CR/LF), bounded.
TOKEN_PATTERN = r"^[!-~]+$"
TOKEN_MAX = 512
FINGERPRINT_PATTERN = r"^([0-9A-Fa-f]{64}|([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2})$"

_TOKEN = re.compile(TOKEN_PATTERN)
_FINGERPRINT = re.compile(FINGERPRINT_PATTERN)
_URL_HINT = "use http(s)://HOST:PORT, e.g. https://192.0.2.10:8443 (plain http only on a loopback address)"


def parse_url(url: str) -> tuple[str, str, int]:
    """'https://HOST:PORT' → (scheme, host, port), IPv6 hosts without brackets; ValueError for people."""
    scheme, sep, rest = url.partition("://")
    rest = rest.removesuffix("/")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest or "@" in rest:
        raise ValueError(f"invalid remote URL {url!r}: {_URL_HINT}")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ValueError(f"invalid remote URL {url!r}: {_URL_HINT}")
        try:
            if "%" in host or ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {url!r}") from None
        host = str(ipaddress.ip_address(host))
        port = tail[1:]
    else:
        host, colon, port = rest.rpartition(":")
        if not colon:
            raise ValueError(f"remote URL {url!r} has no port: {_URL_HINT}")
        if not valid_host(host) or ":" in host:
            raise ValueError(f"invalid host {host!r} in {url!r}: an IP address or a DNS name")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in {url!r}: 1-65535")
    if scheme == "http" and not is_loopback(host):
        raise ValueError(f"refusing plain http to {host}: only a loopback address may go without TLS; use https://")
    return scheme, host.lower(), int(port)


def format_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def normalize_url(url: str) -> str:
    return format_url(*parse_url(url))


def normalize_fingerprint(text: str) -> str:
    """'AB:CD:…' or 64 hex digits → 64 lowercase hex digits (what host/tls.py fingerprint() gives)."""
    if not _FINGERPRINT.fullmatch(text):
        raise ValueError("invalid fingerprint: 64 hex digits (optionally in pairs joined by ':'), the SHA-256 of the "
                         "remote daemon's TLS certificate (GET /v1 there shows it as tls_fingerprint)")  # fmt: skip
    return text.replace(":", "").lower()


def _token(v: str) -> str:
    if not _TOKEN.fullmatch(v):
        raise ValueError("invalid token: visible ASCII characters only (no spaces)")
    return v


class CreateRemote(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: Annotated[
        str,
        Field(description="what this daemon calls the remote", json_schema_extra={"pattern": NAME_PATTERN}),
        AfterValidator(lambda v: check_name(v, "remote")),
    ]
    url: Annotated[
        str,
        Field(
            max_length=URL_MAX,
            description="the remote daemon's TCP listener: https://HOST:PORT (http:// on loopback only)",
            json_schema_extra={"pattern": URL_PATTERN},
        ),
        AfterValidator(normalize_url),
    ]
    token: Annotated[
        str,
        Field(
            min_length=1,
            max_length=TOKEN_MAX,
            description="an API token of the remote daemon (not read-only); stored, never shown again",
            json_schema_extra={"pattern": TOKEN_PATTERN},
        ),
        AfterValidator(_token),
    ]
    fingerprint: Annotated[
        str | None,
        Field(
            description="SHA-256 of the remote's TLS certificate to pin; none: the one it presents now is pinned "
            "(trust on first use)",
            json_schema_extra={"pattern": FINGERPRINT_PATTERN},
        ),
        AfterValidator(lambda v: None if v is None else normalize_fingerprint(v)),
    ] = None


class RemoteInfo(BaseModel):
    name: str
    url: str
    fingerprint: str | None = Field(description="the pinned certificate's SHA-256 (hex); null over plain http")
    created_at: float


class RemoteAdded(RemoteInfo):
    pinned_on_first_use: bool = Field(description="the fingerprint is the one the remote presented now (none given)")
    version: str | None = Field(description="the remote daemon's vmkit version")
    notes: list[str] = Field(description="what could not be checked, for people")


class RemoteStatus(RemoteInfo):
    reachable: bool = Field(description="the remote answered just now, with this token and certificate")
    version: str | None = None
    read_only: bool | None = Field(None, description="whether the stored token may only read (null: unknown)")
    error: str | None = Field(None, description="why it did not answer")
