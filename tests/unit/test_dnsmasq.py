"""vmkit.net.dnsmasq: golden conf files and parsers (pure), then a real dnsmasq serving real DHCP and DNS clients,
always inside network namespaces this test creates and deletes.

Regenerate the golden files with: VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_dnsmasq.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import signal
import stat
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Netns, namespaces, veth
from vmkit.errors import InvalidInput
from vmkit.net import dnsmasq
from vmkit.net.dnsmasq import DnsmasqConfig, Host, Lease

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

CFG = DnsmasqConfig(
    network="default",
    bridge="virbr0",
    gateway="192.168.122.1",
    prefix_len=24,
    dhcp_range=("192.168.122.2", "192.168.122.254"),
    domain="default",
    directory=Path("/run/vmkit/networks/default"),
)
CASES = {
    "dhcp": CFG,
    "dns-only": dataclasses.replace(
        CFG, network="iso", bridge="vk-iso", dhcp_range=None, domain="iso", directory=Path("/run/vmkit/networks/iso")
    ),
}


# ----- pure ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_golden(case: str) -> None:
    text = dnsmasq.config_text(CASES[case])
    golden = GOLDEN / f"dnsmasq-{case}.conf"
    if os.environ.get("VMKIT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"config changed; regenerate with VMKIT_REGEN_GOLDEN=1 and review {golden}"


def test_config_listens_only_on_its_bridge() -> None:
    for cfg in CASES.values():
        lines = dnsmasq.config_text(cfg).splitlines()
        assert f"interface={cfg.bridge}" in lines and "except-interface=lo" in lines and "bind-dynamic" in lines
        assert [ln for ln in lines if ln.startswith("interface=")] == [f"interface={cfg.bridge}"]
        assert not [ln for ln in lines if ln.startswith(("listen-address", "server=", "resolv-file", "no-daemon"))]
        assert "no-resolv" in lines and "no-hosts" in lines
    assert not [ln for ln in dnsmasq.config_text(CASES["dns-only"]).splitlines() if ln.startswith("dhcp-")]


HOSTS = [
    Host(mac="52:54:00:00:00:01", ip="192.168.122.50", name="alpha"),
    Host(mac="52:54:00:00:00:02", ip=None, name="web_1"),
    Host(mac="52:54:00:00:00:03", ip="192.168.122.51", name="dotted.name"),  # no DNS name: it has a dot
    Host(mac="52:54:00:00:00:04", ip=None, name="dot.ted"),  # nothing to tell dnsmasq
]


def test_host_files() -> None:
    assert dnsmasq.dhcp_hosts_text(CFG, HOSTS) == (
        "52:54:00:00:00:01,192.168.122.50,alpha\n52:54:00:00:00:02,web_1\n52:54:00:00:00:03,192.168.122.51\n"
    )
    assert dnsmasq.addn_hosts_text(CFG, HOSTS) == "192.168.122.50 alpha alpha.default\n"
    assert dnsmasq.dhcp_hosts_text(CFG, []) == dnsmasq.addn_hosts_text(CFG, []) == ""


@pytest.mark.parametrize(
    "hosts",
    [
        [Host("52:54:00:00:00:01", "192.168.122.50", "a"), Host("52:54:00:00:00:01", None, "b")],
        [Host("52:54:00:00:00:01", "192.168.122.50", "a"), Host("52:54:00:00:00:02", "192.168.122.50", "b")],
        [Host("52:54:00:00:00:01", None, "a"), Host("52:54:00:00:00:02", None, "A")],
        [Host("52:54:00:00:00:01", "192.168.123.5", "a")],  # off the subnet
        [Host("52:54:00:00:00:01", "192.168.122.1", "a")],  # the gateway
        [Host("52:54:00:00:00:01", "192.168.122.255", "a")],  # broadcast
    ],
)
def test_bad_host_lists_are_refused(hosts: list[Host]) -> None:
    with pytest.raises(InvalidInput):
        dnsmasq.dhcp_hosts_text(CFG, hosts)


@pytest.mark.parametrize(
    "kw",
    [
        {"mac": "52:54:00:00:00:0G"},
        {"mac": "52:54:00:00:00:01\n"},
        {"mac": "52:54:00:00:00:01,set:x"},
        {"ip": "192.168.122.300"},
        {"ip": "fe80::1"},
        {"name": "a\nb"},
        {"name": "a,b"},
        {"name": ""},
    ],
)
def test_bad_hosts_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        Host(**{"mac": "52:54:00:00:00:01", "ip": None, "name": "a", **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {"bridge": "virbr0\ndhcp-script=/tmp/x"},
        {"bridge": "a" * 16},
        {"network": "a b"},
        {"domain": "x\nserver=8.8.8.8"},
        {"domain": "a..b"},
        {"domain": "a/b"},
        {"directory": Path("/run/x\ndhcp-script=/tmp/x")},
        {"directory": Path("/run/a b")},
        {"directory": Path("/run/a,b")},
        {"directory": Path("relative")},
        {"gateway": "192.168.122.0"},
        {"gateway": "::1"},
        {"prefix_len": 31},
        {"dhcp_range": ("192.168.122.1", "192.168.122.254")},  # includes the gateway
        {"dhcp_range": ("192.168.122.200", "192.168.122.100")},
        {"dhcp_range": ("192.168.122.2", "192.168.123.254")},
        {"user": "root\n"},
        {"group": "a b"},
    ],
)
def test_bad_configs_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        dataclasses.replace(CFG, **kw)


LEASES = """\
1764150000 52:54:00:aa:00:01 192.168.201.23 web 01:52:54:00:aa:00:01
0 52:54:00:AA:00:02 192.168.201.50 * *
1764150100 52:54:00:aa:00:03 192.168.201.24 * ff:00:00:00:01:00:01:2c:6b:9e:8f:52:54:00:aa:00:03
duid 00:01:00:01:2c:6b:9e:8f:52:54:00:12:34:56
1764150200 12345678 fd00::10 web6 00:01:00:01:2c:6b:9e:8f:52:54:00:aa:00:04
1764150300 52:54:00:aa:00:05 192.168.201
1764150300 52:54:00:aa
"""


def test_parse_leases() -> None:
    assert dnsmasq.parse_leases(LEASES) == [
        Lease(1764150000, "52:54:00:aa:00:01", "192.168.201.23", "web", "01:52:54:00:aa:00:01"),
        Lease(0, "52:54:00:aa:00:02", "192.168.201.50", None, None),
        Lease(
            1764150100,
            "52:54:00:aa:00:03",
            "192.168.201.24",
            None,
            "ff:00:00:00:01:00:01:2c:6b:9e:8f:52:54:00:aa:00:03",
        ),
    ]
    assert dnsmasq.parse_leases("") == []


# ----- a real dnsmasq, in namespaces -------------------------------------------------------------------------

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("busybox") and os.path.exists(dnsmasq.DNSMASQ)),
    reason="needs root, iproute2, dnsmasq and busybox to run dnsmasq in network namespaces",
)

GUEST_MAC = "52:54:00:aa:00:01"  # dynamic address, named `web` through its dhcp-host line
STATIC_MAC = "52:54:00:aa:00:02"  # `alpha`, fixed at .50
OTHER_MAC = "52:54:00:aa:00:03"  # on the second network

# A DNS A query over UDP: prints the rcode and the addresses, "timeout" if no answer comes, "unreachable" if an
# ICMP port unreachable does (nothing listens there). argv: NAME SERVER.
DNS_PROBE = textwrap.dedent(
    """
    import socket, struct, sys
    name, server = sys.argv[1], sys.argv[2]
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.connect((server, 53))
    try:
        s.send(query)
        data = s.recv(4096)
    except TimeoutError:
        sys.exit(print("timeout"))
    except ConnectionRefusedError:
        sys.exit(print("unreachable"))
    rcode, count = data[3] & 0xF, struct.unpack(">H", data[6:8])[0]
    off, addrs = len(query), []
    for _ in range(count):
        while data[off] and data[off] < 0xC0:
            off += data[off] + 1
        off += 2 if data[off] else 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[off : off + 10])
        if rtype == 1:
            addrs.append(socket.inet_ntoa(data[off + 10 : off + 14]))
        off += 10 + rdlen
    print(f"rcode={rcode} " + ",".join(addrs))
    """
)

# udhcpc runs this at each DHCP event: print what it was offered, and take the address on eth0 only (the other
# interfaces only ask).
UDHCPC_SCRIPT = """#!/bin/sh
if [ "$1" = bound ]; then
    echo "LEASE $interface ip=$ip mask=$subnet router=$router dns=$dns domain=$domain"
    if [ "$interface" = eth0 ]; then ip addr add "$ip/$mask" dev "$interface"; fi
