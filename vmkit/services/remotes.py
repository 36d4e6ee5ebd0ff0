"""Remotes: other vmkit daemons this one talks to (for migration), only over their TCP API with a token.

A remote is checked when it is added: this daemon connects, pins the certificate (the fingerprint given, or
the one presented now: trust on first use), authenticates with the token and asks whether the token may change
things (a read-only one cannot migrate anything). Nothing is stored unless all of that worked. The token is
kept in the database (0600) and sent on every request to the remote; it is never answered by the API.

The HTTP client is the CLI's (blocking, standard library), run in a thread; its failures become VmkitErrors:
the remote's own answer keeps its status (401 aside, see _status) and message, prefixed with the remote's
name; a remote that cannot be reached, or presents another certificate, is 502; one that is too slow, 504.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import sqlite3
import ssl
import time
from typing import Any

from vmkit.cli.client import ApiError, Client
from vmkit.errors import Conflict, InvalidInput, NotFound, Timeout, VmkitError
from vmkit.model.names import check_name
from vmkit.model.remote import CreateRemote, RemoteAdded, RemoteInfo, RemoteStatus, parse_url
from vmkit.store.db import RemoteRow, Store

CONNECT_TIMEOUT_S = 5.0  # a TCP connection to a remote (a host that does not answer costs no more)
CHECK_TIMEOUT_S = 15.0  # add and info: each request, connection and TLS included
REQUEST_TIMEOUT_S = 60.0  # request(): the default for one request's answer
# On top of a request's own socket timeouts, in case a remote trickles its answer byte by byte.
_GRACE_S = 5.0


class RemoteError(VmkitError):
    """A request to a remote failed. `status` is what this daemon answers; `remote_status` what the remote
    answered (None: no answer, the connection failed or timed out)."""

    def __init__(self, remote: str, status: int, message: str, *, remote_status: int | None = None) -> None:
        super().__init__(f"remote {remote!r}: {message}")
        self.status = status
        self.remote = remote
        self.remote_status = remote_status


def _status(remote_status: int) -> int:
    """The status this daemon answers for a remote's error answer: the same, except that a 401 (the stored token
    was refused) becomes 403 — a 401 from this daemon would mean *its* caller must log in again (the web UI
    does) — and a 5xx that is not about the way there (a 500: a bug over there) becomes 502."""
    if remote_status == 401:
        return 403
    if 400 <= remote_status < 500 or remote_status in (502, 503, 504, 507):
        return remote_status
    return 502


def _timed_out(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or isinstance(e.__cause__, TimeoutError)


def remote_error(remote: str, e: BaseException) -> VmkitError:
    """What a failure of vmkit.cli.client.Client talking to `remote` becomes (for callers using client())."""
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, ApiError) and e.status >= 400:
        why = e.message
        if e.status == 401:
            why = f"the token was refused: {e.message}"
        return RemoteError(remote, _status(e.status), why, remote_status=e.status)
    if _timed_out(e):  # asyncio.TimeoutError and socket.timeout are TimeoutError
        why = e.message if isinstance(e, ApiError) else "no answer in time"
        return RemoteError(remote, Timeout.status, f"timed out: {why}")
    if isinstance(e, ApiError):  # status 0: no connection, TLS failed, fingerprint mismatch, no answer
        return RemoteError(remote, 502, e.message)
    if isinstance(e, ValueError):  # a status line or a body that is not what a vmkit daemon sends
        return RemoteError(remote, 502, f"answered something that is not the vmkit API ({e})")
    return RemoteError(remote, 502, f"connection failed: {type(e).__name__}: {e}")


def peer_fingerprint(host: str, port: int, *, connect_timeout_s: float, timeout_s: float) -> str:
    """SHA-256 (hex) of the certificate a TLS server presents, not verified (what is pinned on first use).
    Raises OSError (ssl.SSLError is one) when there is no TLS server there."""
    with socket.create_connection((host, port), timeout=min(connect_timeout_s, timeout_s)) as sock:
        sock.settimeout(timeout_s)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(sock, server_hostname=host) as tsock:
            der = tsock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return hashlib.sha256(der).hexdigest()


def _info(row: RemoteRow) -> RemoteInfo:
    return RemoteInfo(name=row.name, url=row.url, fingerprint=row.fingerprint, created_at=row.created_at)


def _check_name(name: str) -> None:
    try:
        check_name(name, "remote")
    except ValueError as e:
        raise InvalidInput(str(e)) from None


class RemoteService:
    def __init__(self, *, store: Store, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self._store = store
        self._connect_timeout_s = connect_timeout_s

    def _row(self, name: str) -> RemoteRow:
        _check_name(name)
        row = self._store.remote(name)
        if row is None:
            raise NotFound(f"no remote named {name!r}")
        return row

    def list(self) -> list[RemoteInfo]:
        return [_info(r) for r in self._store.remotes()]

    def info(self, name: str) -> RemoteInfo:
        """The remote as stored (no request to it; NotFound when there is none)."""
        return _info(self._row(name))

    def remove(self, name: str) -> None:
        self._row(name)
        self._store.delete_remote(name)

    def client(self, name: str, *, timeout_s: float = REQUEST_TIMEOUT_S) -> Client:
        """A blocking client of the remote's API (URL, token, pinned certificate); its errors are ApiError and
        OSError: remote_error(name, e) turns them into what request() raises."""
        row = self._row(name)
        return self._client(row.url, row.token, row.fingerprint, timeout_s)

    def _client(self, url: str, token: str, fingerprint: str | None, timeout_s: float) -> Client:
        return Client(
            url=url,
            token=token,
            fingerprint=fingerprint,
            timeout_s=timeout_s,
            connect_timeout_s=self._connect_timeout_s,
        )

    async def request(
        self, name: str, method: str, path: str, body: Any = None, *, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> Any:
        """One request to the remote's API; its JSON answer. RemoteError (a VmkitError) when it fails: with the
        remote's status and message (401 → 403, 500 → 502) or 502 (unreachable, TLS, wrong certificate) or 504."""
        return await self._call(name, self.client(name, timeout_s=timeout_s), method, path, body)

    async def _call(self, name: str, client: Client, method: str, path: str, body: Any = None) -> Any:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(client.request, method, path, body),
                timeout=client.timeout_s + client.connect_timeout_s + _GRACE_S,
            )
        except Exception as e:  # every failure of the transport is the remote's, said as such
            raise remote_error(name, e) from e

    async def add(self, req: CreateRemote) -> RemoteAdded:
        """Check the remote (certificate, token, token's rights) and store it; nothing is stored on failure."""
        if self._store.remote(req.name) is not None:
            raise Conflict(f"remote {req.name!r} already exists")
        scheme, host, port = parse_url(req.url)
        fingerprint, tofu, notes = req.fingerprint, False, []
        if scheme == "http":
            if req.fingerprint is not None:
                raise InvalidInput(f"{req.url} is plain http: there is no certificate to pin; use https://")
        else:
            presented = await self._presented(req.name, req.url, host, port)
            if fingerprint is None:
                fingerprint, tofu = presented, True
            elif not hmac.compare_digest(presented, fingerprint):
                raise InvalidInput(
                    f"certificate fingerprint mismatch: {req.url} presented {presented}, not {fingerprint}; "
                    "nothing stored"
                )
        client = self._client(req.url, req.token, fingerprint, CHECK_TIMEOUT_S)
        try:
            root = await self._call(req.name, client, "GET", "/v1")
        except RemoteError as e:
            if e.remote_status in (401, 403):
                raise InvalidInput(f"{req.url}: {_bare(e, req.name)}; nothing stored") from None
            raise
        if not isinstance(root, dict) or not isinstance(root.get("version"), str):
            raise RemoteError(req.name, 502, f"{req.url} does not answer like a vmkit daemon (GET /v1)")
        read_only = await self._read_only(req.name, client)
        if read_only:
            raise InvalidInput(
                f"the token is read-only on {req.url}: migrations need a token that may change things "
                "(`vmkit token create NAME` there, without --read-only); nothing stored"
            )
        if read_only is None:
            notes.append(
                "could not tell whether the token may change things (the remote has no GET /v1/session); "
                "migrations need one that may"
            )
        row = RemoteRow(req.name, req.url, req.token, fingerprint, time.time())
        try:
            self._store.add_remote(row)
        except sqlite3.IntegrityError:
            raise Conflict(f"remote {req.name!r} already exists") from None
        return RemoteAdded(**_info(row).model_dump(), pinned_on_first_use=tofu, version=root["version"], notes=notes)

    async def _presented(self, name: str, url: str, host: str, port: int) -> str:
        def probe() -> str:
            return peer_fingerprint(host, port, connect_timeout_s=self._connect_timeout_s, timeout_s=CHECK_TIMEOUT_S)

        try:
            return await asyncio.wait_for(asyncio.to_thread(probe), CHECK_TIMEOUT_S + _GRACE_S)
        except TimeoutError:
            raise RemoteError(name, Timeout.status, f"timed out: no TLS answer from {url} in time") from None
        except ssl.SSLError as e:
            raise RemoteError(name, 502, f"TLS with {url} failed ({e.reason or e}); is it https?") from None
        except OSError as e:
            raise RemoteError(name, 502, f"cannot reach {url} ({e.strerror or e})") from None

    async def _read_only(self, name: str, client: Client) -> bool | None:
        """Whether the client's token is read-only over there; None when the remote cannot say."""
        try:
            who = await self._call(name, client, "GET", "/v1/session")
        except RemoteError as e:
            if e.remote_status in (404, 405):
                return None
            raise
        ro = who.get("read_only") if isinstance(who, dict) else None
        return ro if isinstance(ro, bool) else None

    async def status(self, name: str) -> RemoteStatus:
        """The remote as stored, and whether it answers now (with its version and the token's rights)."""
        row = self._row(name)
        client = self._client(row.url, row.token, row.fingerprint, CHECK_TIMEOUT_S)
        base = _info(row).model_dump()
        try:
            root = await self._call(name, client, "GET", "/v1")
            read_only = await self._read_only(name, client)
        except VmkitError as e:
            return RemoteStatus(**base, reachable=False, error=_bare(e, name))
        version = root.get("version") if isinstance(root, dict) else None
        return RemoteStatus(
            **base, reachable=True, version=version if isinstance(version, str) else None, read_only=read_only
        )


def _bare(e: VmkitError, name: str) -> str:
    """A RemoteError's message without the "remote 'NAME': " prefix."""
    return e.message.removeprefix(f"remote {name!r}: ")
