"""`vmkit network …`: virtual networks (NAT, isolated, bridged)."""

from __future__ import annotations

import argparse
import time

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit, kv, print_json, print_table


def _url(name: str = "", action: str = "") -> str:
    from vmkit.cli.main import quote

    return "/v1/networks" + (f"/{quote(name)}" if name else "") + (f"/{action}" if action else "")


def _show(n: dict[str, Any]) -> None:
    kv(
        [
            ("Name", n["name"]),
            ("Mode", n["mode"]),
            ("State", "active" if n["active"] else "inactive"),
            ("Autostart", "on" if n["autostart"] else "off"),
            ("Bridge", n["bridge"]),
            ("Subnet", n.get("subnet")),
            ("Gateway", n.get("gateway")),
            ("DHCP", " - ".join(n["dhcp_range"]) if n.get("dhcp_range") else "off"),
            ("dnsmasq", n.get("dnsmasq_pid")),
            ("VMs", ", ".join(n.get("vms") or [])),
        ]
    )


def network_list(c: Client, a: argparse.Namespace) -> int:
    nets = c.get(_url())
    if a.json:
        print_json(nets)
        return 0
    print_table(
        ["name", "mode", "state", "autostart", "bridge", "subnet", "vms"],
        [
            [n["name"], n["mode"], "active" if n["active"] else "inactive", "on" if n["autostart"] else "off",
             n["bridge"], n.get("subnet") or "-", len(n.get("vms") or [])]
            for n in nets
        ],
    )  # fmt: skip
    return 0


def network_info(c: Client, a: argparse.Namespace) -> int:
    n = c.get(_url(a.name))
    if a.json:
        print_json(n)
    else:
        _show(n)
    return 0


def network_create(c: Client, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": a.name, "mode": a.mode, "dhcp": not a.no_dhcp, "autostart": not a.no_autostart}
    if a.subnet:
        body["subnet"] = a.subnet
    if a.bridge:
        body["bridge"] = a.bridge
    if a.uplink:
        body["uplink"] = a.uplink
    n = c.post(_url(), body)
    if n["mode"] == "ovs":
        where = f"an Open vSwitch bridge {n['bridge']}"
    elif n.get("subnet"):
        where = f"on {n['subnet']}, gateway {n['gateway']}"
    else:
        where = f"joining bridge {n['bridge']}"
    return emit(a, n, f"network {n['name']} ({n['mode']}) created and started, {where}")


def _action(verb: str, done: str) -> Any:
    def cmd(c: Client, a: argparse.Namespace) -> int:
        return emit(a, c.post(_url(a.name, verb)), f"network {a.name} {done}")

    return cmd


def network_delete(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", _url(a.name))
    return emit(a, {"deleted": a.name}, f"network {a.name} deleted")


def network_autostart(c: Client, a: argparse.Namespace) -> int:
    n = c.request("PUT", _url(a.name, "autostart"), {"enabled": a.value == "on"})
    return emit(a, n, f"autostart of network {a.name} is {a.value}")


def network_leases(c: Client, a: argparse.Namespace) -> int:
    leases = c.get(_url(a.name, "leases"))
    if a.json:
        print_json(leases)
        return 0
    print_table(
        ["mac", "address", "hostname", "vm", "expires"],
        [
            [ls["mac"], ls["ip"], ls.get("hostname") or "-", ls.get("vm") or "-",
             time.strftime("%H:%M:%S", time.localtime(ls["expires"])) if ls["expires"] else "never"]
            for ls in leases
        ],
    )  # fmt: skip
    return 0


def _forward_rows(fwds: list[dict[str, Any]]) -> list[list[Any]]:
    return [[f["proto"], f["host_port"], f"{f['vm']}:{f['vm_port']}", f["address"]] for f in fwds]


def forward_add(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError

    vm, sep, port = a.to.rpartition(":")
    if not sep or not vm or not port.isdigit():
        raise CliError(f"invalid --to {a.to!r}: write VM:PORT")
    body = {"host_port": a.host_port, "vm": vm, "vm_port": int(port), "proto": a.proto}
    n = c.post(_url(a.name, "forwards"), body)
    f = next(x for x in n["forwards"] if x["host_port"] == a.host_port and x["proto"] == a.proto)
    return emit(a, n, f"{a.proto} port {a.host_port} of this host now goes to {vm}:{port} ({f['address']})")


def forward_list(c: Client, a: argparse.Namespace) -> int:
    fwds = c.get(_url(a.name, "forwards"))
    if a.json:
        print_json(fwds)
    else:
        print_table(["proto", "host port", "to", "address"], _forward_rows(fwds))
    return 0


def forward_delete(c: Client, a: argparse.Namespace) -> int:
    n = c.request("DELETE", _url(a.name, f"forwards/{a.proto}/{a.host_port}"))
    return emit(a, n, f"{a.proto} port {a.host_port} no longer forwarded")


def network_forward(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError

    if a.action == "list":
        return forward_list(c, a)
    if a.host_port is None:
        raise CliError(f"forward {a.action} needs --host-port P")
    if a.action == "add":
        if not a.to:
            raise CliError("forward add needs --to VM:PORT")
        return forward_add(c, a)
    return forward_delete(c, a)


def add_parsers(nouns: Any, add: Any) -> None:
    net = nouns.add_parser("network", help="virtual networks: NAT, isolated, bridged").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    add(net, "list", network_list, "list networks")
    add(net, "info", network_info, "show one network").add_argument("name")
    sp = add(net, "create", network_create, "define and start a network")
    sp.add_argument("name")
    sp.add_argument("--mode", choices=["nat", "isolated", "bridge", "ovs"], default="nat")
    sp.add_argument("--subnet", metavar="CIDR", help="e.g. 192.168.100.0/24 (default: a free 192.168.N.0/24)")
    sp.add_argument("--no-dhcp", action="store_true", help="no DHCP server (DNS stays)")
    sp.add_argument("--bridge", metavar="BR", help="bridge mode: the host bridge its VMs join")
    sp.add_argument(
        "--uplink",
        metavar="IFACE",
        help="bridge mode: make BR, enslaving this NIC (its addresses move over; back on delete)",
    )
    sp.add_argument("--no-autostart", action="store_true", help="do not start it when the host boots")
    add(net, "start", _action("start", "started"), "start a network").add_argument("name")
    add(net, "stop", _action("stop", "stopped"), "stop a network (its VMs must be stopped)").add_argument("name")
    add(net, "delete", network_delete, "delete a network no VM uses").add_argument("name")
    sp = add(net, "autostart", network_autostart, "start the network when the host boots")
    sp.add_argument("name")
    sp.add_argument("value", choices=["on", "off"])
    add(net, "leases", network_leases, "DHCP leases of a network").add_argument("name")
    sp = add(net, "forward", network_forward, "port forwards of a nat network: add, list, delete")
    sp.add_argument("action", choices=["add", "list", "delete"])
    sp.add_argument("name", metavar="NET")
    sp.add_argument("--host-port", type=int, metavar="P")
    sp.add_argument("--to", metavar="VM:PORT")
    sp.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
