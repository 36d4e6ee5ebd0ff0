"""A `bridge` network on real QEMU: the guest joins a host bridge and is served by the LAN's own DHCP server.

Everything lives in namespaces this module makes (tests/netns.py): `lan` is a simulated LAN (198.51.100.0/24, a
documentation range) with a DHCP server of its own (dnsmasq, minimal config) on 198.51.100.1; `host` is where the
vmkit daemon runs, its uplink `eth0` (198.51.100.2) joined to `lan` by a veth. The test itself (not vmkit) makes
the host bridge `br0` there and moves eth0's address onto it, as an administrator would; vmkit only joins it.
Nothing reaches the machine's own namespace or any outside address.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.e2e.guest import boot
from tests.netns import Netns, daemon_in, namespaces, veth

pytestmark = pytest.mark.e2e

HOST, LAN = "198.51.100.2", "198.51.100.1"
POOL = ("198.51.100.100", "198.51.100.150")


@dataclass
class Lan:
    d: Daemon
    host: Netns
    lan: Netns
    leases: Path  # the LAN dnsmasq's lease file


def _in_pool(ip: str) -> bool:
    return ip.startswith("198.51.100.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150


@pytest.fixture(scope="module")
def bridged() -> Iterator[Lan]:
    with namespaces("host", "lan") as (host, lan):
        veth(host, "eth0", lan, "eth0")
        lan.run(["ip", "addr", "add", f"{LAN}/24", "dev", "eth0"])
        # The host's own bridge, made the usual way: eth0 enslaved, its address and default route on br0.
        host.run(["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        host.run(["ip", "link", "set", "eth0", "master", "br0"])
        host.run(["ip", "link", "set", "br0", "up"])
        host.run(["ip", "addr", "add", f"{HOST}/24", "dev", "br0"])
        host.run(["ip", "route", "add", "default", "via", LAN])
        with daemon_in(host, "vmkit-brnet-") as d:
            leases = d.root / "lan.leases"
            # --no-daemon: no fork, no pid file, no change of user; --port=0: DHCP only, no DNS; logs to stderr.
            dhcp = lan.popen(
                ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--interface=eth0", "--bind-interfaces",
                 "--except-interface=lo", f"--dhcp-range={POOL[0]},{POOL[1]},1h", "--no-resolv", "--no-hosts",
                 "--port=0", "--log-facility=-", "--log-dhcp", f"--dhcp-leasefile={leases}", "--dhcp-authoritative"],
                stdout=subprocess.DEVNULL, stderr=open(d.root / "lan-dnsmasq.log", "wb"),  # noqa: SIM115
            )  # fmt: skip
            try:
                yield Lan(d, host, lan, leases)
            finally:
                dhcp.kill()
                dhcp.wait(5)


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


def agent_ipv4(d: Daemon, vm: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """The guest's IPv4 addresses as its agent reports them, once it has one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        addrs = [a for a in j(d, "vm", "ifaddr", vm, "--source", "agent") if a["family"] == "ipv4"]
        if addrs:
            return addrs
        time.sleep(0.3)
    raise AssertionError(f"{vm}: no IPv4 address; serial: {d.cli('vm', 'log', vm).stdout[-800:]}")


def guest_pings(d: Daemon, vm: str, ip: str) -> bool:
    res = d.cli("vm", "exec", vm, "--", "sh", "-c", f"ping -c 1 -W 2 {ip} >/dev/null 2>&1", check=False)
    return res.returncode == 0


