"""The shipped systemd unit and install script say what the design relies on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "systemd" / "vmkit.service"


def test_unit_never_stops_vms() -> None:
    lines = UNIT.read_text().splitlines()
    # Only the daemon process is signalled on stop/restart; QEMUs in its cgroup keep running.
    assert "KillMode=process" in lines
    assert any(line.startswith("ExecStart=") and line.endswith("vmkit daemon") for line in lines)
    if shutil.which("systemd-analyze"):
        res = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, check=False)
        assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_install_script_installs_what_the_code_runs() -> None:
    script = (ROOT / "scripts" / "install-deps.sh").read_text()
    for package in ("qemu-system-x86", "qemu-utils", "qemu-guest-agent", "busybox-static", "kmod", "cpio"):
        assert package in script
