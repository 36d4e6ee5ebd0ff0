"""Turn the argv vmkit recorded for a VM (RUN/vms/NAME/argv.json) into one plain QEMU can run by itself.

vmkit hands QEMU descriptors (-add-fd, chardev fd=N, /proc/self/fd/N); a plain QEMU started by a benchmark
gets the same options with paths instead, its own sockets and serial log in `work`, its own overlay on the
same base image (the VM's disk is never touched), and no -S (nothing will `cont`). Everything else —
machine, devices, sandbox, memory, the disk graph — is byte for byte what vmkit ran.
"""

from __future__ import annotations

import contextlib
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmkit.storage.qcow2 import backing_chain


def plain_argv(argv: list[str], vm: dict[str, Any], work: Path) -> tuple[list[str], socket.socket]:
    """(argv for plain QEMU, the listening QMP socket it must inherit). vm is GET /v1/vms/NAME."""
    work.mkdir(parents=True, exist_ok=True)
    qmp_path = work / "qmp.sock"
    qmp_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(qmp_path))
    listener.listen(16)
    sets = {}  # fdset number -> the file vmkit had opened for it
    for i, a in enumerate(argv):
        if argv[i - 1] == "-add-fd":
            opts = dict(kv.split("=", 1) for kv in a.split(","))
            sets[opts["set"]] = opts["opaque"]
    files: dict[str, str] = {"serial-log": str(work / "serial.log")}
    for n, disk in enumerate(vm["disks"]):
        chain = backing_chain(disk["path"], disk["format"])
        for j, b in enumerate(chain, start=1):
            files[f"disk{n}-b{j}"] = b.path
        overlay = work / f"disk{n}.qcow2"
        overlay.unlink(missing_ok=True)
        base = ["-b", chain[0].path, "-F", chain[0].format] if chain else []
        size = [] if chain else ["1G"]
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *base, str(overlay), *size], check=True)  # noqa: S603
        files[f"disk{n}"] = str(overlay)
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-S", "-add-fd"):
            skip = a == "-add-fd"
            continue
        if out and out[-1] == "-kernel":
            a = vm["kernel"]
        elif out and out[-1] == "-initrd":
            a = vm["initrd"]
        elif a.startswith("socket,id=mon0,"):
            a = f"socket,id=mon0,fd={listener.fileno()},server=on,wait=off"
        elif a.startswith(("socket,id=serial0,", "socket,id=qga0,")):
            name = "serial" if "serial0" in a else "qga"
            a = re.sub(r"fd=\d+", f"path={work}/{name}.sock", a)
        a = re.sub(r"/dev/fdset/(\d+)", lambda m: files[sets[m.group(1)]], a)
        out.append(a)
    return out, listener


def wait_running(qmp_sock: Path, proc: subprocess.Popen[bytes]) -> None:
    """Return once a plain QEMU (started by plain_argv's argv) is running. The greeting comes from QEMU's monitor
    thread before the machine is built: "running" is when query-status (answered by the main loop) says so, as
    vmkit's `cont` returning is for vmkit."""
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(qmp_sock))
        f = c.makefile("rw")
        f.readline()
        f.write('{"execute":"qmp_capabilities"}\n')
        f.flush()
        f.readline()
        while True:
            f.write('{"execute":"query-status"}\n')
            f.flush()
            line = f.readline()
            if not line:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"plain QEMU ended: {err}")
            if '"running"' in line:
                f.close()
                return


def table(title: str, head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """A bench's table: left-aligned columns under a title."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    print(f"\n{title}")
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


READY = b"VMKIT-DEMO-READY"


def med(values: list[float]) -> float:
    return statistics.median(values)


def stats(values: list[float], unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
    """median (min, max) of values, scaled, for a table cell; "-" for none."""
    if not values:
        return "-"
    v = [x * scale for x in values]
    return f"{med(v):.{digits}f} {unit} (min {min(v):.{digits}f}, max {max(v):.{digits}f})"


def own(vmkit: list[float], plain: list[float]) -> str:
    """vmkit's median minus plain QEMU's: vmkit's own time."""
    return f"{med(vmkit) - med(plain):+.3f} s" if vmkit and plain else ""


def wait_ready(log: Path, timeout_s: float = 120) -> None:
    """Until the demo guest's serial log says READY (a start truncates the log first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if READY in log.read_bytes():
                return
        time.sleep(0.01)
    raise TimeoutError(f"{READY!r} not seen in {log}")
