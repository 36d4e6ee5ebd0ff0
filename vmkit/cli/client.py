"""HTTP/1.1 over the daemon's UNIX socket, standard library only.

Deliberately not http.client: importing it (with email.parser and ssl) costs ~14 ms, a third of the CLI's
start-up budget, and the daemon's answers need only a status line, Content-Length or chunked bodies.
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


class Client:
    def __init__(self, path: str | None = None, timeout_s: float = 3600.0) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, body: Any = None, *, raw: bool = False) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {url} HTTP/1.1\r\nHost: vmkit\r\nConnection: close\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise ApiError(0, f"cannot reach the vmkit daemon at {self.path} ({e.strerror}); is it running?") from e
            except PermissionError as e:
                raise ApiError(0, f"no permission to use {self.path} (root or group vmkit needed)") from e
            sock.sendall(head.encode() + b"\r\n" + data)
            with sock.makefile("rb") as f:
                status, payload = _read_response(f)
        finally:
            sock.close()
        if status >= 400:
            try:
                msg = json.loads(payload).get("error") or payload.decode()
            except (ValueError, AttributeError):
                msg = payload.decode(errors="replace")
            raise ApiError(status, str(msg))
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def post(self, url: str, body: Any = None) -> Any:
        return self.request("POST", url, body)
