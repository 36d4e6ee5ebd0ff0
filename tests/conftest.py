"""Shared fixtures: a real vmkit daemon process in private dirs, driven through its CLI and API."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkit.cli.client import ApiError, Client

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("VMKIT_TEST_CACHE", "/var/cache/vmkit-test"))
# Per test session: the fake QEMU runs as a VM's unprivileged uid, which cannot reach a checkout in a
# root-only directory (CI clones into one), so it runs from a copy anyone may read; and test daemons record
# their id ranges here rather than in the host's registry.
_SESSION = Path(tempfile.mkdtemp(prefix="vmkit-test-"))
_SESSION.chmod(0o755)
atexit.register(shutil.rmtree, _SESSION, True)
FAKE_QEMU = _SESSION / "fake_qemu.py"
shutil.copy(ROOT / "tests" / "fakes" / "fake_qemu.py", FAKE_QEMU)
FAKE_QEMU.chmod(0o755)
ID_REGISTRY = _SESSION / "id-ranges"
# Test daemons put their VMs' cgroups under a parent of their own, removed when the session ends (a QEMU a
# test kills while its daemon is down leaves an empty cgroup that no daemon comes back to clean).
CGROUP_PARENT = f"vmkit-test-{os.getpid()}"


def _remove_test_cgroups() -> None:
    from vmkit.host.cgroups import Cgroups

    cgroups = Cgroups.detect(parent=CGROUP_PARENT)
    for name in cgroups.names():
        with contextlib.suppress(Exception):
            cgroups.remove(name)
    with contextlib.suppress(Exception):
        cgroups.remove_parent()


atexit.register(_remove_test_cgroups)
_daemons = itertools.count()


def unique_id_range(size: int = 256) -> str:
    """An id range no other test daemon (of this or a parallel session) is using."""
    # 1024 daemons per session (a test suite starts ~100), 256 sessions side by side; below 2**31.
    first = 1_950_000_000 + ((os.getpid() % 256) * 1024 + next(_daemons) % 1024) * size
    return f"{first}:{size}"


class Daemon:
    """One daemon with its own state dir, run dir and socket; restartable and killable."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, *, netns: str | None = None) -> None:
        self.root = root
        # A daemon in a network namespace of the test's (tests/netns.py) builds its bridges, taps, dnsmasq and
        # nftables tables there; one outside makes no network at all (no `default` on the host's namespace).
        self.netns = netns
        self.state_dir = root / "state"
        self.run_dir = root / "run"
        self.socket = root / "run" / "vmkit.sock"
        self.env = {
            **os.environ,
            "VMKIT_STATE_DIR": str(self.state_dir),
            "VMKIT_RUN_DIR": str(self.run_dir),
            "VMKIT_SOCKET": str(self.socket),
            "VMKIT_CACHE_DIR": str(CACHE_DIR),
            "VMKIT_ID_RANGE": unique_id_range(),
            "VMKIT_ID_REGISTRY": str(ID_REGISTRY),
            "VMKIT_CGROUP_PARENT": CGROUP_PARENT,
            "VMKIT_DEFAULT_NETWORK": "off",
            **(env or {}),
        }
        self.socket = Path(self.env["VMKIT_SOCKET"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = Client(str(self.socket), timeout_s=120)

    def start(self, timeout_s: float = 20.0) -> None:
        log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "vmkit", "daemon", "-v"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {(self.root / 'daemon.log').read_text()[-2000:]}")
            with contextlib.suppress(ApiError, OSError):
                self.api.get("/v1")
                return
            time.sleep(0.05)
        raise RuntimeError("daemon did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    @contextlib.contextmanager
    def dying_at(self, step: str) -> Iterator[None]:
        """Restart the daemon so that it kills itself (-9) at crash point `step` (VMKIT_CRASH_AT, see
        vmkit/util/crash.py), which the block must make it reach; then start it again, to finish or undo."""
        self.stop()
        self.env["VMKIT_CRASH_AT"] = step
        self.start()
        try:
            yield
            assert self.proc is not None
            self.proc.wait(10)
            self.proc = None
        finally:
            del self.env["VMKIT_CRASH_AT"]
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def cli(
        self, *args: str, check: bool = True, timeout_s: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "vmkit", *args],
            env=self.env,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"vmkit {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def vm(self, name: str) -> dict[str, Any]:
        return self.api.get(f"/v1/vms/{name}")  # type: ignore[no-any-return]

    def wait_state(self, name: str, state: str, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            vm = self.vm(name)
            if vm["state"] == state or time.monotonic() > deadline:
                return vm
            time.sleep(0.02)

    def qemu_pids(self) -> list[int]:
        """Every process started for this daemon (its QEMUs, real or fake), found from /proc so a test that
        removed a pid file cannot leak one. QEMU is handed descriptors, not paths, so its command line
        names none of the daemon's dirs; it inherits the daemon's environment, which does."""
        root = str(self.root).encode()
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError):
                if int(proc.name) != os.getpid() and (
                    root in (proc / "cmdline").read_bytes() or root in (proc / "environ").read_bytes()
                ):
                    pids.append(int(proc.name))
        return pids

    def cleanup(self) -> None:
        self.stop()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose 'QEMU' is tests/fakes/fake_qemu.py."""
    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU)})
    d.start()
    try:
        yield d
    finally:
        d.cleanup()
