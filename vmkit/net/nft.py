"""nftables tables for vmkit networks, built as libnftables JSON data and applied with `nft -j -f -`.

Invariants:
- vmkit touches only tables whose names start with TABLE_PREFIX, one table per network, never the host's
  ruleset (no `flush ruleset`, no chains in anybody else's tables).
- A network's table is replaced in one nft transaction (add + delete + add, then its chains and rules): the
  kernel either commits the whole new table or keeps the old one, so there is no instant without rules.
- Rules are data (dicts), never strings pasted together, so a name can never smuggle in nft syntax.
- Everything acts on the namespace the process is in (nft talks netlink in the caller's namespace).

The table is of family inet, not ip: its forward chain then also sees IPv6, so an isolated (or NAT) network
cannot leak IPv6 traffic in or out of its bridge when the host forwards IPv6. vmkit networks are IPv4-only, so
IPv6 into or out of the bridge is rejected like any other traffic the rules do not accept.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from vmkit.errors import InvalidInput
from vmkit.model.names import valid_name
from vmkit.net.links import check_ifname
from vmkit.util import proc

TABLE_PREFIX = "vmkit"
FAMILY = "inet"
MODES = ("nat", "isolated", "bridge")

# Base chain priorities as numbers: nft 1.0.6 accepts only integers for "prio" in JSON input.
_PRIO_SRCNAT = 100  # "srcnat" in the ip/inet families
_PRIO_DSTNAT = -100  # "dstnat"
_PRIO_FILTER = 0  # "filter"
# Source ports of masqueraded tcp/udp are mapped into this range: a guest must never appear on the host's
# address with a privileged (< 1024) source port, which some services trust (libvirt's CVE-2010-2242).
_MASQ_PORTS = (1024, 65535)
# Traffic the subnet sends to these is never masqueraded (libvirt does the same): link-local multicast and
# the limited broadcast do not leave the link, so rewriting their source would only confuse receivers.
_NO_MASQ_DESTS = ("224.0.0.0/24", "255.255.255.255/32")

Json = dict[str, Any]


@dataclass(frozen=True)
class Forward:
    """A port forward: connections to any of the host's own addresses on host_port go to address:port."""

    proto: str  # "tcp" | "udp"
    host_port: int
    address: str  # the guest's (pinned) address, inside the subnet
    port: int


@dataclass(frozen=True)
class NetRules:
    network: str  # vmkit network name (model.names rule)
    mode: str  # "nat" | "isolated" | "bridge"
    bridge: str  # the network's bridge link name
    subnet: str | None  # "192.168.122.0/24" for nat/isolated; None for bridge
    forwards: tuple[Forward, ...] = ()  # nat only


def table_name(network: str) -> str:
    """The nft table of a network: "vmkit-" + its name.

    Every character a vmkit name may hold (A-Z a-z 0-9 . _ -) is also valid in an nft identifier after a
    leading letter, and nft names are case-sensitive, so the mapping is the identity after the prefix: it
    cannot collide and needs no hash, and `nft list table inet vmkit-NAME` reads naturally.
    """
    if not valid_name(network):
        raise InvalidInput(f"invalid network name {network!r}")
    return f"{TABLE_PREFIX}-{network}"