fi
exit 0
"""


def dns(ns: Netns, name: str, server: str) -> str:
    return ns.run([sys.executable, "-c", DNS_PROBE, name, server]).stdout.strip()


def dhcp(ns: Netns, iface: str, script: Path) -> str:
    """Ask for a lease on iface; the address offered."""
    res = ns.run(["busybox", "udhcpc", "-i", iface, "-n", "-q", "-t", "5", "-T", "1", "-s", str(script)], check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(f"LEASE {iface} ")]
    assert res.returncode == 0 and lines, res.stdout + res.stderr
    return lines[-1].split()[2].removeprefix("ip=")


def call(ns: Netns, fn: str, cfg: DnsmasqConfig, hosts: list[Host] | None = None) -> Any:
    """dnsmasq.fn(cfg[, hosts]) run by a Python process of its own inside ns (it exits afterwards); its result,
    or {"error": class, "message": ...}; with "start_s" the call's duration."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["directory"] = str(cfg.directory)
    args = "cfg" if hosts is None else "cfg, hosts"
    host_rows = json.dumps([dataclasses.astuple(h) for h in hosts or []])
    code = textwrap.dedent(
        f"""
        import json, time
        from pathlib import Path
        from vmkit.errors import VmkitError
        from vmkit.net import dnsmasq
        fields = json.loads({json.dumps(json.dumps(fields))})
        fields["directory"] = Path(fields["directory"])
        fields["dhcp_range"] = tuple(fields["dhcp_range"]) if fields["dhcp_range"] else None
        cfg = dnsmasq.DnsmasqConfig(**fields)
        hosts = [dnsmasq.Host(*h) for h in json.loads({json.dumps(host_rows)})]
        t = time.perf_counter()
        try:
            out = {{"result": dnsmasq.{fn}({args})}}
        except VmkitError as e:
            out = {{"error": type(e).__name__, "message": e.message}}
        out["start_s"] = time.perf_counter() - t
        print(json.dumps(out))
        """
    )
    res = ns.python(code, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A directory dnsmasq's user can reach (pytest's tmp_path sits under a 0700 directory: it could not)."""
    d = Path(tempfile.mkdtemp(prefix="vmkit-dnsmasq-", dir="/tmp"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        for sub in d.iterdir():
            if sub.is_dir():
                dnsmasq.stop_dir(sub)
        shutil.rmtree(d)


def _bridge(ns: Netns, name: str, address: str) -> None:
    ns.run(["ip", "link", "add", name, "type", "bridge", "forward_delay", "0"])
    ns.run(["ip", "addr", "add", address, "dev", name])
    ns.run(["ip", "link", "set", name, "up"])


def _cfg(base: Path, network: str, bridge: str, third: int) -> DnsmasqConfig:
    return DnsmasqConfig(
        network=network,
        bridge=bridge,
        gateway=f"192.168.{third}.1",
        prefix_len=24,
        dhcp_range=(f"192.168.{third}.2", f"192.168.{third}.40"),
        domain=network,
        directory=base / network,
    )


@needs_netns
def test_real_dnsmasq(base_dir: Path) -> None:
    script = base_dir / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    with namespaces("host", "guest", "outside") as (host, guest, outside):
        # host: bridges br0 (192.168.201.1/24) and br1 (192.168.202.1/24), another link with 10.99.0.1, a veth to
        # `outside` (10.98.0.1). guest: eth0 and eth1 on br0, eth2 on br1.
        _bridge(host, "br0", "192.168.201.1/24")
        _bridge(host, "br1", "192.168.202.1/24")
        for port, iface, mac, bridge in [
            ("p0", "eth0", GUEST_MAC, "br0"),
            ("p1", "eth1", STATIC_MAC, "br0"),
            ("p2", "eth2", OTHER_MAC, "br1"),
        ]:
            veth(host, port, guest, iface)
            host.run(["ip", "link", "set", port, "master", bridge])
            guest.run(["ip", "link", "set", iface, "address", mac])
        _bridge(host, "other0", "10.99.0.1/24")  # no dummy driver here; a bridge with no ports does as well
        veth(host, "out0", outside, "eth0")
        host.run(["ip", "addr", "add", "10.98.0.1/24", "dev", "out0"])
        outside.run(["ip", "addr", "add", "10.98.0.2/24", "dev", "eth0"])
        outside.run(["ip", "route", "add", "192.168.201.0/24", "via", "10.98.0.1"])

        cfg = _cfg(base_dir, "net1", "br0", 201)
        hosts = [Host(GUEST_MAC, None, "web"), Host(STATIC_MAC, "192.168.201.50", "alpha")]
        out = call(host, "start", cfg, hosts)
        pid = out["result"]
        print(f"\ndnsmasq start() took {out['start_s'] * 1000:.1f} ms")

        # It outlived the process that started it, in a session of its own, as the dnsmasq user; a later process
        # finds it by its pid file.
        assert dnsmasq.running(cfg) == pid
        assert os.getsid(pid) != os.getsid(0) and os.getpgid(pid) != os.getpgid(0)
        status = Path(f"/proc/{pid}/status").read_text()
        uid = pwd.getpwnam(cfg.user).pw_uid
        assert f"\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n" in status
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != os.getpid()
        modes = {p.name: (p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)) for p in cfg.directory.iterdir()}
        assert modes == {
            "dnsmasq.conf": (0, 0o600),
            "dnsmasq.hostsfile": (uid, 0o600),
            "dnsmasq.addnhosts": (uid, 0o600),
            "dnsmasq.leases": (uid, 0o600),
            "dnsmasq.pid": (uid, 0o644),
        }
        assert stat.S_IMODE(cfg.directory.stat().st_mode) == 0o710 and cfg.directory.stat().st_uid == 0

        # DHCP: a dynamic address for the guest, named `web`; .50 for the static host.
        ip = dhcp(guest, "eth0", script)
        assert ip.startswith("192.168.201.") and 2 <= int(ip.rsplit(".", 1)[1]) <= 40
        assert dhcp(guest, "eth1", script) == "192.168.201.50"
        by_mac = {ls.mac: ls for ls in dnsmasq.leases(cfg)}
        assert by_mac[GUEST_MAC].ip == ip and by_mac[GUEST_MAC].hostname == "web"
        assert by_mac[STATIC_MAC].ip == "192.168.201.50" and by_mac[STATIC_MAC].expires > time.time()

        # DNS: static names, the lease's name, NAME.DOMAIN; nothing forwarded.
        res = guest.run(["busybox", "nslookup", "alpha", "192.168.201.1"], check=False)
        assert "192.168.201.50" in res.stdout, res.stdout + res.stderr
        assert dns(guest, "alpha.net1", "192.168.201.1") == "rcode=0 192.168.201.50"
        assert dns(guest, "web", "192.168.201.1") == f"rcode=0 {ip}"
        assert dns(guest, "web.net1", "192.168.201.1") == f"rcode=0 {ip}"
        assert dns(guest, "nosuch", "192.168.201.1") == "rcode=3"  # NXDOMAIN
        assert dns(guest, "nosuch.net1", "192.168.201.1") == "rcode=3"
        assert dns(guest, "example.com", "192.168.201.1") == "rcode=5"  # REFUSED: no upstream

        # Only the bridge's address: not another address of the host (reached over the bridge or from the host
        # itself), and not the bridge's address reached through another interface (CVE-2012-3411).
        guest.run(["ip", "route", "add", "10.99.0.0/24", "via", "192.168.201.1"])
        assert dns(guest, "alpha", "10.99.0.1") == "unreachable"
        assert dns(host, "alpha", "10.99.0.1") == "unreachable"
        assert dns(host, "alpha", "127.0.0.1") == "unreachable"
        assert dns(outside, "alpha", "192.168.201.1") in ("timeout", "unreachable")
        assert dns(host, "alpha", "192.168.201.1") == "rcode=0 192.168.201.50"  # the host itself may ask, as libvirt's

        # reload: a new name, served at once.
        dnsmasq.reload(cfg, [*hosts, Host("52:54:00:aa:00:09", "192.168.201.60", "beta")])
        assert dns(guest, "beta", "192.168.201.1") == "rcode=0 192.168.201.60"
        assert dnsmasq.running(cfg) == pid

        # start() refuses a second start; ensure() keeps it, or restarts it once it has died or its settings
        # changed; a dnsmasq that cannot bind says why.
        assert call(host, "start", cfg, hosts)["error"] == "Conflict"
        assert call(host, "ensure", cfg, hosts)["result"] == pid
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: dnsmasq.running(cfg) is None)
        pid = call(host, "ensure", cfg, hosts)["result"]
        assert dnsmasq.running(cfg) == pid
        assert {ls.mac for ls in dnsmasq.leases(cfg)} >= {GUEST_MAC, STATIC_MAC}  # kept across the restart
        wider = dataclasses.replace(cfg, dhcp_range=("192.168.201.2", "192.168.201.45"))
        new_pid = call(host, "ensure", wider, hosts)["result"]
        assert new_pid != pid and dnsmasq.running(wider) == new_pid and gone(pid)
        pid = new_pid
        clash = dataclasses.replace(cfg, network="clash", directory=base_dir / "clash")
        err = call(host, "start", clash, [])
        assert err["error"] == "CommandFailed" and "Address already in use" in err["message"], err
        assert dnsmasq.running(clash) is None
        assert call(host, "start", dataclasses.replace(clash, bridge="nosuch0"), [])["error"] == "Conflict"

        # A second network on a second bridge, side by side.
        cfg2 = _cfg(base_dir, "net2", "br1", 202)
        pid2 = call(host, "start", cfg2, [Host(OTHER_MAC, "192.168.202.33", "other")])["result"]
        assert pid2 != pid and dnsmasq.running(cfg) == pid and dnsmasq.running(cfg2) == pid2
        assert dhcp(guest, "eth2", script) == "192.168.202.33"
        assert [ls.mac for ls in dnsmasq.leases(cfg2)] == [OTHER_MAC]
        assert dns(guest, "alpha", "192.168.201.1") == "rcode=0 192.168.201.50"

        # stop() ends each; a second stop() is a no-op.
        dnsmasq.stop(cfg)
        assert dnsmasq.running(cfg) is None and gone(pid) and not cfg.pid_file.exists()
        assert dnsmasq.running(cfg2) == pid2
        dnsmasq.stop(cfg2)
        dnsmasq.stop(cfg2)
        assert dnsmasq.running(cfg2) is None and gone(pid2)
        assert host.pids() == []


@needs_netns
def test_unreachable_directory_is_refused(base_dir: Path) -> None:
    """dnsmasq reads its host lists after dropping root: a directory it cannot reach would leave it nameless."""
    closed = base_dir / "closed"
    closed.mkdir(mode=0o700)
    with namespaces("host") as (host,):
        _bridge(host, "br0", "192.168.203.1/24")
        cfg = dataclasses.replace(_cfg(base_dir, "net3", "br0", 203), directory=closed / "net3")
        err = call(host, "start", cfg, [])
        assert err["error"] == "Conflict" and f"{closed} is not searchable" in err["message"], err
        assert dnsmasq.running(cfg) is None and host.pids() == []


def test_stop_and_running_without_dnsmasq(tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, directory=tmp_path / "none")
    assert dnsmasq.running(cfg) is None and dnsmasq.leases(cfg) == []
    dnsmasq.stop(cfg)
    # A pid file naming some other process (this one) is not taken for dnsmasq.
    cfg.directory.mkdir()
    cfg.pid_file.write_text(f"{os.getpid()}\n")
    assert dnsmasq.running(cfg) is None
    dnsmasq.stop(cfg)
    assert not cfg.pid_file.exists()


def gone(pid: int) -> bool:
    """pid has exited. It may linger as a zombie: dnsmasq is re-parented to PID 1, which need not reap at once
    (this sandbox's does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait(cond: Any, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
