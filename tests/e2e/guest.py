"""Helpers for e2e tests that boot the demo guest through the daemon."""

from __future__ import annotations

import json
import time

from tests.conftest import Daemon


def boot(d: Daemon, name: str, *create_args: str, wait: bool = True) -> dict:
    """Create NAME from the demo image (256 MiB, plus create_args), start it, and by default wait for READY.
    Returns the VM as `vm start` printed it."""
    d.cli("vm", "create", name, "--image", "demo", "--memory", "256", *create_args)
    vm = json.loads(d.cli("vm", "start", name, "--json").stdout)
    if wait:
        wait_ready(d, name)
    return vm


def wait_ready(d: Daemon, name: str, count: int = 1, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if d.cli("vm", "log", name).stdout.count("VMKIT-DEMO-READY") >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name}: no VMKIT-DEMO-READY on serial: {d.cli('vm', 'log', name).stdout[-1500:]}")
