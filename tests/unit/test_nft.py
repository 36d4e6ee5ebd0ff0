"""vmkit.net.nft: golden rulesets (regenerate with VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_nft.py), and the
tables applied for real — including traffic through them — inside network namespaces this test creates and
deletes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.netns import Netns, namespaces, veth
from vmkit.errors import InvalidInput
from vmkit.model.names import valid_name
from vmkit.net import nft
from vmkit.net.nft import Forward, NetRules

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = {
    "nat": NetRules(network="default", mode="nat", bridge="virbr0", subnet="192.168.122.0/24"),
    "isolated": NetRules(network="lab", mode="isolated", bridge="vk-lab", subnet="10.10.0.0/16"),
    "bridge": NetRules(network="lan", mode="bridge", bridge="br0", subnet=None),
    "nat-forwards": NetRules(
        network="default",
        mode="nat",
        bridge="virbr0",
        subnet="192.168.122.0/24",
        forwards=(Forward("tcp", 8080, "192.168.122.10", 80), Forward("udp", 5353, "192.168.122.11", 53)),
    ),
}

needs_nft = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="needs root, nft and iproute2 to make network namespaces",
)


@pytest.mark.parametrize("mode", sorted(CASES))
def test_ruleset_golden(mode: str) -> None:
    text = json.dumps(nft.ruleset(CASES[mode]), indent=2) + "\n"
    golden = GOLDEN / f"nft-{mode}.json"
    if os.environ.get("VMKIT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"ruleset changed; regenerate with VMKIT_REGEN_GOLDEN=1 and review {golden}"


def test_ruleset_replaces_only_its_own_table() -> None:
    for rules in CASES.values():
        cmds = nft.ruleset(rules)["nftables"]
        table = nft.table_name(rules.network)
        assert [next(iter(c)) for c in cmds[:4]] == ["metainfo", "add", "delete", "add"]
        assert cmds[1] == cmds[3] == {"add": {"table": {"family": "inet", "name": table}}}
        for cmd in cmds[1:]:
            ((verb, obj),) = cmd.items()
            assert verb in ("add", "delete")  # never flush, never another table
            ((kind, body),) = obj.items()
            assert body.get("table", body.get("name")) == table, cmd


def test_nat_never_masquerades_to_privileged_ports_or_link_local_multicast() -> None:
    rules = [c["add"]["rule"] for c in nft.ruleset(CASES["nat"])["nftables"] if "rule" in c.get("add", {})]
    post = [r["expr"] for r in rules if r["chain"] == "postrouting"]
    masq = [e for e in post if "masquerade" in e[-1]]
    ported = [e for e in masq if e[-1]["masquerade"]]
    assert {e[0]["match"]["right"] for e in ported} == {"tcp", "udp"}
    assert all(e[-1]["masquerade"] == {"port": {"range": [1024, 65535]}} for e in ported)
    # The returns for 224.0.0.0/24 and 255.255.255.255 come before any masquerade.
    assert [e[-1] for e in post[:2]] == [{"return": None}, {"return": None}]
    assert [e[1]["match"]["right"] for e in post[:2]] == [
        {"prefix": {"addr": "224.0.0.0", "len": 24}},
        "255.255.255.255",
    ]


@pytest.mark.parametrize(
    "network",
    ["default", "a", "A", "a.b", "a_b", "a-b", "a..b", "a-", "9", "1.2.3.4", "x" * 63, "ip", "inet", "table"],
)
def test_table_name_is_valid(network: str) -> None:
    name = nft.table_name(network)
    assert name.startswith(nft.TABLE_PREFIX)
    # nft's identifier syntax: a letter, then letters, digits, / \ _ . - (scanner.l, `string`)
    assert name[0].isalpha() and all(c.isalnum() or c in "/\\_.-" for c in name)
    assert name.isascii() and len(name) < 256  # NFT_NAME_MAXLEN


def test_table_name_is_unique() -> None:
    names = ["default", "Default", "a.b", "a_b", "a-b", "ab", "a", "a.", "a..", "lab", "lab1", "1lab"]
    assert all(valid_name(n) for n in names)
    assert len({nft.table_name(n) for n in names}) == len(names)


@pytest.mark.parametrize(
    "rules",
    [
        NetRules(network="bad name", mode="nat", bridge="virbr0", subnet="192.168.122.0/24"),
        NetRules(network="x", mode="routed", bridge="virbr0", subnet="192.168.122.0/24"),
        NetRules(network="x", mode="nat", bridge="virbr0", subnet=None),
        NetRules(network="x", mode="nat", bridge="virbr0", subnet="192.168.122.1/24"),  # host bits set
        NetRules(network="x", mode="nat", bridge="virbr0", subnet="fd00::/64"),
        NetRules(network="x", mode="isolated", bridge="a bridge", subnet="192.168.122.0/24"),
        NetRules(network="x", mode="isolated", bridge="b" * 16, subnet="192.168.122.0/24"),
    ],
)
def test_bad_rules_are_refused(rules: NetRules) -> None:
    with pytest.raises(InvalidInput):
        nft.ruleset(rules)


def test_delete_table_refuses_tables_vmkit_does_not_own() -> None:
    with pytest.raises(InvalidInput):
        nft.delete_table("filter")


PRELUDE = "import json, os, time\nfrom vmkit.net import nft, links\nfrom vmkit.net.nft import NetRules\n"


def run_in(ns: Netns, code: str) -> str:
    res = ns.python(PRELUDE + textwrap.dedent(code), check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def listing(ns: Netns, table: str) -> str:
    return ns.run(["nft", "list", "table", "inet", table]).stdout


@needs_nft
def test_each_mode_passes_nft_check() -> None:
    with namespaces("nft") as (ns,):
        for mode, rules in CASES.items():
            res = ns.run(["nft", "-j", "-c", "-f", "-"], input=json.dumps(nft.ruleset(rules)), check=False)
            assert res.returncode == 0, (mode, res.stderr)
        assert ns.run(["nft", "list", "tables"]).stdout == ""  # check mode commits nothing


@needs_nft
def test_apply_is_idempotent_delete_and_list() -> None:
    with namespaces("nft") as (ns,):
        ns.run(["nft", "add", "table", "ip", "other"])  # someone else's: must stay untouched
        ns.run(["nft", "add", "chain", "ip", "other", "myforward", "{ type filter hook forward priority 0; }"])
        out = run_in(
            ns,
            """
            t = time.perf_counter()
            nft.apply(NetRules("default", "nat", "virbr0", "192.168.122.0/24"))
            print(f"{(time.perf_counter() - t) * 1000:.1f}")
            """,
        )
        print(f"nft.apply (nat, first): {out.strip()} ms")
        listed = json.loads(ns.run(["nft", "-j", "list", "table", "inet", "vmkit-default"]).stdout)["nftables"]
        applied = [c["add"] for c in nft.ruleset(CASES["nat"])["nftables"][3:]]
        assert [next(iter(x)) for x in listed[1:]] == [next(iter(a)) for a in applied]  # table, chains, rules
        assert [x["rule"]["expr"] for x in listed if "rule" in x] == [a["rule"]["expr"] for a in applied if "rule" in a]
        first = listing(ns, "vmkit-default")
        assert "masquerade to :1024-65535" in first

        run_in(ns, 'nft.apply(NetRules("default", "nat", "virbr0", "192.168.122.0/24"))')
        assert listing(ns, "vmkit-default") == first  # replaced by the same: nothing doubled

        # Re-applying with other settings replaces the table as a whole.
        run_in(ns, 'nft.apply(NetRules("default", "isolated", "virbr0", "192.168.122.0/24"))')
        assert "masquerade" not in listing(ns, "vmkit-default")
        assert "chain forward" in listing(ns, "vmkit-default")

        out = run_in(
            ns,
            """
            nft.apply(NetRules("lan", "bridge", "br0", None))
            print(json.dumps(nft.vmkit_tables()))
            print(nft.delete("default"), nft.delete("default"))
            print(json.dumps(nft.vmkit_tables()))
            print(nft.delete_table("vmkit-lan"), nft.delete_table("vmkit-lan"))
            print(json.dumps(nft.vmkit_tables()))
            """,
        )
        assert out.splitlines() == ['["vmkit-default", "vmkit-lan"]', "True False", '["vmkit-lan"]', "True False", "[]"]
        assert ns.run(["nft", "list", "tables"]).stdout.split() == ["table", "ip", "other"]
        assert "hook forward" in ns.run(["nft", "list", "table", "ip", "other"]).stdout


@needs_nft
def test_nft_errors_carry_nfts_message() -> None:
    with namespaces("nft") as (ns,):
        out = run_in(
            ns,
            """
            from vmkit.errors import CommandFailed
            try:
                nft._nft({"nftables": [{"add": {"chain": {"family": "inet", "table": "vmkit-none", "name": "x"}}}]})
            except CommandFailed as e:
                print(e.message)
            """,
        )
        assert out.startswith("nft failed:") and "No such file or directory" in out, out


# ---- traffic --------------------------------------------------------------------------------------------------
# vm (192.168.200.10) --veth--> host: bridge vbr0 (192.168.200.1/24) + vmkit table --veth--> out (198.51.100.1)
# host's uplink is 198.51.100.2. out has no route to 192.168.200.0/24 unless a test adds one, so an answer
# reaching the vm proves masquerading.

SERVER = """
import select, socket, sys
kind, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.1", port))
if kind == "tcp":
    s.listen()
