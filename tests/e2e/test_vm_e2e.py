"""End to end: the real daemon drives real QEMU (TCG here) booting the demo guest."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.e2e.guest import boot, wait_ready
from vmkit.cli.client import ApiError

pytestmark = pytest.mark.e2e


def _exec(d: Daemon, name: str, *cmd: str) -> dict:
    res = d.cli("vm", "exec", name, "--json", "--", *cmd, check=False)
    assert res.stdout, res.stderr
    return json.loads(res.stdout)


def test_lifecycle(daemon: Daemon) -> None:
    d = daemon
    image = d.api.get("/v1/images/demo")
    vm = boot(d, "life")
    assert vm["state"] == "running"
    d.cli("vm", "wait", "life", "--for", "agent", "--timeout", "60")
    res = d.cli("vm", "exec", "life", "--", "uname", "-r")
    assert res.stdout.strip() == image["kernel_version"]
    assert d.cli("vm", "exec", "life", "--stdin", "--", "tr", "a-z", "A-Z", stdin="piped in\n").stdout == "PIPED IN\n"
    # The guest's exit status becomes the CLI's.
    assert d.cli("vm", "exec", "life", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert json.loads(d.cli("vm", "pause", "life", "--json").stdout)["state"] == "paused"
    assert d.vm("life")["state"] == "paused"
    assert json.loads(d.cli("vm", "resume", "life", "--json").stdout)["state"] == "running"
    assert _exec(d, "life", "echo", "after-resume")["stdout"] == "after-resume\n"
    # The NIC got its address from QEMU's restricted user-mode DHCP.
    deadline = time.monotonic() + 30
    while "10.0.2.15" not in (addr := _exec(d, "life", "ip", "-4", "addr", "show", "eth0")["stdout"]):
        assert time.monotonic() < deadline, addr
        time.sleep(0.5)
    out = json.loads(d.cli("vm", "shutdown", "life", "--timeout", "60", "--json").stdout)
    assert (out["state"], out["reason"]) == ("shut off", "shutdown")
    assert out["pid"] is None


def test_disk_is_an_overlay_never_the_image(daemon: Daemon) -> None:
    d = daemon
    image = d.api.get("/v1/images/demo")
    before = hashlib.sha256(Path(image["disk"]).read_bytes()).hexdigest()
    vm = boot(d, "ovl")
    d.cli("vm", "wait", "ovl", "--for", "agent")
    disk = vm["disks"][0]["path"]
    assert disk != image["disk"] and Path(disk).is_relative_to(d.state_dir / "pools" / "default")
    assert vm["disks"][0]["volume"] == "default/ovl-disk0.qcow2"
    res = _exec(d, "ovl", "sh", "-c", "echo vmkit-was-here | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; "
                "dd if=/dev/vda bs=16 count=1 2>/dev/null")  # fmt: skip
    assert res["stdout"].startswith("vmkit-was-here"), res
    d.cli("vm", "stop", "ovl", "--force")
    assert hashlib.sha256(Path(image["disk"]).read_bytes()).hexdigest() == before
    d.cli("vm", "delete", "ovl")
    assert not Path(disk).exists()


def test_reboot_and_console(daemon: Daemon) -> None:
    from websockets.sync.client import unix_connect

    d = daemon
    pid = boot(d, "rb")["pid"]
    with unix_connect(str(d.socket), "ws://localhost/v1/vms/rb/console") as ws:
        ws.send(b"\necho con-$((40+2))\n")
        got = b""
        deadline = time.monotonic() + 20
        while b"con-42" not in got and time.monotonic() < deadline:
            got += ws.recv(timeout=20)
        assert b"con-42" in got
        # One console at a time.
        res = d.cli("vm", "console", "rb", check=False)
        assert res.returncode != 0 and "already in use" in res.stderr
    _cli_console_in_a_pty(d, "rb")
    d.cli("vm", "reboot", "rb")
    wait_ready(d, "rb", count=2)
    vm = d.vm("rb")
    assert vm["state"] == "running" and vm["pid"] == pid  # rebooted inside the same QEMU
    d.cli("vm", "stop", "rb", "--force")


def _cli_console_in_a_pty(d: Daemon, name: str) -> None:
    """`vmkit vm console` as a person uses it: a terminal, a command typed, Ctrl-] to leave."""
    import pty
    import select
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkit", "vm", "console", name], stdin=slave, stdout=slave, stderr=slave, env=d.env
    )
    os.close(slave)
    got = b""
    try:
        deadline = time.monotonic() + 20
        sent = False
        while b"pty-42" not in got and time.monotonic() < deadline:
            if not sent and b"escape character" in got:
                os.write(master, b"echo pty-$((6*7))\r")
                sent = True
            if select.select([master], [], [], 0.5)[0]:
                got += os.read(master, 4096)
        assert b"pty-42" in got, got
        os.write(master, b"\x1d")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_daemon_killed_vms_survive_and_crash_is_noticed(daemon: Daemon) -> None:
    d = daemon
    names = ["s1", "s2", "s3"]
    pids = {n: boot(d, n, wait=False)["pid"] for n in names}
    for n in names:
        wait_ready(d, n)
    d.kill9()
    for pid in pids.values():
        os.kill(pid, 0)
    d.start()
    listed = {v["name"]: v for v in d.api.get("/v1/vms") if v["name"] in names}
    assert {n: v["state"] for n, v in listed.items()} == dict.fromkeys(names, "running")
    assert {n: v["pid"] for n, v in listed.items()} == pids
    # Still controllable after re-attach.
    d.cli("vm", "wait", "s1", "--for", "agent")
    assert _exec(d, "s1", "echo", "still-here")["stdout"] == "still-here\n"
    assert json.loads(d.cli("vm", "pause", "s2", "--json").stdout)["state"] == "paused"
    assert json.loads(d.cli("vm", "resume", "s2", "--json").stdout)["state"] == "running"
    # A QEMU killed while the daemon runs is shown crashed within a second.
    os.kill(pids["s3"], signal.SIGKILL)
    t0 = time.monotonic()
    vm = d.wait_state("s3", "crashed", 1.0)
    assert vm["state"] == "crashed", vm
    assert time.monotonic() - t0 <= 1.0
    for n in ("s1", "s2"):
        d.cli("vm", "stop", n, "--force")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "create", "bad,name"], "invalid VM name"),
        (["vm", "create", "-x"], ""),
        (["vm", "create", "x", "--memory", "0"], "memory_mib"),
        (["vm", "create", "x", "--memory", "-5"], "memory_mib"),
        (["vm", "create", "x", "--memory", "99999999"], "memory_mib"),
        (["vm", "create", "x", "--vcpus", "0"], "vcpus"),
        (["vm", "create", "x", "--vcpus", "100000"], "vcpus"),
        (["vm", "create", "x", "--image", "no-such-image"], "no image named"),
        (["vm", "create", "x", "--image", "a,b"], "invalid image name"),
        (["vm", "create", "x", "--kernel", "/nonexistent/vmlinuz"], "does not exist"),
        (["vm", "create", "x", "--disk", "lots"], "invalid size"),
        (["vm", "create", "dup"], "already exists"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(daemon: Daemon, args: list[str], message: str) -> None:
    d = daemon
    if not any(v["name"] == "dup" for v in d.api.get("/v1/vms")):
        d.cli("vm", "create", "dup")
    before = (sorted(v["name"] for v in d.api.get("/v1/vms")), sorted(p.name for p in (d.state_dir / "vms").iterdir()))
    res = d.cli(*args, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    after = (sorted(v["name"] for v in d.api.get("/v1/vms")), sorted(p.name for p in (d.state_dir / "vms").iterdir()))
    assert after == before


def test_host_check(daemon: Daemon) -> None:
    report = json.loads(daemon.cli("host", "check", "--json").stdout)
    cpu_has_virt = any(f in Path("/proc/cpuinfo").read_text().split() for f in ("vmx", "svm"))
    assert report["qemu_version"] and report["accelerators"]["tcg"]["usable"]
    if not cpu_has_virt:
        # These machines: /dev/kvm exists, the CPU has no vmx/svm, so KVM must not be trusted.
        assert report["accelerators"]["kvm"]["usable"] is False
        assert report["accelerator"] == "tcg"
    assert {c["name"] for c in report["checks"]} >= {"tun", "bridge", "nftables", "cgroups", "seccomp"}
    # The daemon uses what the check chose.
    assert daemon.api.get("/v1")["accelerator"] == report["accelerator"]
    served = daemon.api.get("/v1/host")
    assert served["accelerator"] == report["accelerator"]


def test_api_rejects_unknown_fields_with_4xx(daemon: Daemon) -> None:
    with pytest.raises(ApiError) as e:
        daemon.api.post("/v1/vms", {"name": "u", "memory_mib": 64, "colour": "blue"})
    assert e.value.status == 400 and "unknown field" in e.value.message
    with pytest.raises(ApiError) as e:
        daemon.api.post("/v1/vms", {"name": "u", "memory_mib": "lots"})
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        daemon.api.post("/v1/vms", {"name": "u", "vcpus": True})
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        daemon.api.request("PATCH", "/v1/vms")
    assert e.value.status == 405 and e.value.message == "Method Not Allowed"
    assert all(v["name"] != "u" for v in daemon.api.get("/v1/vms"))