def vmkit_rules(ns: Netns) -> dict[str, list[dict[str, Any]]]:
    """The rules of each vmkit table in ns: {table name: [rule, …]}."""
    ruleset = json.loads(ns.run(["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    tables = {o["table"]["name"]: [] for o in ruleset if "table" in o and o["table"]["name"].startswith("vmkit")}
    for o in ruleset:
        if "rule" in o and o["rule"]["table"] in tables:
            tables[o["rule"]["table"]].append(o["rule"])
    return tables


def test_bridge_network_guest_is_served_by_the_lan(bridged: Lan) -> None:
    d, host, lan = bridged.d, bridged.host, bridged.lan
    # A bridge network needs a bridge that is there.
    assert d.cli("network", "create", "nob", "--mode", "bridge", "--bridge", "nosuch0", check=False).returncode != 0

    net = j(d, "network", "create", "lan", "--mode", "bridge", "--bridge", "br0")
    assert net["mode"] == "bridge" and net["bridge"] == "br0" and net["active"]
    assert net["subnet"] is None and net["dhcp_range"] is None and net["dnsmasq_pid"] is None

    boot(d, "bg", "--network", "lan", wait=False)
    d.cli("vm", "wait", "bg", "--for", "agent", "--timeout", "90")
    vm = d.vm("bg")
    mac = vm["nics"][0]["mac"]

    # The guest's tap is a port of the host's bridge, beside the uplink.
    ports = {p["ifname"] for p in json.loads(host.run(["ip", "-j", "link", "show", "master", "br0"]).stdout)}
    assert "eth0" in ports and len(ports) == 2, ports

    # Its address comes from the LAN's DHCP server, not from vmkit.
    (addr,) = agent_ipv4(d, "bg")
    ip = addr["address"].split("/")[0]
    assert _in_pool(ip) and addr["address"].endswith("/24") and addr["mac"] == mac, addr
    lease_lines = bridged.leases.read_text().split("\n")
    assert any(f" {mac} {ip} " in f" {line} " for line in lease_lines), lease_lines
    assert j(d, "vm", "ifaddr", "bg") == []  # no vmkit dnsmasq serves a bridge network: no lease to report
    assert j(d, "network", "leases", "lan") == []
    left = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in host.pids()]
    assert "dnsmasq" not in left, left

    # On the LAN itself, not behind NAT: it reaches the LAN's server, which sees its own MAC; the host reaches it.
    assert guest_pings(d, "bg", LAN)
    assert guest_pings(d, "bg", HOST)
    neigh = json.loads(lan.run(["ip", "-j", "neigh", "show", ip]).stdout)
    assert [n["lladdr"] for n in neigh] == [mac], neigh
    assert host.run(["busybox", "ping", "-c", "1", "-W", "2", ip], check=False).returncode == 0
    assert lan.run(["busybox", "ping", "-c", "1", "-W", "2", ip], check=False).returncode == 0

    # vmkit filters nothing on a bridge network: a table of its own, if any, holds no rule.
    tables = vmkit_rules(host)
    assert tables.get("vmkit-lan", []) == [], tables
    assert not [r for rules in tables.values() for r in rules if "br0" in json.dumps(r)], tables

    # Deleting the network leaves the host's bridge as it was: vmkit did not make it.
    d.cli("vm", "stop", "bg", "--force")
    d.cli("vm", "delete", "bg")
    d.cli("network", "delete", "lan")
    (br,) = json.loads(host.run(["ip", "-j", "-4", "addr", "show", "dev", "br0"]).stdout)
    assert [(a["local"], a["prefixlen"]) for a in br["addr_info"]] == [(HOST, 24)]
    assert {p["ifname"] for p in json.loads(host.run(["ip", "-j", "link", "show", "master", "br0"]).stdout)} == {"eth0"}
    assert host.run(["busybox", "ping", "-c", "1", "-W", "2", LAN], check=False).returncode == 0
    assert "vmkit-lan" not in vmkit_rules(host)
    left = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in host.pids()]
    assert "qemu-system-x86" not in left, left


# Two bugs found while writing this module, fixed since; these tests keep them fixed.


def test_bridge_network_refuses_a_link_that_is_no_bridge(bridged: Lan) -> None:
    d = bridged.d
    try:
        res = d.cli("network", "create", "notbr", "--mode", "bridge", "--bridge", "eth0", check=False)
        assert res.returncode != 0 and "not a bridge" in res.stderr, res.stdout
    finally:
        d.cli("network", "delete", "notbr", check=False)


def test_daemon_restart_keeps_a_joined_host_bridge_named_like_vmkits(bridged: Lan) -> None:
    d, host = bridged.d, bridged.host
    host.run(["ip", "link", "add", "vk-host", "type", "bridge"])
    try:
        d.cli("network", "create", "vkh", "--mode", "bridge", "--bridge", "vk-host")
        d.stop()
        d.start()
        assert host.run(["ip", "link", "show", "dev", "vk-host"], check=False).returncode == 0, "vk-host deleted"
    finally:
        d.cli("network", "delete", "vkh", check=False)
        host.run(["ip", "link", "del", "vk-host"], check=False)


def test_bridge_network_made_on_an_uplink(bridged: Lan) -> None:
    """`--uplink`: vmkit makes the bridge, moving the NIC's address and routes over, and moves them back on delete."""
    d, host, lan = bridged.d, bridged.host, bridged.lan
    veth(host, "up0", lan, "up0p")
    host.run(["ip", "addr", "add", "203.0.113.2/24", "dev", "up0"])
    lan.run(["ip", "addr", "add", "203.0.113.1/24", "dev", "up0p"])
    host.run(["ip", "route", "add", "192.0.2.128/25", "via", "203.0.113.1"])
    try:
        n = json.loads(d.cli("network", "create", "upl", "--mode", "bridge", "--bridge", "vk-upbr", "--uplink", "up0",
                             "--json").stdout)  # fmt: skip
        assert n["bridge"] == "vk-upbr" and n["active"]

        def addrs(dev: str) -> str:
            return host.run(["ip", "-o", "-4", "addr", "show", "dev", dev]).stdout

        assert "203.0.113.2/24" in addrs("vk-upbr") and "203.0.113.2" not in addrs("up0")
        assert "vk-upbr" in host.run(["ip", "route", "show", "192.0.2.128/25"]).stdout
        assert host.run(["busybox", "ping", "-c", "1", "-W", "2", "203.0.113.1"], check=False).returncode == 0
        d.cli("network", "delete", "upl")
        assert host.run(["ip", "link", "show", "dev", "vk-upbr"], check=False).returncode != 0
        assert "203.0.113.2/24" in addrs("up0")
        assert "up0" in host.run(["ip", "route", "show", "192.0.2.128/25"]).stdout
    finally:
        d.cli("network", "delete", "upl", check=False)
        host.run(["ip", "link", "del", "up0"], check=False)
