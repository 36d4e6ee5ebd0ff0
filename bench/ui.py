#!/usr/bin/env python3
"""Web UI figures: first paint and first VM row of the UI with 200 VMs defined, and the VM list API behind it.

A daemon of its own (fake QEMU: only definitions matter here) gets 200 VMs and a TCP listener on loopback; headless
Chromium (Debian's, through Playwright) logs in once, then each run opens a fresh page of the dashboard and of the
VM list and reads `first-contentful-paint` from the browser's Performance API and the time until the VM counts
(dashboard) or the first VM row (list) is in the page, from navigation start. `GET /v1/vms` is timed over TCP
with a token, as the page asks it. Prints a table; never fails on timing. Run as root: `make bench`.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.ui.conftest import CHROMIUM, DESKTOP, listening_daemon, token  # noqa: E402
from vmkit.cli.client import Client  # noqa: E402

VMS = 200
RUNS = 7
TARGET_PAINT_S = 1.0


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="vmkit-bench-ui-"))
    d = listening_daemon(root)
    try:
        for i in range(VMS):
            d.api.post("/v1/vms", {"name": f"vm{i:03d}", "memory_mib": 64, "nic": False})
        secret = token(d, "bench")
        url: str = d.url  # type: ignore[attr-defined]
        remote = Client(url=url, token=secret, timeout_s=30)
        api_s = []
        for _ in range(30):
            t0 = time.perf_counter()
            assert len(remote.get("/v1/vms")) == VMS
            api_s.append(time.perf_counter() - t0)
        figures: dict[str, list[tuple[float, float]]] = {"dashboard": [], "VM list": []}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            ctx = browser.new_context(viewport=DESKTOP)
            assert ctx.request.post(url + "/v1/session", data={"token": secret}).ok
            for _ in range(RUNS):
                for label, route, ready in (
                    ("dashboard", "#/", "[data-state-count='shut off']"),
                    ("VM list", "#/vms", "tr[data-vm]"),
                ):
                    page = ctx.new_page()
                    page.goto(f"{url}/ui/{route}")
                    page.wait_for_selector(ready)
                    fcp, ready_ms = page.evaluate(
                        """() => [performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? NaN,
                                  performance.now()]"""
                    )
                    figures[label].append((fcp / 1000, ready_ms / 1000))
                    page.close()
            browser.close()
        print(f"web UI with {VMS} VMs defined (fake QEMU), headless Chromium, median of {RUNS} fresh page loads")
        print(f"{'page':<12} {'first paint':>12} {'VMs shown':>12}")
        for label, runs in figures.items():
            fcp = statistics.median(r[0] for r in runs)
            shown = statistics.median(r[1] for r in runs)
            print(f"{label:<12} {fcp * 1000:>9.0f} ms {shown * 1000:>9.0f} ms")
        worst = max(statistics.median(r[1] for r in runs) for runs in figures.values())
        verdict = "within" if worst <= TARGET_PAINT_S else "OVER"
        print(f"target: VMs shown within {TARGET_PAINT_S * 1000:.0f} ms: {verdict}")
        print(f"GET /v1/vms ({VMS} VMs) over TCP with a token: median {statistics.median(api_s) * 1000:.1f} ms, "
              f"max {max(api_s) * 1000:.1f} ms ({len(api_s)} requests)")  # fmt: skip
    finally:
        d.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
