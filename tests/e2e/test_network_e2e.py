"""Networks on real QEMU, every piece inside network namespaces this module makes (tests/netns.py): the
daemon runs in namespace `host`, so its bridges, taps, dnsmasq and nftables tables live there; `lan` is a
simulated uplink (198.51.100.0/24, a documentation range) joined to `host` by a veth. Nothing reaches the
machine's own namespace or any outside address."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_QEMU, Daemon
from tests.e2e.guest import boot
from tests.netns import Netns, daemon_in, namespaces, veth

UPLINK_HOST, UPLINK_LAN = "198.51.100.2", "198.51.100.1"


@pytest.fixture(scope="module")
def net() -> Iterator[tuple[Daemon, Netns, Netns]]:
    with namespaces("host", "lan") as (host, lan):
        veth(host, "uplink0", lan, "eth0")
        host.run(["ip", "addr", "add", f"{UPLINK_HOST}/24", "dev", "uplink0"])
        lan.run(["ip", "addr", "add", f"{UPLINK_LAN}/24", "dev", "eth0"])
        host.run(["ip", "route", "add", "default", "via", UPLINK_LAN])
        with daemon_in(host, "vmkit-net-") as d:
            yield d, host, lan


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


def sh(d: Daemon, vm: str, script: str, check: bool = True) -> Any:
    res = d.cli("vm", "exec", vm, "--", "sh", "-c", script, check=check)
    return res


def lease_of(d: Daemon, vm: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        addrs = j(d, "vm", "ifaddr", vm)
        if addrs:
            return str(addrs[0]["address"])
        time.sleep(0.3)
    raise AssertionError(f"{vm}: no DHCP lease; serial: {d.cli('vm', 'log', vm).stdout[-800:]}")


def pings(d: Daemon, vm: str, ip: str) -> bool:
    return sh(d, vm, f"ping -c 1 -W 2 {ip} >/dev/null 2>&1", check=False).returncode == 0


def test_isolated_networks(net: tuple[Daemon, Netns, Netns]) -> None:
    d, host, _ = net
    j(d, "network", "create", "iso1", "--mode", "isolated", "--subnet", "192.168.210.0/24")
    j(d, "network", "create", "iso2", "--mode", "isolated", "--subnet", "192.168.211.0/24")
    # Refused up front: an overlapping subnet, a bad CIDR, a bad name.
    assert "overlaps" in d.cli("network", "create", "x", "--subnet", "192.168.210.128/25", check=False).stderr
    assert d.cli("network", "create", "x", "--subnet", "300.1.2.0/24", check=False).returncode != 0
    assert d.cli("network", "create", "../x", check=False).returncode != 0
    for name, network in (("ia", "iso1"), ("ib", "iso1"), ("ic", "iso2")):
        boot(d, name, "--network", network, wait=False)
    for name in ("ia", "ib", "ic"):
        d.cli("vm", "wait", name, "--for", "agent", "--timeout", "90")
    a, b, c = (lease_of(d, n) for n in ("ia", "ib", "ic"))
    assert a.startswith("192.168.210.") and b.startswith("192.168.210.") and c.startswith("192.168.211.")
    leases = {ls["vm"]: ls for ls in j(d, "network", "leases", "iso1")}
    assert set(leases) == {"ia", "ib"} and leases["ia"]["ip"] == a
    assert pings(d, "ia", b) and pings(d, "ib", a)
    assert not pings(d, "ic", a)  # another isolated network: no way across
    assert not pings(d, "ia", UPLINK_LAN)  # and no way out
    # /metrics counts each tap NIC's traffic, from the guest's side, under libvirt's names.
    deadline = time.monotonic() + 10
    sent = 0.0
    while sent == 0 and time.monotonic() < deadline:
        text = d.api.get("/metrics", raw=True).decode()
        for line in text.splitlines():
            if line.startswith("libvirt_domain_interface_stats_transmit_packets_total") and 'domain="ia"' in line:
                assert 'target_device="vk-ia-0"' in line and 'virtual_interface="net0"' in line, line
                sent = float(line.rsplit(" ", 1)[1])
        time.sleep(0.5)
    assert sent > 0  # DHCP and pings went out of ia
    # What vmkit built lives in the host namespace (not the machine's): bridges, taps, tables, dnsmasq.
    links = host.run(["ip", "-o", "link"]).stdout
    assert "vk-iso1" in links and "vk-ia-0" in links
    assert "vmkit" in host.run(["nft", "list", "tables"]).stdout


def test_two_daemons_share_a_host(net: tuple[Daemon, Netns, Netns]) -> None:
    """A second vmkit (another state dir) on the same host: same network names, its own bridges and tables, and
    neither its start nor its stop touches the first one's."""
    d, host, _ = net
    tables = host.run(["nft", "list", "tables"]).stdout
    with daemon_in(host, "vmkit-net2-", {"VMKIT_QEMU": str(FAKE_QEMU)}, demo=False) as other:
        n = j(other, "network", "create", "iso1", "--mode", "isolated", "--subnet", "192.168.220.0/24")
        assert n["bridge"] != "vk-iso1"  # the first daemon's iso1 has that one
        assert f"vmkit-{n['bridge']}" in host.run(["nft", "list", "tables"]).stdout
        other.stop()
        other.start()  # its start removes nothing of the first daemon's
        other.cli("network", "delete", "iso1")
    assert host.run(["nft", "list", "tables"]).stdout == tables
    assert pings(d, "ia", lease_of(d, "ib"))


