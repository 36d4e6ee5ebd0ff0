"""Network namespaces for tests: everything a networking test builds (bridges, taps, veths, dnsmasq, nftables
tables, vmkit daemons) lives in namespaces made here and is gone when they are deleted. Test traffic goes
only between these namespaces. (Tests may use `ip`; vmkit itself talks netlink through pyroute2.)"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.conftest import CACHE_DIR, Daemon

_count = itertools.count()


class Netns:
    """One named network namespace (`ip netns add`), with loopback up."""

    def __init__(self, tag: str = "t") -> None:
        self.name = f"vmkt-{os.getpid() % 100000}-{tag}{next(_count)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), check=check, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(argv), **kw)  # type: ignore[call-overload, no-any-return]

    def python(self, code: str, *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run Python code (this venv, this checkout on sys.path) inside the namespace."""
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        return self.run([sys.executable, "-c", code], check=check, timeout=timeout, env=env)

    def pids(self) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
        return [int(p) for p in res.stdout.split()]

    def delete(self) -> None:
        """Kill what still runs inside (dnsmasq, QEMU, a daemon) and delete the namespace with its links."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)


def veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair between two namespaces, both ends up."""
    tmp = f"vt{os.getpid() % 100000}x{next(_count)}"
    subprocess.run(["ip", "link", "add", tmp, "type", "veth", "peer", "name", tmp + "p"], check=True)
    subprocess.run(["ip", "link", "set", tmp, "netns", a.name], check=True)
    subprocess.run(["ip", "link", "set", tmp + "p", "netns", b.name], check=True)
    a.run(["ip", "link", "set", tmp, "name", a_name])
    b.run(["ip", "link", "set", tmp + "p", "name", b_name])
    a.run(["ip", "link", "set", a_name, "up"])
    b.run(["ip", "link", "set", b_name, "up"])


@contextlib.contextmanager
def namespaces(*tags: str) -> Iterator[list[Netns]]:
    made: list[Netns] = []
    try:
        for tag in tags:
            made.append(Netns(tag))
        yield made
    finally:
        for ns in made:
            ns.delete()


@contextlib.contextmanager
def daemon_in(ns: Netns, prefix: str, env: dict[str, str] | None = None, *, demo: bool = True) -> Iterator[Daemon]:
    """A vmkit daemon running inside ns (its bridges, taps, dnsmasq, tables and OVS live there), in a root dir of
    its own that dnsmasq's user and QEMU's can traverse (pytest's temp root is 0700); with demo, the demo image
    built (cached). Stopped, its processes killed and its dir removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    d = Daemon(root, {"VMKIT_CACHE_DIR": str(CACHE_DIR), **(env or {})}, netns=ns.name)
    try:
        d.start()
        if demo:
            d.cli("image", "demo", timeout_s=900)
        yield d
    finally:
        d.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def lan(*tags: str) -> Iterator[list[tuple[Netns, str]]]:
    """Hosts (one namespace per tag) on a LAN of their own: each one's eth0 on a bridge in another namespace, with
    an address 10.77.N.1, .2, … (N from the test's pid); yields (namespace, address) per host."""
    with switched_lan(*tags) as (_, hosts):
        yield hosts


@contextlib.contextmanager
def switched_lan(*tags: str) -> Iterator[tuple[Netns, list[tuple[Netns, str]]]]:
    """lan(), with the switch's namespace too (its bridge is br0): for a test that serves the LAN itself."""
    net = os.getpid() % 200 + 20
    with namespaces("lan", *tags) as (switch, *hosts):
        switch.run(["ip", "link", "add", "br0", "type", "bridge"])
        switch.run(["ip", "link", "set", "br0", "up"])
        out = []
        for i, ns in enumerate(hosts, start=1):
            veth(ns, "eth0", switch, f"p{i}")
            switch.run(["ip", "link", "set", f"p{i}", "master", "br0"])
            addr = f"10.77.{net}.{i}"
            ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
            out.append((ns, addr))
        yield switch, out