def ruleset(rules: NetRules) -> Json:
    """The whole JSON document that replaces the network's table atomically. Pure: no side effects."""
    table = table_name(rules.network)
    subnet = _check(rules)
    commands: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        # add + delete + add: a replace that works whether or not the table exists yet.
        {"add": {"table": {"family": FAMILY, "name": table}}},
        {"delete": {"table": {"family": FAMILY, "name": table}}},
        {"add": {"table": {"family": FAMILY, "name": table}}},
    ]
    if rules.mode == "bridge":
        # A bridged network joins the guests to a LAN at layer 2: their frames are switched by the bridge and
        # never reach the IP forward hook, and vmkit must not filter a LAN the user chose to bridge into. The
        # table stays (empty) so that every network has one and apply/delete/vmkit_tables treat all modes alike.
        return {"nftables": commands}
    assert subnet is not None  # _check: nat and isolated have one
    # (chain = hook name, type, priority, rules)
    chains: list[tuple[str, str, int, list[list[Json]]]] = []
    if rules.mode == "nat":
        chains.append(("postrouting", "nat", _PRIO_SRCNAT, _nat_rules(subnet)))
        if rules.forwards:
            dnat = _dnat_rules(rules.bridge, subnet, rules.forwards)
            # prerouting: from other hosts; output: from the host itself, to one of its own addresses.
            chains += [("prerouting", "nat", _PRIO_DSTNAT, dnat), ("output", "nat", _PRIO_DSTNAT, dnat)]
    elif rules.forwards:
        raise InvalidInput("port forwards exist on nat networks only")
    forward = _forward_rules(rules.bridge, subnet, routed=rules.mode == "nat")
    # Forwarded connections are let in before the fence: each one to its own guest address and port only.
    forward[2:2] = [_forwarded(rules.bridge, f) for f in rules.forwards]
    chains.append(("forward", "filter", _PRIO_FILTER, forward))
    for name, kind, prio, _ in chains:
        # policy accept: traffic this chain has no opinion on is left to whatever the host's own tables decide.
        chain = {"family": FAMILY, "table": table, "name": name, "type": kind, "hook": name, "prio": prio}
        commands.append({"add": {"chain": {**chain, "policy": "accept"}}})
    for name, _, _, chain_rules in chains:
        for expr in chain_rules:
            commands.append({"add": {"rule": {"family": FAMILY, "table": table, "chain": name, "expr": expr}}})
    return {"nftables": commands}


def _check(rules: NetRules) -> ipaddress.IPv4Network | None:
    if rules.mode not in MODES:
        raise InvalidInput(f"invalid network mode {rules.mode!r}: use one of {', '.join(MODES)}")
    check_ifname(rules.bridge, "bridge")
    if rules.mode == "bridge":
        return None
    if rules.subnet is None:
        raise InvalidInput(f"a {rules.mode} network needs a subnet")
    try:
        return ipaddress.IPv4Network(rules.subnet)
    except ValueError as e:
        raise InvalidInput(f"invalid subnet {rules.subnet!r}: {e}") from e


def _nat_rules(subnet: ipaddress.IPv4Network) -> list[list[Json]]:
    from_subnet = _match("ip", "saddr", "==", subnet)
    leaving = _match("ip", "daddr", "!=", subnet)
    rules = [
        [from_subnet, _match("ip", "daddr", "==", ipaddress.IPv4Network(d)), {"return": None}] for d in _NO_MASQ_DESTS
    ]
    ports = {"port": {"range": list(_MASQ_PORTS)}}
    for l4 in ("tcp", "udp"):
        rules.append([_meta("l4proto", "==", l4), from_subnet, leaving, {"masquerade": ports}])
    rules.append([from_subnet, leaving, {"masquerade": None}])  # icmp and the rest have no ports to map
    return rules


def _dnat_rules(bridge: str, subnet: ipaddress.IPv4Network, forwards: tuple[Forward, ...]) -> list[list[Json]]:
    rules = []
    for f in forwards:
        if f.proto not in ("tcp", "udp") or not (0 < f.host_port < 65536 and 0 < f.port < 65536):
            raise InvalidInput(f"invalid port forward {f}")
        if ipaddress.IPv4Address(f.address) not in subnet:
            raise InvalidInput(f"port forward target {f.address} is outside {subnet}")
        rules.append(
            [
                # Only connections addressed to the host itself, and not from the network's own guests.
                {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                _meta("iifname", "!=", bridge),
                _meta("l4proto", "==", f.proto),
                _port(f.proto, "dport", f.host_port),
                {"dnat": {"family": "ip", "addr": f.address, "port": f.port}},
            ]
        )
    return rules


def _forwarded(bridge: str, f: Forward) -> list[Json]:
    return [
        _meta("oifname", "==", bridge),
        _match("ip", "daddr", "==", ipaddress.IPv4Network(f"{f.address}/32")),
        _meta("l4proto", "==", f.proto),
        _port(f.proto, "dport", f.port),
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
        {"accept": None},
    ]


def _port(proto: str, field: str, port: int) -> Json:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}}, "right": port}}


