"""links.make_uplink_bridge / release_uplink_bridge against real netlink, inside namespaces this test creates
and deletes: `host` holds the uplink `eth0` (a veth) and `lan` its peer (198.51.100.1, a documentation range)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import Netns, namespaces, veth

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("busybox") is None,
    reason="needs root, iproute2 and busybox (for ping) to make network namespaces",
)

HOST, LAN = "198.51.100.2", "198.51.100.1"
PRELUDE = "import json, os\nfrom vmkit.net import links\nfrom vmkit import errors\n"


def run_in(ns: Netns, code: str) -> str:
    res = ns.python(PRELUDE + textwrap.dedent(code), check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def make(ns: Netns) -> None:
    run_in(ns, 'links.make_uplink_bridge("br0", "eth0")')


def release(ns: Netns) -> None:
    run_in(ns, 'links.release_uplink_bridge("br0", "eth0")')


def ip_json(ns: Netns, *argv: str) -> list[dict[str, Any]]:
    res: list[dict[str, Any]] = json.loads(ns.run(["ip", "-j", *argv]).stdout)
    return res


def addrs(ns: Netns, dev: str) -> list[tuple[str, int]]:
    (link,) = ip_json(ns, "-4", "addr", "show", "dev", dev) or [{"addr_info": []}]
    return [(a["local"], a["prefixlen"]) for a in link["addr_info"]]


def routes(ns: Netns) -> list[str]:
    """Every IPv4 route of every table, as `ip route` prints them (the kernel's own for addresses included)."""
    return sorted(ns.run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines())


def master(ns: Netns, dev: str) -> str | None:
    (link,) = ip_json(ns, "link", "show", "dev", dev)
    return link.get("master")


def mac(ns: Netns, dev: str) -> str:
    return ns.run(["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()


def pings(ns: Netns, ip: str) -> bool:
    return ns.run(["busybox", "ping", "-c", "1", "-W", "2", ip], check=False).returncode == 0


def quiet(ns: Netns, fn: Any) -> str:
    """What netlink announces in ns while fn runs: link, address and route events."""
    monitor = ns.popen(["ip", "monitor", "link", "address", "route"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)  # let the monitor subscribe
        fn()
        time.sleep(0.2)
    finally:
        monitor.terminate()
        events = monitor.communicate(timeout=5)[0]
    return str(events)


@pytest.fixture
def lan() -> Iterator[tuple[Netns, Netns]]:
    with namespaces("host", "lan") as (host, lan):
        # IPv4 only in `host`: IPv6 duplicate address detection finishing late would show in quiet().
        for conf in ("all", "default"):
            host.run(["sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"])
        veth(host, "eth0", lan, "eth0")
        host.run(["ip", "addr", "add", f"{HOST}/24", "dev", "eth0"])
        lan.run(["ip", "addr", "add", f"{LAN}/24", "dev", "eth0"])
        host.run(["ip", "route", "add", "default", "via", LAN])
        yield host, lan


@needs_netns
def test_make_moves_address_and_default_route_and_release_restores(lan: tuple[Netns, Netns]) -> None:
    host, peer = lan
    before = routes(host)
    uplink_mac = mac(host, "eth0")

    make(host)
    assert addrs(host, "br0") == [(HOST, 24)]
    assert addrs(host, "eth0") == []
    assert master(host, "eth0") == "br0"
    assert mac(host, "br0") == uplink_mac  # the LAN keeps seeing the same host
    (default,) = ip_json(host, "-4", "route", "show", "default")
    assert default["dev"] == "br0" and default["gateway"] == LAN
    assert not [r for r in routes(host) if "dev eth0" in r]
    assert pings(peer, HOST) and pings(host, LAN)
    (br,) = ip_json(host, "-d", "link", "show", "dev", "br0")
    assert "UP" in br["flags"] and br["linkinfo"]["info_data"]["stp_state"] == 0
    assert br["linkinfo"]["info_data"]["forward_delay"] == 0

    # Done already: a second run changes nothing at all.
    assert quiet(host, lambda: make(host)) == ""
    assert addrs(host, "br0") == [(HOST, 24)] and master(host, "eth0") == "br0"

    release(host)
    assert host.run(["ip", "link", "show", "dev", "br0"], check=False).returncode != 0  # deleted
    assert master(host, "eth0") is None
    assert addrs(host, "eth0") == [(HOST, 24)]
    assert routes(host) == before
    assert mac(host, "eth0") == uplink_mac
    assert pings(peer, HOST) and pings(host, LAN)

    assert quiet(host, lambda: release(host)) == ""  # nothing left to undo
    assert routes(host) == before


@needs_netns
def test_metrics_tables_secondaries_and_labels_go_along_and_back(lan: tuple[Netns, Netns]) -> None:
    host, _ = lan
    host.run(["ip", "route", "del", "default"])
    host.run(["ip", "route", "add", "default", "via", LAN, "metric", "100"])
    host.run(["ip", "addr", "add", "198.51.100.3/24", "dev", "eth0"])  # a secondary
    host.run(["ip", "addr", "add", "10.1.2.3/8", "dev", "eth0", "label", "eth0:x", "noprefixroute", "metric", "7"])
    host.run(["ip", "route", "add", "10.0.0.0/8", "dev", "eth0", "proto", "dhcp", "metric", "7", "src", "10.1.2.3"])
    host.run(["ip", "route", "add", "10.9.0.0/16", "via", "198.51.100.7", "table", "300", "mtu", "1400"])
    host.run(["ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.9", "dev", "eth0", "metric", "5", "onlink"])
    before = routes(host)

    make(host)
    moved = routes(host)
    assert moved == sorted(r.replace("dev eth0", "dev br0") for r in before)
    assert addrs(host, "br0") == [(HOST, 24), ("10.1.2.3", 8), ("198.51.100.3", 24)]
    (br,) = ip_json(host, "-4", "addr", "show", "dev", "br0")
    by_ip = {a["local"]: a for a in br["addr_info"]}
    assert by_ip["198.51.100.3"].get("secondary") is True
    assert by_ip["10.1.2.3"]["label"] == "br0:x" and by_ip["10.1.2.3"].get("noprefixroute") is True
    assert by_ip["10.1.2.3"]["metric"] == 7
    assert addrs(host, "eth0") == []
    assert quiet(host, lambda: make(host)) == ""

    release(host)
    assert routes(host) == before
    (eth,) = ip_json(host, "-4", "addr", "show", "dev", "eth0")
    assert [(a["local"], a.get("label"), a.get("secondary", False)) for a in eth["addr_info"]] == [
        (HOST, "eth0", False),
        ("10.1.2.3", "eth0:x", False),
        ("198.51.100.3", "eth0", True),
    ]


@needs_netns
def test_an_open_connection_survives_the_move_both_ways(lan: tuple[Netns, Netns]) -> None:
    """Addresses are added on the bridge before they leave the uplink: a TCP connection from the LAN to the
    host lives through make and release."""
    host, peer = lan
    server = host.popen(
        ["python3", "-c", textwrap.dedent(f"""
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("{HOST}", 7777)); s.listen(1); print("ready", flush=True)
            c, _ = s.accept()
            while data := c.recv(100):
                c.sendall(data.upper())
            """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    client = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = peer.popen(
            ["python3", "-c", textwrap.dedent(f"""
                import socket, sys
                c = socket.create_connection(("{HOST}", 7777), timeout=10)
                for line in sys.stdin:
                    c.sendall(line.encode()); print(c.recv(100).decode().strip(), flush=True)
                """)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None

        def echo(word: str) -> str:
            assert client is not None and client.stdin is not None and client.stdout is not None
            client.stdin.write(word + "\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        assert echo("before") == "BEFORE"
        make(host)
        assert echo("bridged") == "BRIDGED"
        release(host)
        assert echo("released") == "RELEASED"
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait(5)


@needs_netns
def test_refusals_change_nothing(lan: tuple[Netns, Netns]) -> None:
    host, _ = lan
    before = routes(host)
    host.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
    host.run(["ip", "link", "add", "other", "type", "bridge"])
    out = run_in(
        host,
        """
        def attempt(call):
            try:
                call()
                print("ok")
            except errors.VmkitError as e:
                print(type(e).__name__)
        attempt(lambda: links.make_uplink_bridge("br0", "nosuch0"))  # no uplink
        attempt(lambda: links.make_uplink_bridge("v0", "eth0"))      # the bridge's name is a veth
        attempt(lambda: links.make_uplink_bridge("br0", "other"))    # a bridge as uplink
        attempt(lambda: links.make_uplink_bridge("br0", "lo"))
        attempt(lambda: links.make_uplink_bridge("eth0", "eth0"))
        attempt(lambda: links.make_uplink_bridge("br0", "bad name"))
        os.system("ip link set v1 master other")
        attempt(lambda: links.make_uplink_bridge("br0", "v1"))       # a port of another bridge
        attempt(lambda: links.release_uplink_bridge("br0", "eth0"))  # nothing to release
        """,
    )
    assert out.split() == ["NotFound", "Conflict", "Conflict", "Conflict", "InvalidInput", "InvalidInput",
                           "Conflict", "ok"]  # fmt: skip
    assert routes(host) == before and addrs(host, "eth0") == [(HOST, 24)]

    # A bridge whose VMs still have ports on it is not taken away from them.
    make(host)
    host.run(["ip", "link", "set", "v0", "master", "br0"])
    moved = routes(host)
    assert "Conflict" in run_in(
        host,
        """
        try:
            links.release_uplink_bridge("br0", "eth0")
        except errors.Conflict as e:
            print("Conflict", e)
        """,
    )
    assert routes(host) == moved and master(host, "eth0") == "br0" and addrs(host, "br0") == [(HOST, 24)]
    host.run(["ip", "link", "set", "v0", "nomaster"])
    release(host)
    assert routes(host) == before


@needs_netns
def test_works_from_a_coroutine(lan: tuple[Netns, Netns]) -> None:
    host, peer = lan
    run_in(
        host,
        """
        import asyncio
        async def main():
            links.make_uplink_bridge("br0", "eth0")
        asyncio.run(main())
        """,
    )
    assert addrs(host, "br0") == [(HOST, 24)] and pings(peer, HOST)
    run_in(
        host, 'import asyncio\nasync def main():\n    links.release_uplink_bridge("br0", "eth0")\nasyncio.run(main())'
    )
    assert addrs(host, "eth0") == [(HOST, 24)] and pings(peer, HOST)
