"""Build the demo guest and boot it with plain QEMU (TCG): ready line, guest agent, DHCP, power-off, reboot.

QEMU runs with the machine vmkit uses (q35 under TCG). The kernel is the uncompressed ELF booted through
PVH, so the tests also cover QEMU's PVH path: a start paused with -S, and vmkit's reboot (system_reset
after the guest powered off under -no-shutdown), which must reload the kernel and boot it again.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_id_range
from vmkit.host import identity
from vmkit.images.demo import ELF_MAGIC, READY_LINE, VMLINUX, DemoImage, build_demo, pvh_entry
from vmkit.util import proc

pytestmark = pytest.mark.e2e

QEMU_UID = int(unique_id_range(1).split(":")[0])
TOOLS = ("qemu-system-x86_64", "qemu-img", "apt-get", "apt-cache", "dpkg-deb", "depmod", "modinfo", "ldd")


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    # `make test` installs all of these: a missing one is a broken install step, so it fails, never skips.
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"missing host tools: {', '.join(missing)} (run scripts/install-deps.sh)"
    path = Path(os.environ.get("VMKIT_TEST_CACHE", "/var/cache/vmkit-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def image(cache_dir: Path) -> DemoImage:
    return build_demo(cache_dir)


def test_second_build_is_cached(cache_dir: Path, image: DemoImage) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> proc.Result:
        raise AssertionError(f"cached build ran {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(proc, "run", no_subprocess)
        started = time.monotonic()
        again = build_demo(cache_dir)
        elapsed = time.monotonic() - started
    assert again == image
    # A hit takes a few ms; a rebuild takes seconds. The margin absorbs a loaded test machine.
    assert elapsed < 0.25
    for path in (image.kernel, image.initrd, image.disk):
        assert path.is_file()
    assert image.initrd.stat().st_size < 8 << 20


def test_kernel_is_uncompressed_pvh_elf(image: DemoImage) -> None:
    # Debian's amd64 kernels have CONFIG_PVH=y and an xz payload: the build must pick the fast path.
    meta = json.loads((image.kernel.parent / "image.json").read_text())
    assert image.kernel.name == VMLINUX, meta.get("pvh_fallback")
    assert meta["kernel_format"] == "elf-pvh"
    data = image.kernel.read_bytes()
    assert data.startswith(ELF_MAGIC)
    assert pvh_entry(data) == int(meta["pvh_entry"], 16)
    assert len(data) < 48 << 20  # trimmed: the ELF as extracted is ~66 MB


# ----------------------------------------------------------------------------------- clients


class _LineSocket:
    def __init__(self, path: Path, timeout_s: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def recv_more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed the socket")
        self.buf += chunk

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            self.recv_more()
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()


class Agent(_LineSocket):
    """Just enough of the qemu-guest-agent protocol for these tests."""

    def sync(self) -> None:
        # Anything already queued on the channel (stale replies, partial JSON) precedes the 0xFF the agent
        # sends in front of its reply, so everything up to it is dropped.
        sync_id = random.randrange(1, 1 << 31)
        self.send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        while b"\xff" not in self.buf:
            self.recv_more()
        self.buf = self.buf.rpartition(b"\xff")[2]
        while True:
            try:
                reply = json.loads(self.readline())
            except ValueError:
                continue
            if reply.get("return") == sync_id:
                return

    def call(self, command: str, **arguments: Any) -> Any:
        self.send({"execute": command, "arguments": arguments})
        reply = json.loads(self.readline())
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def exec(self, path: str, *args: str, timeout_s: float = 20) -> tuple[int, str]:
        pid = self.call("guest-exec", path=path, arg=list(args), **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.call("guest-exec-status", pid=pid)
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode()
                return status.get("exitcode", -1), out
            time.sleep(0.05)
        raise TimeoutError(f"guest-exec {path} {args} did not finish")


class Qmp(_LineSocket):
    def handshake(self) -> None:
        self.events: list[dict[str, Any]] = []
        assert "QMP" in json.loads(self.readline())
        self.command("qmp_capabilities")

    def command(self, name: str) -> Any:
        self.send({"execute": name})
        while True:
            msg = json.loads(self.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']}")
            return msg["return"]

    def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """The first event called name, waiting for it up to timeout_s; it and earlier ones are consumed."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    del self.events[: i + 1]
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {name} event within {timeout_s} s; got {self.events}")
            self.sock.settimeout(remaining)
            try:
                self.recv_more()
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(10)
            while b"\n" in self.buf:
                msg = json.loads(self.readline())
                if "event" in msg:
                    self.events.append(msg)


# ----------------------------------------------------------------------------------- the VM


