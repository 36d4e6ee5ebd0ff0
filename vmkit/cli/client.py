"""HTTP over the daemon's UNIX socket with only the standard library (the CLI must start fast)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

DEFAULT_SOCKET = "/run/vmkit/vmkit.sock"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("VMKIT_SOCKET") or DEFAULT_SOCKET


class Client:
    def __init__(self, path: str | None = None, timeout_s: float = 3600.0) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, body: Any = None, *, raw: bool = False) -> Any:
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            headers = {}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            try:
                conn.request(method, url, body=data, headers=headers)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise ApiError(0, f"cannot reach the vmkit daemon at {self.path} ({e.strerror}); is it running?") from e
            except PermissionError as e:
                raise ApiError(0, f"no permission to use {self.path} (root or group vmkit needed)") from e
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                msg = json.loads(payload).get("error") or payload.decode()
            except (ValueError, AttributeError):
                msg = payload.decode(errors="replace")
            raise ApiError(resp.status, str(msg))
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def post(self, url: str, body: Any = None) -> Any:
        return self.request("POST", url, body)
