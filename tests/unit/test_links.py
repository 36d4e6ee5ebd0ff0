"""vmkit.net.links against real netlink, always inside network namespaces this test creates and deletes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from typing import Any

import pytest

from tests.netns import Netns, namespaces
from vmkit.errors import InvalidInput
from vmkit.net import links

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun to make network namespaces and taps",
)

PRELUDE = "import json, os\nfrom vmkit.net import links\nfrom vmkit import errors\n"


def run_in(ns: Netns, code: str) -> str:
    """Run code (with `links` imported) in ns and return its stdout; fail the test with its stderr."""
    res = ns.python(PRELUDE + textwrap.dedent(code), check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def ip_json(ns: Netns, *argv: str) -> list[dict[str, Any]]:
    res: list[dict[str, Any]] = json.loads(ns.run(["ip", "-j", "-d", *argv]).stdout)
    return res


@pytest.mark.parametrize("name", ["", "a" * 16, "a b", "a/b", "a:b", ".", "..", "tap\n", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        links.check_ifname(name)
    with pytest.raises(InvalidInput):
        links.open_tap(name, bridge=None)  # refused before anything is opened


def test_good_names_pass() -> None:
    for name in ["virbr0", "vk-web-0", "a" * 15, "a.b_c-d"]:
        assert links.check_ifname(name) == name


@needs_netns
def test_ensure_bridge_creates_is_idempotent_and_readdresses() -> None:
    with namespaces("links") as (ns,):
        run_in(ns, 'links.ensure_bridge("vbr0", address="192.168.150.1/24")')
        (link,) = ip_json(ns, "link", "show", "vbr0")
        info = link["linkinfo"]["info_data"]
        assert link["linkinfo"]["info_kind"] == "bridge"
        assert info["stp_state"] == 0 and info["forward_delay"] == 0
        assert "UP" in link["flags"]
        assert (
            ns.run(["cat", "/sys/class/net/vbr0/addr_assign_type"]).stdout.strip() == "3"
        )  # NET_ADDR_SET: the bridge keeps its MAC as ports come and go
        assert run_in(ns, 'print(links.ipv4_addresses("vbr0"), links.is_bridge("vbr0"))').split() == [
            "['192.168.150.1/24']",
            "True",
        ]
        (addr,) = [a for a in ip_json(ns, "-4", "addr", "show", "vbr0")[0]["addr_info"]]
        assert addr["broadcast"] == "192.168.150.255"

        # A second run on a correct bridge changes nothing: no netlink event at all while it runs.
        monitor = ns.popen(["ip", "monitor", "link", "address", "route"], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.2)  # let the monitor subscribe
            run_in(ns, 'links.ensure_bridge("vbr0", address="192.168.150.1/24")')
            time.sleep(0.2)
        finally:
            monitor.terminate()
            events = monitor.communicate(timeout=5)[0]
        assert not events, events

        # Readdress: the new address becomes the only one; a stray one goes too.
        ns.run(["ip", "addr", "add", "10.77.0.9/8", "dev", "vbr0"])
        ns.run(["ip", "link", "set", "vbr0", "down", "type", "bridge", "stp_state", "1", "forward_delay", "1500"])
        run_in(ns, 'links.ensure_bridge("vbr0", address="192.168.151.1/25")')
        (link,) = ip_json(ns, "link", "show", "vbr0")
        assert "UP" in link["flags"]
        assert link["linkinfo"]["info_data"]["stp_state"] == 0
        assert link["linkinfo"]["info_data"]["forward_delay"] == 0
        assert run_in(ns, 'print(links.ipv4_addresses("vbr0"))').strip() == "['192.168.151.1/25']"
        run_in(ns, 'links.ensure_bridge("vbr0", address=None)')
        assert run_in(ns, 'print(links.ipv4_addresses("vbr0"))').strip() == "[]"

        out = run_in(
            ns,
            """
            os.system("ip link add dum0 type veth peer name dum1")
            for call in (lambda: links.ensure_bridge("dum0", address=None),
                         lambda: links.ensure_bridge("vbr0", address="192.168.1.300/24"),
                         lambda: links.ensure_bridge("vbr0", address="192.168.1.3")):
                try:
                    call()
                except errors.VmkitError as e:
                    print(type(e).__name__)
            """,
        )
        assert out.split() == ["Conflict", "InvalidInput", "InvalidInput"]


@needs_netns
def test_open_tap_on_bridge_goes_with_its_fd() -> None:
    with namespaces("links") as (ns,):
        out = run_in(
            ns,
            """
            import fcntl, time
            links.ensure_bridge("vbr0", address="192.168.150.1/24")
            os.system("ip link set vbr0 mtu 1400")
            mac = open("/sys/class/net/vbr0/address").read()
            t = time.perf_counter()
            fd = links.open_tap("vtap0", bridge="vbr0")
            print("ms", (time.perf_counter() - t) * 1000)
            print("cloexec", bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
            print("master", os.path.basename(os.readlink("/sys/class/net/vtap0/master")))
            print("flags", open("/sys/class/net/vtap0/tun_flags").read().strip())
            print("mtu", open("/sys/class/net/vtap0/mtu").read().strip())
            print("operstate-up", int(open("/sys/class/net/vtap0/flags").read(), 16) & 1)
            print("tapmac", open("/sys/class/net/vtap0/address").read().strip())
            print("bridge-mac-kept", open("/sys/class/net/vbr0/address").read() == mac)
            for call in (lambda: links.open_tap("vtap0", bridge="vbr0"),   # taken by a tap
                         lambda: links.open_tap("vbr0", bridge=None),      # taken by a bridge
                         lambda: links.open_tap("vtap1", bridge="nobr0"),  # no such bridge
                         lambda: links.open_tap("vtap1", bridge="lo")):    # not a bridge
                try:
                    call()
                except errors.VmkitError as e:
                    print("refused", type(e).__name__)
            print("left", links.links_with_prefix("vtap"))
            links.attach("vtap0", None)
            print("detached", os.path.exists("/sys/class/net/vtap0/master"))
            links.attach("vtap0", "vbr0")
            print("attached", os.path.exists("/sys/class/net/vtap0/master"))
            os.close(fd)
            print("after-close", links.link_exists("vtap0"), links.links_with_prefix("vtap"))
            """,
        )
        lines = dict(line.split(" ", 1) for line in out.strip().splitlines() if not line.startswith("refused"))
        assert lines["cloexec"] == "True"
        assert lines["master"] == "vbr0"
        # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (the EXCL bit is not kept); QEMU expects a vnet_hdr tap.
        assert int(lines["flags"], 16) & 0x7FFF == 0x0002 | 0x1000 | 0x4000
        assert lines["mtu"] == "1400"  # the bridge's, so the tap cannot lower it
        assert lines["operstate-up"] == "1"
        assert lines["tapmac"].startswith("fe:")
        assert lines["bridge-mac-kept"] == "True"
        assert [line for line in out.splitlines() if line.startswith("refused")] == [
            "refused Conflict",
            "refused Conflict",
            "refused NotFound",
            "refused Conflict",
        ]
        assert lines["left"] == "['vtap0']"  # a refused tap leaves nothing behind
        assert lines["detached"] == "False" and lines["attached"] == "True"
        assert lines["after-close"] == "False []"
        print(f"open_tap: {float(lines['ms']):.1f} ms")


@needs_netns
def test_routes_addresses_overlap_forwarding_delete() -> None:
    with namespaces("links") as (ns,):
        ns.run(["ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1"])  # no dummy module here
        ns.run(["ip", "link", "set", "dum0", "up"])
        ns.run(["ip", "addr", "add", "10.20.30.40/16", "dev", "dum0"])
        ns.run(["ip", "route", "add", "172.16.5.0/24", "dev", "dum0"])
        ns.run(["ip", "route", "add", "default", "via", "10.20.0.1"])
        ns.run(["ip", "route", "add", "192.168.99.0/24", "dev", "dum0", "table", "100"])  # policy routing
        out = run_in(
            ns,
            """
            links.ensure_bridge("vbr0", address="192.168.122.1/24")
            print(json.dumps({
                "all": links.ipv4_routes_and_addresses(),
                "over_10": links.overlapping("10.0.0.0/8"),
                "over_122": links.overlapping("192.168.122.0/24"),
                "over_122_own": links.overlapping("192.168.122.0/24", ignore_link="vbr0"),
                "over_free": links.overlapping("192.168.123.0/24"),
                "over_99": links.overlapping("192.168.99.128/25"),
            }))
            """,
        )
        got = json.loads(out)
        # The default route is not a subnet in use; 127/8 is the loopback address's.
        assert got["all"] == [
            "10.20.0.0/16",
            "127.0.0.0/8",
            "172.16.5.0/24",
            "192.168.99.0/24",
            "192.168.122.0/24",
        ]
        assert got["over_10"] == ["10.20.0.0/16"]
        assert got["over_122"] == ["192.168.122.0/24"]
        assert got["over_122_own"] == []
        assert got["over_free"] == []
        assert got["over_99"] == ["192.168.99.0/24"]

        def forward() -> str:
            return ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()

        # A new namespace may start with forwarding on (copied from the machine's where a NAT network runs).
        run_in(ns, "links.set_ip_forward(False)")
        assert forward() == "0"
        run_in(ns, "links.set_ip_forward()")
        assert forward() == "1"
        run_in(ns, "links.set_ip_forward(False)")
        assert forward() == "0"

        assert run_in(ns, 'print(links.delete_link("vbr0"), links.delete_link("vbr0"))').split() == ["True", "False"]
        assert ns.run(["ip", "link", "show", "vbr0"], check=False).returncode != 0


@needs_netns
def test_calls_from_a_coroutine_work() -> None:
    """The daemon may call from its event loop thread: pyroute2 alone would fail there."""
    with namespaces("links") as (ns,):
        out = run_in(
            ns,
            """
            import asyncio
            async def main():
                links.ensure_bridge("vbr0", address="192.168.150.1/24")
                fd = links.open_tap("vtap0", bridge="vbr0")
                print(links.links_with_prefix("v"))
                os.close(fd)
            asyncio.run(main())
            """,
        )
        assert out.strip() == "['vbr0', 'vtap0']"


@needs_netns
def test_timings() -> None:
    """Figures for the VM start path (printed, never asserted: timing does not fail tests)."""
    with namespaces("links") as (ns,):
        out = run_in(
            ns,
            """
            import time
            def ms(f):
                t = time.perf_counter(); r = f(); return (time.perf_counter() - t) * 1000, r
            new, _ = ms(lambda: links.ensure_bridge("vbr0", address="192.168.150.1/24"))
            again, _ = ms(lambda: links.ensure_bridge("vbr0", address="192.168.150.1/24"))
            taps = []
            for i in range(20):
                taps.append(ms(lambda: links.open_tap(f"vtap{i}", bridge="vbr0")))
            for _, fd in taps:
                os.close(fd)
            tap = sorted(t for t, _ in taps)
            print(f"ensure_bridge new {new:.1f} ms, again {again:.1f} ms; "
                  f"open_tap median {tap[10]:.1f} ms, max {tap[-1]:.1f} ms")
            """,
        )
        print(out)