class DemoVm:
    """QEMU running the demo image. paused and no_shutdown add -S and -no-shutdown, as vmkit runs QEMU.

    Like every QEMU of this project it never runs as root: it starts as an unprivileged uid that owns its run
    dir (the image's files are world-readable)."""

    def __init__(self, image: DemoImage, rundir: Path, *, paused: bool = False, no_shutdown: bool = False) -> None:
        self.rundir = rundir
        self.serial_log = rundir / "serial.log"
        self.qga_sock = rundir / "qga.sock"
        self.qmp_sock = rundir / "qmp.sock"
        overlay = rundir / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", image.disk, "-F", "qcow2", overlay], check=True
        )
        for path in (rundir, overlay):
            os.chown(path, QEMU_UID, QEMU_UID)
        argv = [
            *identity.launcher(identity.Identity(QEMU_UID, QEMU_UID)),
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", image.cmdline,
            "-chardev", f"socket,id=s0,path={rundir}/serial.sock,server=on,wait=off,logfile={self.serial_log}",
            "-serial", "chardev:s0",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={self.qga_sock},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
            "-blockdev", f"driver=file,filename={overlay},node-name=f0",
            "-blockdev", "driver=qcow2,file=f0,node-name=d0",
            "-device", "virtio-blk-pci,drive=d0",
        ]  # fmt: skip
        if paused:
            argv.append("-S")
        if no_shutdown:
            argv.append("-no-shutdown")
        self.started = time.monotonic()
        self.process = subprocess.Popen(  # noqa: S603 - argv list
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def qmp(self, timeout_s: float = 10) -> Qmp:
        """A QMP connection after the handshake; QEMU creates the socket shortly after it starts."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                qmp = Qmp(self.qmp_sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.02)
        qmp.handshake()
        return qmp

    def wait_ready(self, timeout_s: float, *, count: int = 1, since: float | None = None) -> float:
        """Seconds from since (default: QEMU's start) until the serial log has count READY lines."""
        started = self.started if since is None else since
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            lines = [line.strip() for line in self.serial_text().splitlines()]
            if lines.count(READY_LINE) >= count:
                return time.monotonic() - started
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                pytest.fail(f"QEMU exited ({self.process.returncode}): {out}\n{self.serial_text()}")
            time.sleep(0.05)
        pytest.fail(f"no {READY_LINE} within {timeout_s} s; serial:\n{self.serial_text()}")

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running {timeout_s} s later; serial:\n{self.serial_text()[-2000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout:
            self.process.stdout.close()


@pytest.fixture
def make_vm(image: DemoImage) -> Iterator[Callable[..., DemoVm]]:
    """DemoVm factory; every VM it started is killed and its files removed at the end of the test."""
    started: list[tuple[DemoVm, Path]] = []

    def make(**options: bool) -> DemoVm:
        # Short path under /tmp: unix socket paths are limited to 107 bytes.
        rundir = Path(tempfile.mkdtemp(prefix="vmkit-e2e-"))
        machine = DemoVm(image, rundir, **options)
        started.append((machine, rundir))
        return machine

    try:
        yield make
    finally:
        for machine, rundir in started:
            machine.kill()
            shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def vm(make_vm: Callable[..., DemoVm]) -> DemoVm:
    return make_vm()


def _agent(vm: DemoVm) -> Agent:
    agent = Agent(vm.qga_sock)
    agent.sync()
    return agent


# ----------------------------------------------------------------------------------- tests


def test_boot_agent_dhcp_and_acpi_powerdown(vm: DemoVm, image: DemoImage) -> None:
    vm.wait_ready(30)

    agent = _agent(vm)
    assert agent.exec("uname", "-r") == (0, image.kernel_version + "\n")

    # DHCP runs in the background after READY; QEMU's user-mode network hands out 10.0.2.15.
    deadline = time.monotonic() + 20
    addresses = ""
    while time.monotonic() < deadline and "10.0.2.15/" not in addresses:
        addresses = agent.exec("ip", "-4", "-o", "addr", "show", "dev", "eth0")[1]
        time.sleep(0.2)
    assert "10.0.2.15/" in addresses
    agent.close()

    qmp = Qmp(vm.qmp_sock)
    qmp.handshake()
    qmp.command("system_powerdown")
    assert vm.wait_exit(20) == 0  # the guest powered itself off, QEMU was not killed
    assert "Requesting system poweroff" in vm.serial_text()


def test_guest_shutdown_through_agent(vm: DemoVm) -> None:
    vm.wait_ready(30)
    agent = _agent(vm)
    # On success the agent sends no reply: the guest is going away.
    agent.send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
    assert vm.wait_exit(20) == 0


def test_paused_start_and_reboot_after_guest_poweroff(make_vm: Callable[..., DemoVm], image: DemoImage) -> None:
    # As vmkit runs a VM: QEMU starts paused (-S) and keeps running when the guest powers off (-no-shutdown).
    vm = make_vm(paused=True, no_shutdown=True)
    qmp = vm.qmp()
    assert qmp.command("query-status")["status"] == "prelaunch"
    resumed = time.monotonic()
    qmp.command("cont")
    vm.wait_ready(30, since=resumed)
    agent = _agent(vm)
    assert agent.exec("uname", "-r") == (0, image.kernel_version + "\n")
    agent.close()

    # vmkit's reboot: ACPI power-off request; once the guest has powered off, system_reset and cont.
    qmp.command("system_powerdown")
    assert qmp.wait_event("SHUTDOWN", 20)["data"]["guest"] is True
    assert vm.process.poll() is None  # -no-shutdown: QEMU waits instead of exiting
    assert qmp.command("query-status")["status"] == "shutdown"
    resumed = time.monotonic()
    qmp.command("system_reset")
    qmp.command("cont")
    vm.wait_ready(30, count=2, since=resumed)
    agent = _agent(vm)
    assert agent.exec("cat", "/proc/cmdline")[1].strip() == image.cmdline
    agent.close()

    qmp.command("quit")
    assert vm.wait_exit(20) == 0
