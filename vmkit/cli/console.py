"""`vmkit vm console`: the terminal in raw mode, bytes relayed over the daemon's console websocket."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty

from vmkit.cli.client import Client

ESCAPE = b"\x1d"  # Ctrl-]


def attach(client: Client, name: str) -> int:
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from vmkit.cli.main import quote, ws_refusal

    try:
        ws = client.websocket(f"/v1/vms/{quote(name)}/console")
    except InvalidStatus as e:
        sys.stderr.write(f"vmkit: error: cannot attach to the console of {name}: {ws_refusal(e)}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"vmkit: error: cannot attach to the console of {name}: {e}\n")
        return 1
    try:
        first = ws.recv(timeout=0.2)
    except TimeoutError:
        first = b""
    except ConnectionClosed as e:
        reason = e.rcvd.reason if e.rcvd else "closed"
        sys.stderr.write(f"vmkit: error: {reason}\n")
        return 1
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        # Raw before the banner, and TCSANOW so nothing typed ahead is discarded.
        tty.setraw(fd, termios.TCSANOW)
    sys.stderr.write(f"Connected to {name} (escape character is ^])\r\n")
    sys.stderr.flush()
    out = sys.stdout.buffer
    if first:
        out.write(first if isinstance(first, bytes) else first.encode())
        out.flush()

    def pump_out() -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            for msg in ws:
                out.write(msg if isinstance(msg, bytes) else msg.encode())
                out.flush()

    reader = threading.Thread(target=pump_out, daemon=True)
    reader.start()
    try:
        while reader.is_alive():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 4096)
            if not data or ESCAPE in data:
                data = data.split(ESCAPE, 1)[0]
                if data:
                    ws.send(data)
                break
            ws.send(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        ws.close()
    sys.stderr.write("\r\n")
    return 0
