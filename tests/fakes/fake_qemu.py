#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 that speaks enough QMP for vmkit's lifecycle logic.

It takes the argv vmkit builds, serves QMP on the inherited `mon0` fd and writes a serial log. Its
behaviour is steered by environment variables so tests can drive failure paths real QEMU rarely shows:
  FAKE_QEMU_FAIL=1          print an error and exit 1 before serving QMP (like a bad option)
  FAKE_QEMU_IGNORE_ACPI=1   ignore system_powerdown (a guest without ACPI support)
  FAKE_QEMU_AGENT=1         report the guest agent port as open
  FAKE_QEMU_HANG_LATER=1    after the first QMP client leaves, accept clients but never answer (a hung QEMU)
  FAKE_QEMU_UNPLUG_DELAY=S  seconds the "guest" takes to acknowledge a device_del (default 0.05)
  FAKE_QEMU_IGNORE_UNPLUG=1 the "guest" never acknowledges a device_del (no DEVICE_DELETED)
  FAKE_QEMU_MIGRATE_DELAY=S seconds a migration to or from a file takes (default 0.05)

Storage is modelled enough for hot-plug: fdsets (-add-fd, add-fd with a descriptor passed by SCM_RIGHTS,
remove-fd, query-fdsets), block nodes (-blockdev, blockdev-add/-del with QEMU's checks for duplicates and
nodes in use), devices (-device, device_add/device_del on PCIe root ports; DEVICE_DELETED after the delay),
QOM (qom-list /machine/peripheral, qom-get parent_bus), query-pci, and CD-ROM trays (blockdev-open-tray,
-remove-medium, -insert-medium, -close-tray, shown in query-block).

Migration to and from a descriptor (a save and a restore: `migrate` / `migrate-incoming` with `fd:NAME` after
`getfd`, `-incoming defer`, query-migrate, migrate_cancel, MIGRATION events): the "state" written is a small
record of the fake's own; loading anything else fails, and a failed load ends the process, as with QEMU.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time


class QmpError(ValueError):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls


def parse_opts(text: str, implied: str | None = None) -> dict[str, str]:
    """A QEMU option string as a dict (",," is a comma); the first bare word is `implied` (-device's driver)."""
    out: dict[str, str] = {}
    for i, part in enumerate(text.replace(",,", "\0").split(",")):
        part = part.replace("\0", ",")
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
        elif i == 0 and implied:
            out[implied] = part
    return out


FAKE_STATE = b"FAKE-QEMU-VM-STATE\n"  # what the fake "saves" (a real QEMU writes its migration stream)
TRAY_COMMANDS = ("blockdev-open-tray", "blockdev-close-tray", "blockdev-remove-medium", "blockdev-insert-medium")


def on(value: object) -> bool:
    return value is True or value in ("on", "true", "yes")


def opt_value(argv: list[str], flag: str, key: str, ident: str | None = None) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a != flag:
            continue
        parts = dict(p.split("=", 1) for p in argv[i + 1].replace(",,", "\0").split(",") if "=" in p)
        if ident is None or parts.get("id") == ident:
            v = parts.get(key)
            return v.replace("\0", ",") if v else None
    return None


