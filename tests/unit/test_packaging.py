"""The shipped systemd unit and install script say what the design relies on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "systemd" / "vmkit.service"


def test_unit_never_stops_vms(tmp_path: Path) -> None:
    lines = UNIT.read_text().splitlines()
    # Only the daemon process is signalled on stop/restart; QEMUs in its cgroup keep running.
    assert "KillMode=process" in lines
    assert any(line.startswith("ExecStart=") and line.endswith("vmkit daemon") for line in lines)
    if shutil.which("systemd-analyze"):
        # As scripts/demo.sh installs it: ExecStart pointing at this checkout's vmkit (verify checks it exists).
        vmkit = ROOT / ".venv" / "bin" / "vmkit"
        unit = tmp_path / "vmkit.service"
        unit.write_text(
            "\n".join(f"ExecStart={vmkit} daemon" if line.startswith("ExecStart=") else line for line in lines) + "\n"
        )
        res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
        assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_install_script_installs_what_the_code_runs() -> None:
    script = (ROOT / "scripts" / "install-deps.sh").read_text()
    for package in (
        "qemu-system-x86",
        "qemu-utils",
        "qemu-guest-agent",
        "busybox-static",
        "kmod",
        "cpio",
        "util-linux",
        "debootstrap",
    ):
        assert package in script