print("ready", flush=True)
if not select.select([s], [], [], wait)[0]:
    print("nothing", flush=True)
    sys.exit(0)
peer = s.accept()[1] if kind == "tcp" else s.recvfrom(64)[1]
print(peer[0], peer[1], flush=True)
"""

CLIENT = """
import socket, sys
kind, src, sport = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.settimeout(3)
s.bind((src, sport))  # a privileged source port: masquerading must map it to >= 1024
try:
    if kind == "tcp":
        s.connect(("198.51.100.1", 8080))
    else:
        s.sendto(b"x", ("198.51.100.1", 8081))
    print("sent")
except OSError as e:
    print("error", e.errno)
"""


def peer_seen(out: Netns, vm: Netns, kind: str, src: str, sport: int, wait: float = 3.0) -> tuple[str, str]:
    """(what the vm's client said, what the server in out saw: "ADDR PORT" or "nothing")."""
    port = "8080" if kind == "tcp" else "8081"
    server = out.popen([sys.executable, "-c", SERVER, kind, port, str(wait)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        said = vm.run([sys.executable, "-c", CLIENT, kind, src, str(sport)], check=False).stdout.strip()
        seen = str(server.communicate(timeout=wait + 5)[0]).strip()  # text=True: a str
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return said, seen


def ping(src: Netns, dst: str) -> bool:
    return src.run(["busybox", "ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0


@needs_nft
@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox ping")
def test_traffic_through_nat_and_isolated_networks() -> None:
    with namespaces("vm", "host", "out") as (vm, host, out):
        veth(vm, "eth0", host, "vm0")
        veth(host, "up0", out, "eth0")
        run_in(
            host,
            """
            links.ensure_bridge("vbr0", address="192.168.200.1/24")
            links.attach("vm0", "vbr0")
            links.set_ip_forward(True)
            nft.apply(NetRules("testnet", "nat", "vbr0", "192.168.200.0/24"))
            """,
        )
        host.run(["ip", "addr", "add", "198.51.100.2/24", "dev", "up0"])
        vm.run(["ip", "addr", "add", "192.168.200.10/24", "dev", "eth0"])
        vm.run(["ip", "addr", "add", "10.99.0.5/32", "dev", "eth0"])  # for the spoofing attempt
        vm.run(["ip", "route", "add", "default", "via", "192.168.200.1"])
        out.run(["ip", "addr", "add", "198.51.100.1/24", "dev", "eth0"])

        # nat: out is reached, and sees the host's address with an unprivileged source port.
        assert ping(vm, "198.51.100.1")
        for kind, sport in (("tcp", 700), ("udp", 701)):
            said, seen = peer_seen(out, vm, kind, "192.168.200.10", sport)
            assert said == "sent", (kind, said)
            addr, port = seen.split()
            assert addr == "198.51.100.2" and int(port) >= 1024, (kind, seen)
        # A guest sending from outside its subnet is dropped (not masqueraded, not forwarded as is).
        said, seen = peer_seen(out, vm, "udp", "10.99.0.5", 5000, wait=1.0)
        assert seen == "nothing", seen
        # Nobody outside reaches a guest unasked, even with a route to it.
        out.run(["ip", "route", "add", "192.168.200.0/24", "via", "198.51.100.2"])
        assert not ping(out, "192.168.200.10")

        # Control for the spoofing check: with the empty bridge-mode table the same datagram gets through, so
        # it was the nat table's rule that dropped it.
        run_in(host, 'nft.apply(NetRules("testnet", "bridge", "vbr0", None))')
        said, seen = peer_seen(out, vm, "udp", "10.99.0.5", 5000)
        assert seen.split()[0] == "10.99.0.5", seen

        # isolated: no way out, no way in; the host itself stays reachable on the bridge.
        run_in(host, 'nft.apply(NetRules("testnet", "isolated", "vbr0", "192.168.200.0/24"))')
        assert not ping(vm, "198.51.100.1")
        said, seen = peer_seen(out, vm, "tcp", "192.168.200.10", 40000, wait=1.0)
        assert seen == "nothing" and said.startswith("error"), (said, seen)
        assert not ping(out, "192.168.200.10")
        assert ping(vm, "192.168.200.1")

        assert run_in(host, 'print(nft.delete("testnet"), nft.vmkit_tables())').strip() == "True []"


@needs_nft
def test_apply_timing() -> None:
    """Figures for a network start (printed, never asserted)."""
    with namespaces("nft") as (ns,):
        out = run_in(
            ns,
            """
            times = {}
            for mode, subnet in (("nat", "192.168.122.0/24"), ("isolated", "10.1.0.0/16"), ("bridge", None)):
                runs = []
                for _ in range(5):
                    t = time.perf_counter()
                    nft.apply(NetRules("net", mode, "vbr0", subnet))
                    runs.append((time.perf_counter() - t) * 1000)
                times[mode] = sorted(runs)[2]
            t = time.perf_counter(); nft.delete("net"); d = (time.perf_counter() - t) * 1000
            print(", ".join(f"apply {m} {v:.1f} ms" for m, v in times.items()) + f", delete {d:.1f} ms")
            """,
        )
        print(out)


@pytest.mark.parametrize(
    "forward",
    [Forward("icmp", 1, "192.168.122.10", 1), Forward("tcp", 0, "192.168.122.10", 1),
     Forward("tcp", 80, "10.0.0.1", 80), Forward("tcp", 80, "192.168.122.10", 70000)],
)  # fmt: skip
def test_bad_forwards_are_refused(forward: Forward) -> None:
    with pytest.raises(InvalidInput):
        nft.ruleset(NetRules("default", "nat", "virbr0", "192.168.122.0/24", (forward,)))


def test_forwards_only_on_nat() -> None:
    with pytest.raises(InvalidInput, match="nat networks only"):
        nft.ruleset(NetRules("lab", "isolated", "vk-lab", "10.10.0.0/16", (Forward("tcp", 80, "10.10.0.5", 80),)))