def json_stream(conn: socket.socket, fds: list[int]):
    """Yield JSON objects as they arrive; like QEMU's parser, no newline is needed between them. Descriptors
    passed along (SCM_RIGHTS) are appended to fds; like QEMU, only the latest is kept for the next command."""
    decoder = json.JSONDecoder()
    buf = ""
    while True:
        try:
            data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        except OSError:
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                for fd in fds:
                    os.close(fd)
                fds[:] = list(got)
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
        self.lock = threading.Lock()  # one message at a time on the socket
        self.state = threading.RLock()  # the machine's state, changed by commands and by "guest" threads
        self.conn: socket.socket | None = None
        self.throttle: dict[str, dict] = {}
        self.queries = 0
        self.passed_fds: list[int] = []  # the latest descriptor(s) received on the QMP socket
        self.fdsets: dict[int, list[dict]] = {}  # fdset-id -> [{"fd": n, "opaque": …}]
        self.nodes: dict[str, dict] = {}  # node-name -> blockdev options (flat, as on the command line)
        self.devices: dict[str, dict] = {}  # id -> device options, "driver" included
        self.trays: dict[str, dict] = {}  # ide-cd id -> {"open": bool, "node": str | None}
        self.unplugging: set[str] = set()
        self.named_fds: dict[str, int] = {}  # getfd
        self.migration: dict = {"status": "none"}  # query-migrate
        if "-incoming" in argv:
            self.status = "inmigrate"
        self.netdevs: set[str] = set()
        for i, a in enumerate(argv[:-1]):
            if a == "-add-fd":
                o = parse_opts(argv[i + 1])
                fd = {"fd": int(o["fd"]), **({"opaque": o["opaque"]} if "opaque" in o else {})}
                self.fdsets.setdefault(int(o["set"]), []).append(fd)
            elif a == "-blockdev":
                o = parse_opts(argv[i + 1])
                self.nodes[o["node-name"]] = o
            elif a == "-netdev":
                self.netdevs.add(parse_opts(argv[i + 1], "type")["id"])
            elif a == "-device":
                o = parse_opts(argv[i + 1], "driver")
                if "id" in o:
                    self.devices[o["id"]] = o
                    if o["driver"] == "ide-cd":
                        self.trays[o["id"]] = {"open": False, "node": o.get("drive")}

    @property
    def disks(self) -> list[str]:
        return [i for i, d in self.devices.items() if d["driver"] == "virtio-blk-pci"]

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
            blocks = [
                {
                    "device": "",
                    "qdev": f"/machine/peripheral/{dev}/virtio-backend",
                    "removable": False,
                    "locked": False,
                    "inserted": {**self.node_info(self.devices[dev]["drive"]), **self.throttle.get(dev, {})},
                }
                for dev in self.disks
            ]
            for dev, tray in self.trays.items():
                entry = {"device": "", "qdev": dev, "removable": True, "locked": False, "tray_open": tray["open"]}
                if tray["node"]:
                    entry["inserted"] = self.node_info(tray["node"])
                blocks.append(entry)
            return blocks
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
                raise QmpError(f"Device '{args['id']}' not found", "DeviceNotFound")
            self.throttle[dev] = {"iops": args["iops"], "bps": args["bps"], "group": args.get("group")}
            return {}
        storage = self.storage(cmd, args)
        if storage is not None:
            return storage
        migration = self.migrate(cmd, args)
        if migration is not None:
            return migration
        if cmd == "quit":
            return {}
        raise ValueError(f"The command {cmd} has not been found")

    # ----- storage ---------------------------------------------------------------------------------
    def node_info(self, node: str) -> dict:
        o = self.nodes[node]
        return {"node-name": node, "drv": o["driver"], "ro": on(o.get("read-only")), "file": o.get("filename", "")}

    def node_users(self, node: str) -> list[str]:
        users = [f"node {n}" for n, o in self.nodes.items() if node in (o.get("file"), o.get("backing"))]
        users += [f"device {d}" for d, o in self.devices.items() if o.get("drive") == node and d not in self.trays]
        users += [f"device {d}" for d, t in self.trays.items() if t["node"] == node]
        return users

    def port_of(self, dev: str) -> str | None:
        bus = self.devices[dev].get("bus")
        return bus if bus in self.devices and self.devices[bus]["driver"] == "pcie-root-port" else None

    def unplug(self, dev: str) -> None:
        time.sleep(float(os.environ.get("FAKE_QEMU_UNPLUG_DELAY", "0.05")))
        with self.state:
            self.devices.pop(dev, None)
            self.throttle.pop(dev, None)
            self.unplugging.discard(dev)
        path = f"/machine/peripheral/{dev}"
        self.event("DEVICE_DELETED", {"path": f"{path}/virtio-backend"})
        self.event("DEVICE_DELETED", {"device": dev, "path": path})

    def check_fdset(self, filename: str, read_only: bool) -> None:
        """Like QEMU, open /dev/fdset/N only through a descriptor of the set with the wanted access mode."""
        if not filename.startswith("/dev/fdset/"):
            raise QmpError(f"Could not open '{filename}': Permission denied (QEMU runs unprivileged)")
        fdset = int(filename.removeprefix("/dev/fdset/"))
        if fdset not in self.fdsets:
            raise QmpError(f"Could not open '{filename}': No such file or directory")
        want = os.O_RDONLY if read_only else os.O_RDWR
        modes = []
        for f in self.fdsets[fdset]:
            try:
                modes.append(fcntl.fcntl(f["fd"], fcntl.F_GETFL) & os.O_ACCMODE)
            except OSError:
                pass
        if want not in modes:
            raise QmpError(f"Could not open '{filename}': Permission denied")

    def storage(self, cmd: str, args: dict) -> object:
        """The storage (and NIC) commands; None for any other."""
        if cmd == "getfd":
            if not self.passed_fds:
                raise QmpError("No file descriptor supplied via SCM_RIGHTS")
            self.named_fds[args["fdname"]] = self.passed_fds.pop()
            return {}
        if cmd == "closefd":
            if args["fdname"] not in self.named_fds:
                raise QmpError(f"File descriptor named '{args['fdname']}' not found")
            os.close(self.named_fds.pop(args["fdname"]))
            return {}
        if cmd == "netdev_add":
            if args["id"] in self.netdevs:
                raise QmpError(f"Duplicate ID '{args['id']}' for netdev")
            if args.get("type") == "tap":
                if args.get("fd") not in self.named_fds:
                    raise QmpError(f"File descriptor named '{args.get('fd')}' has not been found")
                os.close(self.named_fds.pop(args["fd"]))  # the fake has no use for the tap itself
            self.netdevs.add(args["id"])
            return {}
        if cmd == "netdev_del":
            if args["id"] not in self.netdevs:
                raise QmpError(f"Device '{args['id']}' not found")
            self.netdevs.discard(args["id"])
            return {}
        if cmd == "add-fd":
            if not self.passed_fds:
                raise QmpError("No file descriptor supplied via SCM_RIGHTS")
            fd = self.passed_fds.pop()
            fdset = args.get("fdset-id", max(self.fdsets, default=0) + 1)
            entry = {"fd": fd, **({"opaque": args["opaque"]} if "opaque" in args else {})}
            self.fdsets.setdefault(fdset, []).append(entry)
            return {"fdset-id": fdset, "fd": fd}
        if cmd == "remove-fd":
            fdset = args["fdset-id"]
            if fdset not in self.fdsets:
                raise QmpError(f"File descriptor named 'fdset-id:{fdset}' not found")
            in_use = any(o.get("filename") == f"/dev/fdset/{fdset}" for o in self.nodes.values())
            for f in self.fdsets.pop(fdset):
                if not in_use and f["fd"] > 2 and f["fd"] not in self.inherited():
                    os.close(f["fd"])
            return {}
        if cmd == "query-fdsets":
            return [{"fdset-id": k, "fds": v} for k, v in sorted(self.fdsets.items())]
        if cmd == "blockdev-add":
            flat = self.flatten(args)
            node = flat.get("node-name")
            if not node:
                raise QmpError("A top-level node needs a node-name")
            if node in self.nodes:
                raise QmpError(f"Duplicate nodes with node-name='{node}'")
            for ref in ("file", "backing"):
                if ref in flat and flat[ref] not in self.nodes:
                    raise QmpError(f"Cannot find device='' nor node-name='{flat[ref]}'")
            if "filename" in flat:
                self.check_fdset(flat["filename"], on(flat.get("read-only")))
            self.nodes[node] = flat
            return {}
        if cmd == "blockdev-del":
            node = args["node-name"]
            if node not in self.nodes:
                raise QmpError(f"Failed to find node with node-name='{node}'")
            users = self.node_users(node)
            if users:
                raise QmpError(f"Node '{node}' is busy: in use by {', '.join(users)}")
            del self.nodes[node]
            return {}
        if cmd == "query-named-block-nodes":
            return [self.node_info(n) for n in self.nodes]
        if cmd == "device_add":
            dev, driver = args.get("id"), args["driver"]
            if dev in self.devices:
                raise QmpError(f"Duplicate device ID '{dev}'")
            if driver not in ("virtio-blk-pci", "virtio-net-pci", "e1000"):
                raise QmpError(f"fake QEMU cannot hot-plug {driver}")
            bus = args.get("bus")
            if bus not in self.devices or self.devices[bus]["driver"] != "pcie-root-port":
                raise QmpError(f"Bus '{bus}' not found")
            if any(self.port_of(d) == bus for d in self.devices):
                raise QmpError(f"Bus '{bus}' does not support hotplugging (it is full)")
            if driver != "virtio-blk-pci":
                if args.get("netdev") not in self.netdevs:
                    raise QmpError(f"Property 'netdev' can't find value '{args.get('netdev')}'")
                self.devices[dev] = {k: str(v) for k, v in args.items()}
                return {}
            drive = args.get("drive")
            if drive not in self.nodes:
                raise QmpError(f"Property 'virtio-blk-device.drive' can't find value '{drive}'")
            if any(o.get("drive") == drive for o in self.devices.values()):
                raise QmpError(f"Drive '{drive}' is already in use by another device")
            self.devices[dev] = {k: str(v) for k, v in args.items()}
            return {}
        if cmd == "device_del":
            dev = args["id"]
            if dev not in self.devices:
                raise QmpError(f"Device '{dev}' not found", "DeviceNotFound")
            if self.port_of(dev) is None:
                raise QmpError(f"Bus '{self.devices[dev].get('bus')}' does not support hotplugging")
            if dev in self.unplugging:
                return {}  # like q35's ACPI hotplug in QEMU 7.2: the request is simply made again
            self.unplugging.add(dev)
            if not os.environ.get("FAKE_QEMU_IGNORE_UNPLUG"):
                threading.Thread(target=self.unplug, args=(dev,), daemon=True).start()
            return {}
        if cmd == "query-pci":
            return [{"bus": 0, "devices": self.pci_devices()}]
        if cmd == "qom-list":
            if args["path"] != "/machine/peripheral":
                raise QmpError(f"Device '{args['path']}' not found", "DeviceNotFound")
            return [{"name": "type", "type": "string"}] + [
                {"name": d, "type": f"child<{o['driver']}>"} for d, o in self.devices.items()
            ]
        if cmd == "qom-get":
            dev = args["path"].removeprefix("/machine/peripheral/")
            if dev not in self.devices:
                raise QmpError(f"Device '{args['path']}' not found", "DeviceNotFound")
            if args["property"] != "parent_bus":
                raise QmpError(f"Property '{args['property']}' not found")
            bus = self.devices[dev].get("bus", "pcie.0")
            return f"/machine/peripheral/{bus}/{bus}" if bus in self.devices else f"/machine/q35/{bus}"
        if cmd in TRAY_COMMANDS:
            dev = args["id"]
            if dev not in self.devices:
                raise QmpError(f"Device '{dev}' not found", "DeviceNotFound")
            tray = self.trays.get(dev)
            if tray is None:
                raise QmpError(f"Device '{dev}' is not removable")
            if cmd == "blockdev-open-tray":
                if not tray["open"]:
                    tray["open"] = True
                    self.event("DEVICE_TRAY_MOVED", {"device": "", "id": dev, "tray-open": True})
            elif cmd == "blockdev-close-tray":
                if tray["open"]:
                    tray["open"] = False
                    self.event("DEVICE_TRAY_MOVED", {"device": "", "id": dev, "tray-open": False})
            elif cmd == "blockdev-remove-medium":
                if not tray["open"]:
                    raise QmpError(f"Tray of device '{dev}' is not open")
                tray["node"] = None
            elif cmd == "blockdev-insert-medium":
                node = args["node-name"]
                if not tray["open"]:
                    raise QmpError(f"Tray of device '{dev}' is not open")
                if tray["node"]:
                    raise QmpError("There already is a medium in the device")
                if node not in self.nodes:
                    raise QmpError(f"Node '{node}' not found")
                if self.node_users(node):
                    raise QmpError(f"Node '{node}' is already in a BlockBackend")
                tray["node"] = node
            return {}
        return None

    # ----- migration (save and restore) -----------------------------------------------------------
    def set_migration(self, status: str, error: str | None = None) -> None:
        self.migration = {"status": status, **({"error-desc": error} if error else {})}
        self.event("MIGRATION", {"status": status})

    def migrate(self, cmd: str, args: dict) -> object:
        """The migration commands; None for any other."""
        if cmd in ("migrate-set-capabilities", "migrate-set-parameters"):
            return {}
        if cmd == "query-migrate":
            return dict(self.migration)
        if cmd in ("migrate", "migrate-incoming"):
            uri = str(args.get("uri", ""))
            if not uri.startswith("fd:") or uri[3:] not in self.named_fds:
                raise QmpError(f"File descriptor named '{uri[3:]}' has not been found")
            if cmd == "migrate-incoming" and self.status != "inmigrate":
                raise QmpError("The command migrate-incoming does not support state: not in incoming mode")
            if self.migration["status"] in ("setup", "active"):
                raise QmpError("There's a migration process in progress")
            fd = self.named_fds.pop(uri[3:])
            self.set_migration("setup")
            work = self.save_to if cmd == "migrate" else self.load_from
            threading.Thread(target=work, args=(fd,), daemon=True).start()
            return {}
        if cmd == "migrate_cancel":
            if self.migration["status"] in ("setup", "active"):
                self.set_migration("cancelled")
            return {}
        return None

    def save_to(self, fd: int) -> None:
        self.set_migration("active")
        time.sleep(float(os.environ.get("FAKE_QEMU_MIGRATE_DELAY", "0.05")))
        with self.state:
            if self.migration["status"] != "active":  # cancelled meanwhile
                os.close(fd)
                return
            record = json.dumps({"devices": sorted(self.devices), "status": self.status}).encode()
            try:
                data = memoryview(FAKE_STATE + record + b"\n" + bytes(1024 * 1024))
                while data:  # a full disk first takes a short write, then says ENOSPC
                    data = data[os.write(fd, data) :]
            except OSError as e:
                self.set_migration("failed", f"Unable to write to file: {e.strerror}")
                return
            finally:
                os.close(fd)
            self.status = "postmigrate"
            self.set_migration("completed")

    def load_from(self, fd: int) -> None:
        self.set_migration("active")
        time.sleep(float(os.environ.get("FAKE_QEMU_MIGRATE_DELAY", "0.05")))
        with os.fdopen(fd, "rb") as f:
            data = f.read(len(FAKE_STATE) + 4096)
        if not data.startswith(FAKE_STATE):
            self.set_migration("failed", "load of migration failed: Invalid argument")
            sys.stderr.write("qemu-system-x86_64: load of migration failed: Invalid argument\n")
            sys.stderr.flush()
            os._exit(1)
        with self.state:
            self.status = "paused"
            self.set_migration("completed")

    def pci_devices(self) -> list[dict]:
        out = []
        ports = [d for d, o in self.devices.items() if o["driver"] == "pcie-root-port"]
        for n, port in enumerate(ports, start=1):
            behind = [
                {"bus": n, "slot": 0, "function": 0, "class_info": {"class": 256, "desc": "SCSI controller"},
                 "id": {"device": 4162, "vendor": 6900}, "qdev_id": d, "regions": []}
                for d in self.devices if self.port_of(d) == port
            ]  # fmt: skip
            addr = self.devices[port].get("addr", "0x10.0x0").split(".")
            out.append(
                {
                    "bus": 0,
                    "slot": int(addr[0], 16),
                    "function": int(addr[1], 16) if len(addr) > 1 else 0,
                    "class_info": {"class": 1540, "desc": "PCI bridge"},
                    "id": {"device": 12, "vendor": 6966},
                    "qdev_id": port,
                    "regions": [],
                    "pci_bridge": {"bus": {"number": n, "secondary": n, "subordinate": n}, "devices": behind},
                }
            )
        return out

    @staticmethod
    def flatten(args: dict, prefix: str = "") -> dict:
        flat: dict = {}
        for k, v in args.items():
            if isinstance(v, dict):
                flat.update(Fake.flatten(v, f"{prefix}{k}."))
            elif isinstance(v, bool):
                flat[prefix + k] = "on" if v else "off"
            else:
                flat[prefix + k] = str(v)
        return flat

    def inherited(self) -> set[int]:
        return {int(parse_opts(a)["fd"]) for i, a in enumerate(self.argv) if self.argv[i - 1] == "-add-fd"}

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
            for req in json_stream(conn, self.passed_fds):
                reply: dict = {}
                try:
                    with self.state:  # an unplug thread may be changing the devices
                        reply["return"] = self.handle(req["execute"], req.get("arguments", {}))
                except QmpError as e:
                    reply["error"] = {"class": e.cls, "desc": str(e)}
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
