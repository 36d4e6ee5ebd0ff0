"""The host's own CPU, memory and disk use, as the web UI's dashboard shows them (read from /proc and statvfs).

CPU time is given as counters (like /proc/stat): a client takes two readings and divides, so no sampler runs.
"""

from __future__ import annotations

import os
from typing import Any


def parse_cpu(stat_text: str) -> tuple[int, int]:
    """(busy, total) clock ticks from /proc/stat's first line; idle and iowait are not busy."""
    fields = [int(x) for x in stat_text.splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return total - idle, total


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def usage(state_dir: str | None) -> dict[str, Any]:
    with open("/proc/stat") as f:
        busy, total = parse_cpu(f.read())
    with open("/proc/meminfo") as f:
        mem_total, mem_available = parse_meminfo(f.read())
    disk: dict[str, Any] | None = None
    if state_dir:
        st = os.statvfs(state_dir)
        disk = {
            "path": state_dir,
            "total_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
        }
    return {
        "cpus": os.cpu_count() or 1,
        "cpu_busy_ticks": busy,
        "cpu_total_ticks": total,
        "load_avg": list(os.getloadavg()),
        "memory_total_bytes": mem_total,
        "memory_available_bytes": mem_available,
        "disk": disk,
    }
