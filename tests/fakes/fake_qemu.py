#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 that speaks enough QMP for vmkit's lifecycle logic.

It takes the argv vmkit builds, serves QMP on the inherited `mon0` fd and writes a serial log. Its
behaviour is steered by environment variables so tests can drive failure paths real QEMU rarely shows:
  FAKE_QEMU_FAIL=1          print an error and exit 1 before serving QMP (like a bad option)
  FAKE_QEMU_IGNORE_ACPI=1   ignore system_powerdown (a guest without ACPI support)
  FAKE_QEMU_AGENT=1         report the guest agent port as open
  FAKE_QEMU_HANG_LATER=1    after the first QMP client leaves, accept clients but never answer (a hung QEMU)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time


def opt_value(argv: list[str], flag: str, key: str, ident: str | None = None) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a != flag:
            continue
        parts = dict(p.split("=", 1) for p in argv[i + 1].replace(",,", "\0").split(",") if "=" in p)
        if ident is None or parts.get("id") == ident:
            v = parts.get(key)
            return v.replace("\0", ",") if v else None
    return None


def json_stream(conn: socket.socket):
    """Yield JSON objects as they arrive; like QEMU's parser, no newline is needed between them."""
    decoder = json.JSONDecoder()
    buf = ""
    while True:
        try:
            data = conn.recv(65536)
        except OSError:
            return
        if not data:
            return
        buf += data.decode()
        while True:
            buf = buf.lstrip()
            try:
                obj, end = decoder.raw_decode(buf)
            except ValueError:
                break
            buf = buf[end:]
            yield obj


class Fake:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.status = "prelaunch"
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None
        self.disks = [opt_value(["-device", a, ""], "-device", "id") for a in argv if a.startswith("virtio-blk-pci,")]
        self.throttle: dict[str, dict] = {}
        self.queries = 0

    def send(self, msg: dict) -> None:
        with self.lock:
            if self.conn:
                try:
                    self.conn.sendall(json.dumps(msg).encode() + b"\r\n")
                except OSError:
                    pass

    def event(self, name: str, data: dict | None = None) -> None:
        t = time.time()
        msg = {"timestamp": {"seconds": int(t), "microseconds": int(t % 1 * 1e6)}, "event": name}
        if data is not None:
            msg["data"] = data
        self.send(msg)

    def guest_poweroff(self) -> None:
        time.sleep(0.1)
        self.status = "shutdown"
        self.event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        self.event("STOP")

    def handle(self, cmd: str, args: dict) -> dict:
        if cmd == "qmp_capabilities":
            return {}
        if cmd == "query-status":
            return {"status": self.status, "running": self.status == "running", "singlestep": False}
        if cmd == "cont":
            if self.status == "shutdown":
                raise ValueError("Resetting the Virtual Machine is required")
            self.status = "running"
            self.event("RESUME")
            return {}
        if cmd == "stop":
            self.status = "paused"
            self.event("STOP")
            return {}
        if cmd == "system_powerdown":
            self.event("POWERDOWN")
            if not os.environ.get("FAKE_QEMU_IGNORE_ACPI"):
                threading.Thread(target=self.guest_poweroff, daemon=True).start()
            return {}
        if cmd == "system_reset":
            if self.status == "shutdown":
                self.status = "paused"
            self.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            return {}
        if cmd == "query-chardev":
            return [{"label": "qga0", "filename": "unix:", "frontend-open": bool(os.environ.get("FAKE_QEMU_AGENT"))}]
        if cmd == "query-block":
            return [
                {"qdev": f"/machine/peripheral/{dev}/virtio-backend", "inserted": self.throttle.get(dev, {})}
                for dev in self.disks
            ]
        if cmd == "query-blockstats":
            # Counters that rise with every query, as if the guest kept reading a little.
            self.queries += 1
            stats = {"rd_bytes": 4096 * self.queries, "wr_bytes": 0, "rd_operations": self.queries, "wr_operations": 0}
            return [
                {
                    "node-name": dev.removesuffix("-dev"),
                    "qdev": f"/machine/peripheral/{dev}/virtio-backend",
                    "stats": stats,
                }
                for dev in self.disks
            ]
        if cmd == "block_set_io_throttle":
            dev = args["id"].split("/")[3]
            if dev not in self.disks:
                raise ValueError(f"Device '{args['id']}' not found")
            self.throttle[dev] = {"iops": args["iops"], "bps": args["bps"], "group": args.get("group")}
            return {}
        if cmd == "quit":
            return {}
        raise ValueError(f"The command {cmd} has not been found")

    def serve(self, listener: socket.socket) -> None:
        clients = 0
        while True:
            conn, _ = listener.accept()
            clients += 1
            if clients > 1 and os.environ.get("FAKE_QEMU_HANG_LATER"):
                time.sleep(3600)
            self.conn = conn
            self.send(
                {
                    "QMP": {
                        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
                        "capabilities": [],
                    }
                }
            )
            for req in json_stream(conn):
                reply: dict = {}
                try:
                    reply["return"] = self.handle(req["execute"], req.get("arguments", {}))
                except ValueError as e:
                    reply["error"] = {"class": "GenericError", "desc": str(e)}
                if "id" in req:
                    reply["id"] = req["id"]
                if req["execute"] == "quit":
                    self.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                    self.send(reply)
                    os._exit(0)
                self.send(reply)
            with self.lock:
                self.conn = None


def main() -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1)
    argv = sys.argv
    if os.environ.get("FAKE_QEMU_FAIL"):
        sys.stderr.write("qemu-system-x86_64: -device foo: 'foo' is not a valid device model name\n")
        sys.exit(1)
    log = opt_value(argv, "-chardev", "logfile", "serial0")
    if log:
        # Like QEMU, it can reach the log only through the descriptor it was handed (-add-fd).
        target: str | int = log
        if log.startswith("/dev/fdset/"):
            fdset = log.removeprefix("/dev/fdset/")
            add_fds = [v for i, v in enumerate(argv) if argv[i - 1] == "-add-fd"]
            target = next(int(v.split(",")[0].removeprefix("fd=")) for v in add_fds if f"set={fdset}," in v)
        with open(target, "w", closefd=False) as f:
            f.write("fake QEMU booting\n")

    def on_term(signum: int, _frame: object) -> None:
        sys.stderr.write(f"qemu-system-x86_64: terminating on signal {signum} from pid 1 (<unknown>)\n")
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    fd = int(opt_value(argv, "-chardev", "fd", "mon0") or "-1")
    listener = socket.socket(fileno=fd)
    Fake(argv).serve(listener)


if __name__ == "__main__":
    main()
