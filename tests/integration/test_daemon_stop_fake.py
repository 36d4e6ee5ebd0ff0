"""Stopping the daemon (SIGTERM) while requests are still waiting for an answer."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import FAKE_QEMU, Daemon
from vmkit.cli.client import ApiError, Client


def _in_flight(d: Daemon, method: str, url: str, body: Any = None) -> tuple[threading.Thread, dict[str, Any]]:
    """Send a request from a thread and return once the daemon is serving it."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["answer"] = Client(str(d.socket), timeout_s=60).request(method, url, body)
        except ApiError as e:
            out["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    time.sleep(0.3)
    d.api.get("/v1")  # accepted after the request above, so that one is being served by now
    assert "answer" not in out and "error" not in out, out
    return t, out


def _sigterm(d: Daemon) -> float:
    """Stop the daemon; returns how long it took to exit (it must exit 0)."""
    assert d.proc is not None
    proc, d.proc = d.proc, None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    return time.monotonic() - t0


def _log(d: Daemon) -> str:
    return (d.root / "daemon.log").read_text(errors="replace")


def test_sigterm_ends_a_waiting_request_at_once(fake_daemon: Daemon) -> None:
    d = fake_daemon
    d.cli("vm", "create", "w", "--memory", "64")
    d.cli("vm", "start", "w")
    t, out = _in_flight(d, "GET", "/v1/vms/w/wait?state=paused&timeout_s=60")
    took = _sigterm(d)
    t.join(5)
    # Well inside uvicorn's 3 s grace period: the wait is ended, not waited for and then cancelled.
    assert took < 2.5, took
    assert out["error"].status == 503 and "stopping" in out["error"].message, out
    assert "Traceback" not in _log(d), _log(d)[-3000:]
    d.start()
    assert d.vm("w")["state"] == "running"  # stopping the daemon never stops a VM


def test_sigterm_cuts_a_long_request_short_after_the_grace_period(tmp_path: Path) -> None:
    # A guest that ignores ACPI: `shutdown` waits its whole timeout, and it is not a mere wait (it is not ended
    # at once), so the daemon's grace period runs out and the request is cancelled: still no traceback.
    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "FAKE_QEMU_IGNORE_ACPI": "1"})
    d.start()
    try:
        d.cli("vm", "create", "s", "--memory", "64")
        d.cli("vm", "start", "s")
        t, out = _in_flight(d, "POST", "/v1/vms/s/shutdown", {"timeout_s": 60})
        took = _sigterm(d)
        t.join(5)
        assert took < 6, took
        assert out["error"].status == 503 and "stopping" in out["error"].message, out
        assert "Traceback" not in _log(d), _log(d)[-3000:]
    finally:
        d.cleanup()
