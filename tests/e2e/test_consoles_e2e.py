"""The VNC bridge on a real demo guest, spoken to in RFB over the daemon's websocket, and the vendored UI files.

QEMU runs with `-vnc none` (no listener): each websocket client is a socket pair whose other end the daemon
hands to QEMU over QMP. "The canvas receives frames" is checked at protocol level: handshake, ServerInit with
a non-empty framebuffer, and a FramebufferUpdate with a rectangle in answer to a request.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect, unix_connect
from websockets.typing import Subprotocol

from tests.conftest import Daemon
from tests.e2e.guest import boot

pytestmark = pytest.mark.e2e
VENDOR = Path(__file__).resolve().parents[2] / "vmkit" / "ui" / "node_modules"


class Rfb:
    """Just enough of an RFB 3.8 client: a buffered byte reader over the websocket's binary messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buf = b""

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            msg = self.ws.recv(timeout=20)
            assert isinstance(msg, bytes), f"text frame on the VNC websocket: {msg!r}"
            self.buf += msg
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def handshake(self) -> tuple[int, int, str]:
        """Version, security None, ClientInit (shared); returns ServerInit's width, height and desktop name."""
        assert self.read(12) == b"RFB 003.008\n"
        self.ws.send(b"RFB 003.008\n")
        (count,) = struct.unpack("!B", self.read(1))
        types = self.read(count)
        assert count > 0 and 1 in types, f"QEMU offers security types {list(types)}, not None (skipauth)"
        self.ws.send(b"\x01")
        assert struct.unpack("!I", self.read(4)) == (0,), "security handshake failed"
        self.ws.send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack("!HH", self.read(4))
        self.bytes_per_pixel = self.read(16)[0] // 8  # pixel format: bits per pixel first
        (name_len,) = struct.unpack("!I", self.read(4))
        return width, height, self.read(name_len).decode(errors="replace")

    def update(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Ask for the whole screen and read the FramebufferUpdate that answers, pixels included (raw encoding:
        the only one this client announces); returns its rectangles' x, y, w, h."""
        self.ws.send(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
        msg_type, _, count = struct.unpack("!BBH", self.read(4))
        assert msg_type == 0, f"expected a FramebufferUpdate, got message type {msg_type}"
        rects = []
        for _ in range(count):
            x, y, w, h, enc = struct.unpack("!HHHHi", self.read(12))
            assert enc == 0, f"encoding {enc} was not asked for"
            self.read(w * h * self.bytes_per_pixel)
            rects.append((x, y, w, h))
        return rects


def _vnc(d: Daemon, name: str) -> ClientConnection:
    uri = f"ws://vmkit/v1/vms/{name}/vnc"
    return unix_connect(str(d.socket), uri, subprotocols=[Subprotocol("binary")], open_timeout=20)


@pytest.fixture(scope="module")
def running(daemon: Daemon) -> Iterator[str]:
    # VNC serves the VGA framebuffer from the first instant: no need to wait for the guest to boot.
    boot(daemon, "con1", wait=False)
    yield "con1"


def _qemu_uid(d: Daemon, name: str) -> int:
    pid = int((d.run_dir / "vms" / name / "qemu.pid").read_text())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_vnc_frames_from_unprivileged_qemu(daemon: Daemon, running: str) -> None:
    uid = _qemu_uid(daemon, running)
    assert uid != 0 and uid == daemon.vm(running)["uid"]
    with _vnc(daemon, running) as ws:
        assert ws.subprotocol == "binary"
        rfb = Rfb(ws)
        width, height, name = rfb.handshake()
        assert width > 0 and height > 0
        assert running in name  # QEMU names the desktop after -name guest=
        rects = rfb.update(width, height)
        assert rects and all(w > 0 and h > 0 and x + w <= width and y + h <= height for x, y, w, h in rects)


def test_two_clients_at_once(daemon: Daemon, running: str) -> None:
    with _vnc(daemon, running) as a, _vnc(daemon, running) as b:
        ra, rb = Rfb(a), Rfb(b)
        assert ra.read(12) == rb.read(12) == b"RFB 003.008\n"
        # Both complete the handshake as shared clients: neither pushes the other out.
        for r in (ra, rb):
            r.ws.send(b"RFB 003.008\n")
            (count,) = struct.unpack("!B", r.read(1))
            r.read(count)
            r.ws.send(b"\x01")
            assert r.read(4) == b"\0\0\0\0"
            r.ws.send(b"\x01")
            width, height = struct.unpack("!HH", r.read(4))
            assert width > 0 and height > 0
    # Closed clients leave nothing behind: a new one still gets a greeting.
    with _vnc(daemon, running) as c:
        assert Rfb(c).read(12) == b"RFB 003.008\n"


def test_many_clients_opened_concurrently(daemon: Daemon, running: str) -> None:
    # Each hand-over is getfd + add_client on the one monitor, while other opens race for it.
    def one(_: int) -> list[tuple[int, int, int, int]]:
        with _vnc(daemon, running) as ws:
            rfb = Rfb(ws)
            width, height, _ = rfb.handshake()
            return rfb.update(width, height)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(16)))


