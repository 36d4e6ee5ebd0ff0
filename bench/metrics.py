#!/usr/bin/env python3
"""Stats figures: what `GET /metrics` costs with 50 VMs defined, and what one sampling round costs as VMs run.

A daemon of its own gets 50 VMs (45 idle definitions, 5 demo guests); the sampler's cost is read with 0, 1 and
5 of them running, each over `--rounds` rounds: wall time of a round and the event loop's CPU time in it (the
daemon's own vmkit_stats_* counters; nothing else asks the daemon anything meanwhile). Then
`GET /metrics` is timed over the UNIX socket, as a client sees it. Prints a table; never fails on timing.
Run as root: `make bench` (or .venv/bin/python bench/metrics.py). `--fake` runs the fake QEMU instead of demo
guests (no image build; QMP answers from a Python script, no vCPU threads).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.conftest import FAKE_QEMU, Daemon  # noqa: E402 - the same daemon harness the tests use

READY = b"VMKIT-DEMO-READY"
TARGET_METRICS_S = 0.050


def sampler(d: Daemon) -> dict[str, float]:
    text = d.api.get("/metrics", raw=True).decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("vmkit_stats_")
        for s in f.samples
    }


def wait_ready(d: Daemon, name: str, timeout_s: float = 180) -> None:
    log = d.state_dir / "vms" / name / "serial.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and READY in log.read_bytes():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name}: no {READY!r} on serial")


def measure_rounds(d: Daemon, rounds: int) -> tuple[float, float]:
    """(wall time, event-loop CPU time) of the mean round over `rounds` rounds, from the sampler's own counters."""
    before = sampler(d)
    time.sleep(rounds * before["vmkit_stats_interval_seconds"])
    after = sampler(d)
    n = after["vmkit_stats_rounds_total"] - before["vmkit_stats_rounds_total"]
    wall = after["vmkit_stats_round_seconds_total"] - before["vmkit_stats_round_seconds_total"]
    cpu = after["vmkit_stats_round_cpu_seconds_total"] - before["vmkit_stats_round_cpu_seconds_total"]
    return wall / n, cpu / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--defined", type=int, default=50)
    ap.add_argument("--running", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10, help="sampling rounds per measurement (2 s each)")
    ap.add_argument("--calls", type=int, default=50, help="GET /metrics calls timed")
    ap.add_argument("--fake", action="store_true", help="run fake QEMUs instead of demo guests")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmkit-bench-"))
    d = Daemon(root, {"VMKIT_QEMU": str(FAKE_QEMU)} if args.fake else None)
    d.start()
    rows: list[tuple[str, str]] = []
    try:
        if not args.fake:
            d.cli("image", "demo", timeout_s=900)
        running = [f"run{i}" for i in range(args.running)]
        for name in running:
            body: dict[str, object] = {"name": name, "memory_mib": 256}
            if not args.fake:
                body["image"] = "demo"
            d.api.post("/v1/vms", body)
        for i in range(args.defined - args.running):
            d.api.post("/v1/vms", {"name": f"idle{i:02d}", "memory_mib": 64})
        steps = sorted({0, min(1, args.running), args.running})
        started = 0
        per_round: list[tuple[int, float, float]] = []
        for k in steps:
            for name in running[started:k]:
                d.api.post(f"/v1/vms/{name}/start")
                if not args.fake:
                    wait_ready(d, name)
            started = k
            time.sleep(2)  # let the last boot settle
            wall, cpu = measure_rounds(d, args.rounds)
            per_round.append((k, wall, cpu))
            rows.append(
                (f"sampling round, {k} of {args.defined} running", f"{wall * 1e3:.2f} ms wall, {cpu * 1e3:.2f} ms CPU")
            )
        if len(per_round) >= 2 and per_round[-1][0] > 0:
            (k0, w0, c0), (k1, w1, c1) = per_round[0], per_round[-1]
            rows.append(
                (
                    "… per running VM",
                    f"{(w1 - w0) / (k1 - k0) * 1e3:.2f} ms wall, {(c1 - c0) / (k1 - k0) * 1e3:.2f} ms CPU",
                )
            )
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            body_bytes = d.api.get("/metrics", raw=True)
            times.append(time.perf_counter() - t0)
        series = sum(1 for line in body_bytes.decode().splitlines() if line and not line.startswith("#"))
        rows.append(
            (
                f"GET /metrics, {args.defined} defined, {args.running} running",
                f"{statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}; "
                f"{len(body_bytes)} bytes, {series} series; target <= {TARGET_METRICS_S * 1e3:.0f} ms)",
            )
        )
        t0 = time.perf_counter()
        hist = d.api.get(f"/v1/vms/{running[-1]}/stats") if running else {"samples": []}
        rows.append(
            (
                "GET /v1/vms/NAME/stats",
                f"{(time.perf_counter() - t0) * 1e3:.1f} ms ({len(hist['samples'])} samples)",
            )
        )
    finally:
        d.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    kind = "fake QEMU" if args.fake else "demo guests under TCG"
    print(f"stats: {args.defined} VMs defined, up to {args.running} running ({kind}), {args.rounds} rounds each")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
