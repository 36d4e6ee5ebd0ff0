#!/usr/bin/env python3
"""Lifecycle figures for the demo guest, next to plain QEMU started with the same argv.

Prints a table; never fails on timing. Run as root: `make bench` (or .venv/bin/python bench/lifecycle.py).
It starts its own daemon in a temporary directory and removes everything it made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import plain_argv, wait_running  # noqa: E402
from tests.conftest import Daemon  # noqa: E402 - the same daemon harness the tests use

READY = b"VMKIT-DEMO-READY"
# libvirt 9.0 on this machine with the same guest (from the issue), for scale.
LIBVIRT = {
    "start call -> QEMU running": "0.32 s",
    "start call -> READY (minus plain QEMU)": "+0.45 s",  # paired per run
    "hard stop": "1.63 s",
    "create": "0.018 s",
    "CLI list, 200 VMs defined": "0.035 s (virsh)",
    "daemon RSS, 200 VMs defined": "26 MB",
}
TARGET = {
    "start call -> QEMU running": "<= 0.08 s",
    "start call -> READY (minus plain QEMU)": "<= +0.05 s",
    "hard stop": "<= 0.1 s",
    "create": "<= 0.02 s",
    "CLI list, 200 VMs defined": "<= 0.05 s",
    "daemon RSS, 200 VMs defined": "<= 40 MB",
}


def wait_for(path: Path, needle: bytes, timeout_s: float = 120) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if needle in path.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{needle!r} not seen in {path}")


def plain_qemu(argv: list[str], vm: dict, work: Path) -> tuple[float, float]:
    """Run the argv vmkit used (see replay.py: paths for descriptors, no -S), QMP on a pre-opened socket like
    vmkit's. Returns (spawn -> QEMU running, spawn -> READY)."""
    out, sock = plain_argv(argv, vm, work)
    log = work / "serial.log"
    log.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(out, pass_fds=[sock.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    sock.close()
    wait_running(work / "qmp.sock", proc)
    running = time.monotonic() - t0
    ready = wait_for(log, READY) - t0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return running, ready


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fmt(values: list[float], unit: str = "s") -> str:
    if unit == "MB":
        return f"{statistics.median(values):.1f} MB"
    return f"{statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--list-vms", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmkit-bench-"))
    d = Daemon(root)
    d.start()
    res: dict[str, list[float]] = {k: [] for k in TARGET}
    plain_running: list[float] = []
    plain_ready: list[float] = []
    vm_ready: list[float] = []
    try:
        d.cli("image", "demo", timeout_s=900)
        for i in range(args.runs):
            name = f"bench{i}"
            res["create"].append(
                timed(lambda n=name: d.api.post("/v1/vms", {"name": n, "image": "demo", "memory_mib": 256}))
            )
            log = d.state_dir / "vms" / name / "serial.log"
            t0 = time.monotonic()
            d.api.post(f"/v1/vms/{name}/start")
            res["start call -> QEMU running"].append(time.monotonic() - t0)
            vm_ready.append(wait_for(log, READY) - t0)
            argv = json.loads((d.run_dir / "vms" / name / "argv.json").read_text())
            vm = d.vm(name)
            res["hard stop"].append(timed(lambda n=name: d.api.post(f"/v1/vms/{n}/destroy")))
            pr, prdy = plain_qemu(argv, vm, root / "plain")
            plain_running.append(pr)
            plain_ready.append(prdy)
        # Runs alternate vmkit / plain QEMU, so each pair shares the machine's load at that moment.
        res["start call -> READY (minus plain QEMU)"] = [a - b for a, b in zip(vm_ready, plain_ready, strict=True)]
        for i in range(args.list_vms - args.runs):
            d.api.post("/v1/vms", {"name": f"idle{i:03d}", "memory_mib": 64})
        vmkit = Path(sys.executable).parent / "vmkit"
        cli = [str(vmkit)] if vmkit.exists() else [sys.executable, "-m", "vmkit"]
        for _ in range(max(args.runs, 10)):
            res["CLI list, 200 VMs defined"].append(
                timed(lambda: subprocess.run([*cli, "vm", "list"], env=d.env, capture_output=True, check=True))  # noqa: S603
            )
        assert d.proc is not None
        res["daemon RSS, 200 VMs defined"].append(rss_mb(d.proc.pid))
    finally:
        d.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("plain QEMU: spawn -> running", fmt(plain_running), "", ""),
        ("plain QEMU: spawn -> READY", fmt(plain_ready), "", ""),
        ("vmkit: start call -> READY", fmt(vm_ready), "", ""),
        (
            "READY: vmkit median - plain median",
            f"{statistics.median(vm_ready) - statistics.median(plain_ready):+.3f} s",
            "<= +0.05 s",
            "+0.45 s",
        ),
    ]
    for key, values in res.items():
        rows.append((key, fmt(values, "MB" if "RSS" in key else "s"), TARGET[key], LIBVIRT[key]))
    if args.json:
        print(json.dumps({k: v for k, v in res.items()} | {"plain_running": plain_running, "plain_ready": plain_ready}))
        return
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("figure", "vmkit (median)", "target", "libvirt 9.0")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    print(f"demo guest, accelerator {os.environ.get('VMKIT_ACCEL', 'tcg')}, {args.runs} runs")
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