def test_vnc_of_a_vm_not_running_closes_with_a_reason(daemon: Daemon) -> None:
    daemon.cli("vm", "create", "con-off", "--image", "demo", "--memory", "256")
    for name, code, words in (("con-off", 4409, "not running"), ("con-none", 4404, "con-none")):
        with _vnc(daemon, name) as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == code and words in closed.value.rcvd.reason


def test_vnc_over_tcp_is_authenticated_like_the_rest(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(tmp_path, {"VMKIT_LISTEN": f"127.0.0.1:{port}", "VMKIT_TLS": "0"})
    d.start()
    try:
        d.cli("image", "demo", timeout_s=900)
        boot(d, "tcp1", wait=False)
        secrets = {
            kind: json.loads(d.cli("token", "create", kind, *flags, "--json").stdout)["secret"]
            for kind, flags in (("full", ()), ("ro", ("--read-only",)))
        }
        url = f"ws://127.0.0.1:{port}/v1/vms/tcp1/vnc"
        binary = [Subprotocol("binary")]
        for query, status in (("", 401), ("?token=vmk_nope", 401), (f"?token={secrets['ro']}", 403)):
            with pytest.raises(InvalidStatus) as refused:
                connect(url + query, subprotocols=binary, open_timeout=10)
            assert refused.value.response.status_code == status
        with connect(f"{url}?token={secrets['full']}", subprotocols=binary, open_timeout=10) as ws:
            width, height, _ = Rfb(ws).handshake()
            assert width > 0 and height > 0
    finally:
        d.cleanup()


def _get(d: Daemon, path: str) -> tuple[int, bytes, str]:
    """GET path exactly as written (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("vmkit", timeout=10)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(d.socket))
    conn.sock = sock
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.read(), res.getheader("content-type") or ""
    finally:
        conn.close()


def test_vendored_ui_files_are_served(daemon: Daemon) -> None:
    assert VENDOR.is_dir(), "run scripts/install-deps.sh"
    for path, needle in (
        ("/ui/vendor/@xterm/xterm/lib/xterm.mjs", b"Terminal"),
        ("/ui/vendor/@xterm/xterm/css/xterm.css", b".xterm"),
        ("/ui/vendor/@xterm/addon-fit/lib/addon-fit.mjs", b"FitAddon"),
        ("/ui/vendor/@novnc/novnc/core/rfb.js", b"export default class RFB"),
        ("/ui/vendor/@novnc/novnc/vendor/pako/lib/zlib/inflate.js", b"inflate"),
    ):
        status, body, ctype = _get(daemon, path)
        assert status == 200, path
        assert needle in body, path
        assert ctype.startswith("text/javascript" if path.endswith("js") else "text/css"), (path, ctype)


@pytest.mark.parametrize(
    "path",
    [
        "/ui/vendor/../../daemon.py",
        "/ui/vendor/@xterm/../../../api/consoles.py",
        "/ui/vendor/%2e%2e/%2e%2e/api/consoles.py",
        "/ui/vendor/@xterm/xterm/..%2f..%2f..%2f..%2fapi%2fconsoles.py",
        "/ui/vendor/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/ui/vendor//etc/passwd",
        "/ui/vendor/.package-lock.json",
        "/ui/vendor/@xterm/xterm/lib/",
        "/ui/vendor/@xterm/xterm/package.json%00.js",
        "/ui/vendor/@novnc/novnc/LICENSE.txt",
    ],
)
def test_vendor_refuses_what_is_not_a_served_file(daemon: Daemon, path: str) -> None:
    status, body, _ = _get(daemon, path)
    assert status == 404, (path, body[:200])