def test_nat_reaches_the_uplink_as_the_host(net: tuple[Daemon, Netns, Netns]) -> None:
    d, _, lan = net
    j(d, "network", "create", "nat1", "--mode", "nat", "--subnet", "192.168.212.0/24")
    boot(d, "na", "--network", "nat1", wait=False)
    d.cli("vm", "wait", "na", "--for", "agent", "--timeout", "90")
    assert lease_of(d, "na").startswith("192.168.212.")
    # A TCP server on the simulated LAN says who connected.
    server = lan.popen(
        ["python3", "-c",
         "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
         f"s.bind(('{UPLINK_LAN}', 8080)); s.listen(1); c, peer = s.accept(); print(peer[0], peer[1], flush=True)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        assert pings(d, "na", UPLINK_LAN)
        sh(d, "na", f"echo hi | nc {UPLINK_LAN} 8080", check=False)
        out, _ = server.communicate(timeout=10)
    finally:
        server.kill()
    peer_ip, peer_port = out.split()
    assert peer_ip == UPLINK_HOST  # masqueraded behind the uplink's address
    assert int(peer_port) >= 1024  # never a privileged source port on the host's address
    # A port forward: the LAN host opens a TCP connection to the host's uplink address and lands in the guest.
    address = lease_of(d, "na")
    fwd = j(d, "network", "forward", "add", "nat1", "--host-port", "8022", "--to", "na:7000")["forwards"]
    assert fwd == [{"proto": "tcp", "host_port": 8022, "vm": "na", "vm_port": 7000, "mac": fwd[0]["mac"],
                    "address": address}]  # fmt: skip
    assert "already goes to" in d.cli("network", "forward", "add", "nat1", "--host-port", "8022", "--to", "na:1",
                                      check=False).stderr  # fmt: skip
    # All three streams away from the agent's pipes, or exec waits for the background job to end.
    sh(d, "na", "(echo hello-from-the-guest | nc -l -p 7000) </dev/null >/dev/null 2>&1 &")
    time.sleep(0.5)
    got = lan.python(
        "import socket; s = socket.create_connection(('" + UPLINK_HOST + "', 8022), timeout=5); "
        "print(s.recv(100).decode().strip())"
    ).stdout.strip()
    assert got == "hello-from-the-guest"
    d.cli("network", "forward", "delete", "nat1", "--host-port", "8022")
    refused = lan.python(
        "import socket\ntry:\n    socket.create_connection(('"
        + UPLINK_HOST
        + "', 8022), timeout=3)\n    print('open')\n"
        "except OSError:\n    print('closed')"
    ).stdout.strip()
    assert refused == "closed"


def test_nic_hotplug_seen_by_the_guest(net: tuple[Daemon, Netns, Netns]) -> None:
    d, host, _ = net
    before = sh(d, "ia", "ls /sys/class/net").stdout.split()
    nics = j(d, "vm", "attach-nic", "ia", "iso2")
    new = nics[-1]
    assert (new["name"], new["network"]) == ("net1", "iso2")
    deadline = time.monotonic() + 20
    while len(sh(d, "ia", "ls /sys/class/net").stdout.split()) == len(before) and time.monotonic() < deadline:
        time.sleep(0.3)
    after = sh(d, "ia", "ls /sys/class/net").stdout.split()
    (added,) = set(after) - set(before)
    # The guest brings it up and gets a lease on iso2 from that network's dnsmasq.
    sh(d, "ia", f"ip link set {added} up; udhcpc -i {added} -n -q -t 5 -s /etc/udhcpc/default.script >/dev/null 2>&1")
    addrs = {a["network"]: a["address"] for a in j(d, "vm", "ifaddr", "ia")}
    assert addrs["iso2"].startswith("192.168.211."), addrs
    assert "vk-ia-1" in host.run(["ip", "-o", "link"]).stdout
    j(d, "vm", "detach-nic", "ia", "net1")
    assert sh(d, "ia", "ls /sys/class/net").stdout.split() == before
    assert "vk-ia-1" not in host.run(["ip", "-o", "link"]).stdout  # the tap went with QEMU's descriptor
    assert [n["name"] for n in d.vm("ia")["nics"]] == ["net0"]


def test_daemon_killed_then_back_and_cleanup(net: tuple[Daemon, Netns, Netns]) -> None:
    d, host, _ = net
    a, b = (lease_of(d, n) for n in ("ia", "ib"))
    # A VM with two NICs on one network: one DNS name each (the VM's, then VM-netN).
    d.cli("vm", "create", "two", "--network", "iso1", "--network", "iso1")
    hostsfile = d.run_dir / "networks" / "iso1" / "dnsmasq.hostsfile"
    d.kill9()
    d.start()
    assert pings(d, "ia", b) and pings(d, "ib", a)  # guests kept their network through the daemon's death
    # dnsmasq knows every VM's name again after the restart: guests resolve each other.
    names = hostsfile.read_text()
    assert all(n in names for n in (",ia", ",ib", ",two", ",two-net1")), names
    assert b in sh(d, "ia", "nslookup ib 192.168.210.1").stdout
    d.cli("vm", "delete", "two")
    for vm in ("ia", "ib", "ic", "na"):
        d.cli("vm", "stop", vm, "--force")
    assert "used by" in d.cli("network", "delete", "iso1", check=False).stderr
    for vm in ("ia", "ib", "ic", "na"):
        d.cli("vm", "delete", vm)
    for n in ("iso1", "iso2", "nat1"):
        d.cli("network", "delete", n)
    links = host.run(["ip", "-o", "link"]).stdout
    assert "vk-" not in links, links
    assert "vmkit" not in host.run(["nft", "list", "tables"]).stdout
    left = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in host.pids()]
    assert "dnsmasq" not in left and "qemu-system-x86" not in left, left