def _forward_rules(bridge: str, subnet: ipaddress.IPv4Network, *, routed: bool) -> list[list[Json]]:
    """Forward chain: what may be routed into and out of the bridge. First match wins."""
    iif, oif = _meta("iifname", "==", bridge), _meta("oifname", "==", bridge)
    rules: list[list[Json]] = [
        [iif, oif, {"accept": None}],  # guest to guest through the host
        # A guest sending from an address outside its subnet is spoofing: drop, not reject, so no error goes
        # to the forged address (that would make the host a reflector).
        [iif, _match("ip", "saddr", "!=", subnet), {"drop": None}],
    ]
    if routed:
        rules += [
            [iif, _match("ip", "saddr", "==", subnet), {"accept": None}],
            # Into the subnet only replies to connections the guests opened: no one outside reaches a guest
            # (or a guest of another network) unasked, as with libvirt's NAT.
            [oif, _match("ip", "daddr", "==", subnet), _ct_state("established", "related"), {"accept": None}],
        ]
    for direction in (iif, oif):
        rules.append([direction, _meta("l4proto", "==", "tcp"), {"reject": {"type": "tcp reset"}}])
    for direction in (iif, oif):
        rules.append([direction, {"reject": {"type": "icmpx", "expr": "port-unreachable"}}])
    return rules


def _match(protocol: str, field: str, op: str, net: ipaddress.IPv4Network) -> Json:
    right: Any = str(net.network_address)
    if net.prefixlen < 32:
        right = {"prefix": {"addr": right, "len": net.prefixlen}}
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}}, "right": right}}


def _meta(key: str, op: str, value: str) -> Json:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _ct_state(*states: str) -> Json:
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": list(states)}}


def _nft(document: Json, *, check_only: bool = False) -> None:
    argv = ["nft", "-j", *(["-c"] if check_only else []), "-f", "-"]
    proc.run(argv, input_text=json.dumps(document), timeout_s=30)


def apply(rules: NetRules) -> None:
    """Replace the network's table with ruleset(rules), in one transaction (CommandFailed with nft's message)."""
    _nft(ruleset(rules))


def check(rules: NetRules) -> None:
    """Let nft validate ruleset(rules) without committing it (`nft -c`)."""
    _nft(ruleset(rules), check_only=True)


def _tables() -> list[tuple[str, str]]:
    """(family, name) of every table in this namespace."""
    out = proc.run(["nft", "-j", "list", "tables"], timeout_s=30).stdout
    items = json.loads(out).get("nftables", []) if out.strip() else []
    return [(t["table"]["family"], t["table"]["name"]) for t in items if "table" in t]


def vmkit_tables() -> list[str]:
    """Names of the tables in this namespace that start with TABLE_PREFIX, sorted."""
    return sorted({name for _, name in _tables() if name.startswith(TABLE_PREFIX)})


def delete(network: str) -> bool:
    """Delete the network's table; False when there was none. No other table is touched."""
    return delete_table(table_name(network))


def delete_table(table: str) -> bool:
    """Delete a vmkit table by name (in whatever family it is); False when there was none.

    Refuses a name without TABLE_PREFIX: vmkit never deletes a table it does not own.
    """
    if not table.startswith(TABLE_PREFIX):
        raise InvalidInput(f"table {table!r} is not vmkit's (its name does not start with {TABLE_PREFIX!r})")
    found = [family for family, name in _tables() if name == table]
    if found:
        _nft({"nftables": [{"delete": {"table": {"family": family, "name": table}}} for family in found]})
    return bool(found)
