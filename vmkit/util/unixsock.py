"""Listening UNIX sockets with their permissions set at bind time (no window where they are wider)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def listen_unix(path: Path, *, mode: int = 0o600, backlog: int = 16) -> socket.socket:
    """Replace whatever is at path with a socket listening there, created with `mode`."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock
