#!/usr/bin/env python3
"""Serial console keystroke echo: the time from a key sent on the console websocket to its echo coming back.

The path measured is the one a browser's xterm.js uses: websocket → daemon → the VM's serial socket → the
guest's tty (busybox's shell echoes) → back. Over the UNIX socket and, when asked, over the TCP listener with a
token (`--tcp`), as the web UI reaches it. Prints median/min/max of `--keys` keystrokes; never fails on timing.
Run as root: `make bench` (or .venv/bin/python bench/console_echo.py).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.sync.client import connect, unix_connect  # noqa: E402

from tests.conftest import Daemon  # noqa: E402 - the same daemon harness the tests use

READY = b"VMKIT-DEMO-READY"
TARGET_S = 0.050


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_times(ws: Any, keys: int) -> list[float]:
    times = []
    ws.send(b"\n")
    time.sleep(0.5)
    while True:  # drain the prompt
        try:
            ws.recv(timeout=0.3)
        except TimeoutError:
            break
    for i in range(keys):
        key = bytes([ord("a") + i % 26])
        t0 = time.monotonic()
        ws.send(key)
        got = b""
        while key not in got:
            got += ws.recv(timeout=5)
        times.append(time.monotonic() - t0)
        time.sleep(0.02)
    ws.send(b"\x15")  # Ctrl-U: drop the typed line
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=50)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmkit-bench-echo-"))
    port = free_port()
    d = Daemon(root, {"VMKIT_LISTEN": f"127.0.0.1:{port}"})
    d.start()
    rows = []
    try:
        d.cli("image", "demo", timeout_s=900)
        d.cli("vm", "create", "echo", "--image", "demo", "--memory", "256")
        d.cli("vm", "start", "echo")
        log = d.state_dir / "vms" / "echo" / "serial.log"
        deadline = time.monotonic() + 120
        while READY not in log.read_bytes():
            if time.monotonic() > deadline:
                raise TimeoutError("no READY")
            time.sleep(0.1)
        token = d.cli("token", "create", "bench").stdout.strip()
        with unix_connect(str(d.socket), "ws://localhost/v1/vms/echo/console") as ws:
            rows.append(("UNIX socket", echo_times(ws, args.keys)))
        url = f"ws://127.0.0.1:{port}/v1/vms/echo/console"
        with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            rows.append(("TCP + token (as the web UI)", echo_times(ws, args.keys)))
        d.cli("vm", "stop", "echo", "--force")
    finally:
        d.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    print(f"serial console keystroke echo, demo guest (busybox sh on ttyS0), TCG, {args.keys} keys")
    print(f"{'path':<30} {'median':>9} {'min':>9} {'max':>9}  target")
    for label, t in rows:
        print(
            f"{label:<30} {statistics.median(t) * 1000:>7.1f} ms {min(t) * 1000:>6.1f} ms {max(t) * 1000:>6.1f} ms"
            f"  <= {TARGET_S * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
