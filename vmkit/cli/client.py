"""HTTP/1.1 to the daemon, over its UNIX socket or (with a URL and a token) TCP and TLS; standard library only.

Deliberately not http.client: importing it (with email.parser and ssl) costs ~14 ms, a third of the CLI's
start-up budget, and the daemon's answers need only a status line, Content-Length or chunked bodies. ssl,
hashlib and hmac are imported only when a URL is used.
"""

from __future__ import annotations

import json
import os
import socket

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

DEFAULT_SOCKET = "/run/vmkit/vmkit.sock"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("VMKIT_SOCKET") or DEFAULT_SOCKET


def _read_response(f: Any) -> tuple[int, bytes]:
    status_line = f.readline()
    if not status_line:
        raise ApiError(0, "the daemon closed the connection without answering")
    status = int(status_line.split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    while (line := f.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = bytearray()
        while (size := int(f.readline().split(b";")[0].strip() or b"0", 16)) > 0:
            body += f.read(size)
            f.readline()
        return status, bytes(body)
    return status, f.read(length) if length is not None else f.read()


def split_url(url: str) -> tuple[bool, str, int]:
    """'https://HOST:PORT' → (tls, host, port); IPv6 hosts in brackets. (urllib.parse costs ~2 ms to import.)"""
    scheme, sep, rest = url.partition("://")
    rest = rest.rstrip("/")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        raise ApiError(0, f"invalid daemon URL {url!r}: use https://HOST:PORT (or http:// on loopback)")
    host, port = rest, 443 if scheme == "https" else 80
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise ApiError(0, f"invalid port in {url!r}")
            port = int(tail[1:])
    elif ":" in rest:
        host, _, p = rest.rpartition(":")
        if not p.isdigit():
            raise ApiError(0, f"invalid port in {url!r}")
        port = int(p)
    return scheme == "https", host, port


def normalize_fingerprint(text: str) -> str:
    """'AB:CD:…' or 'sha256:abcd…' → 64 lowercase hex digits."""
    fp = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ApiError(0, f"invalid fingerprint {text!r}: 64 hex digits, the SHA-256 of the daemon's certificate")
    return fp


def _decode(status: int, payload: bytes) -> Any:
    """The JSON answer, or ApiError with the daemon's {"error"} message."""
    if status >= 400:
        try:
            msg = json.loads(payload).get("error") or payload.decode()
        except (ValueError, AttributeError):
            msg = payload.decode(errors="replace")
        raise ApiError(status, str(msg))
    return json.loads(payload) if payload else None


class Client:
    def __init__(
        self,
        path: str | None = None,
        timeout_s: float = 3600.0,
        *,
        url: str | None = None,
        token: str | None = None,
        fingerprint: str | None = None,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s  # TCP: how long a connection (not an answer) may take
        self.url = url  # None: the UNIX socket
        self.token = token
        self.fingerprint = fingerprint

    @property
    def where(self) -> str:
        return self.url or self.path

    def _host_header(self) -> str:
        if self.url is None:
            return "vmkit"
        _, host, port = split_url(self.url)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.url and self.token else {}

    def connect(self) -> socket.socket:
        """A connected socket to the daemon: the UNIX socket, or TCP (TLS with https, its certificate verified or
        checked against the pinned fingerprint before a byte of the request, token included, is sent)."""
        if self.url is not None:
            return self._connect_tcp(self.url)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ApiError(0, f"cannot reach the vmkit daemon at {self.path} ({e.strerror}); is it running?") from e
        except PermissionError as e:
            sock.close()
            raise ApiError(0, f"no permission to use {self.path} (root or group vmkit needed)") from e
        return sock

    def _connect_tcp(self, url: str) -> socket.socket:
        tls, host, port = split_url(url)
        pinned = normalize_fingerprint(self.fingerprint) if self.fingerprint else None
        try:
            sock = socket.create_connection((host, port), timeout=min(self.timeout_s, self.connect_timeout_s))
        except OSError as e:
            raise ApiError(0, f"cannot reach the vmkit daemon at {url} ({e.strerror or e})") from e
        sock.settimeout(self.timeout_s)
        if not tls:
            return sock
        import hashlib
        import hmac
        import ssl

        ctx = ssl.create_default_context()
        if pinned:  # the pin is the trust: no CA, no host name
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            tsock = ctx.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise ApiError(
                0,
                f"cannot verify the certificate of {url} ({e.verify_message}); to trust a self-signed one, pin it "
                "with --fingerprint SHA256 (in the daemon's log and GET /v1 as tls_fingerprint)",
            ) from e
        except (ssl.SSLError, OSError) as e:
            sock.close()
            raise ApiError(0, f"TLS with {url} failed: {e}") from e
        if pinned:
            got = hashlib.sha256(tsock.getpeercert(binary_form=True) or b"").hexdigest()
            if not hmac.compare_digest(got, pinned):
                tsock.close()
                raise ApiError(
                    0,
                    f"certificate fingerprint mismatch for {url}: the server presented {got}, expected {pinned}; "
                    "refusing to connect",
                )
        return tsock

    def websocket(self, path: str) -> Any:
        """A websockets sync ClientConnection on the same kind of connection as requests."""
        from websockets.sync.client import connect

        # ws://, not wss://: the socket handed over is already TLS where it must be (and checked as above).
        return connect(
            f"ws://{self._host_header()}{path}", sock=self.connect(), additional_headers=self.auth_headers() or None
        )

    def request(self, method: str, url: str, body: Any = None, *, raw: bool = False) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {url} HTTP/1.1\r\nHost: {self._host_header()}\r\nConnection: close\r\n"
            f"Content-Length: {len(data)}\r\n"
        )
        if body is not None:
            head += "Content-Type: application/json\r\n"
        for name, value in self.auth_headers().items():
            head += f"{name}: {value}\r\n"
        sock = self.connect()
        try:
            sock.sendall(head.encode() + b"\r\n" + data)
            with sock.makefile("rb") as f:
                status, payload = _read_response(f)
        finally:
            sock.close()
        if raw and status < 400:
            return payload
        return _decode(status, payload)

    def _send_head(self, sock: socket.socket, method: str, url: str, extra: str) -> None:
        head = f"{method} {url} HTTP/1.1\r\nHost: {self._host_header()}\r\nConnection: close\r\n{extra}"
        for name, value in self.auth_headers().items():
            head += f"{name}: {value}\r\n"
        sock.sendall(head.encode() + b"\r\n")

    def upload(self, url: str, f: Any, size: int, progress: Any = None) -> Any:
        """PUT the open binary file f (size bytes) as the request body, streamed; returns the JSON answer."""
        sock = self.connect()
        try:
            self._send_head(sock, "PUT", url, f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n")
            sent = 0
            while sent < size:
                chunk = f.read(min(4 << 20, size - sent))
                if not chunk:
                    raise ApiError(0, "the file shrank while it was being sent")
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break  # the daemon refused early (no space, bad name…): its answer says why
                sent += len(chunk)
                if progress:
                    progress(sent / size if size else 1.0)
            with sock.makefile("rb") as r:
                status, payload = _read_response(r)
        finally:
            sock.close()
        return _decode(status, payload)

    def download(self, url: str, out: Any, progress: Any = None) -> int:
        """GET url and write its body to the open binary file out as it arrives, leaving holes where the body is
        zeros (disk images are mostly zeros); returns the byte count."""
        sock = self.connect()
        try:
            self._send_head(sock, "GET", url, "")
            with sock.makefile("rb") as r:
                status_line = r.readline()
                if not status_line:
                    raise ApiError(0, "the daemon closed the connection without answering")
                status = int(status_line.split(b" ", 2)[1])
                length = None
                while (line := r.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if status >= 400:
                    _decode(status, r.read(length) if length is not None else r.read())
                done = 0
                zeros = bytes(1 << 20)
                while length is None or done < length:
                    chunk = r.read(min(1 << 20, length - done) if length is not None else 1 << 20)
                    if not chunk:
                        break
                    if chunk == zeros[: len(chunk)]:
                        out.seek(len(chunk), os.SEEK_CUR)
                    else:
                        out.write(chunk)
                    done += len(chunk)
                    if progress and length:
                        progress(done / length)
                out.truncate(out.tell())  # a file ending in a hole still gets its full size
                if length is not None and done != length:
                    raise ApiError(0, f"the download stopped after {done} of {length} bytes")
                return done
        finally:
            sock.close()

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def post(self, url: str, body: Any = None) -> Any:
        return self.request("POST", url, body)
