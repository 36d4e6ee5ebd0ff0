"""Networks: define, start, stop, delete; bring the host in line with them at daemon start.

What a started network is, on the host (all in the daemon's own network namespace):
- nat / isolated: a Linux bridge vmkit made (`vk-NAME`), the subnet's first address on it, one dnsmasq serving
  DHCP and DNS on that bridge only, and vmkit's own nftables table for the network (`inet vmkit-BRIDGE`:
  masquerade + forward rules for nat; a fence for isolated); IP forwarding on for nat.
- bridge: an existing host bridge that VMs' taps join; nothing of vmkit's besides the taps.

The row's `active` flag is what the user asked for. At daemon start (`load`) every network is brought to it:
missing pieces are made again (after a host reboot, a crash, or someone deleting a bridge), and pieces vmkit made
for networks that no longer exist — dnsmasq and its files — are removed (never a bridge or a table: see
_remove_strays). Starting and stopping are idempotent, so a daemon killed half-way through either is finished
by the next `load`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from vmkit.errors import Conflict, InvalidInput, NotFound, VmkitError
from vmkit.model.network import (
    DEFAULT_NETWORK,
    DEFAULT_SUBNET,
    AddForward,
    CreateNetwork,
    Lease,
    NetworkInfo,
    NetworkSpec,
    PortForward,
)
from vmkit.net import dnsmasq, links, nft, ovs
from vmkit.store.db import Store

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "vk-"  # bridges vmkit makes; taps are named vk-VM-N (see tap_name)


def bridge_name(network: str, taken: set[str]) -> str:
    """`vk-NAME` cut to IFNAMSIZ, made unique with a number when two names share a prefix."""
    base = (BRIDGE_PREFIX + network)[:15]
    name, n = base, 0
    while name in taken:
        n += 1
        name = base[: 15 - len(str(n))] + str(n)
    return name


def tap_name(vm: str, index: int, taken: Callable[[str], bool]) -> str:
    """A tap a person can tell apart: vk-VM-N (VM cut to fit 15 characters); when that is in use (two VMs share
    a prefix), vk-t + a number."""
    suffix = f"-{index}"
    name = (BRIDGE_PREFIX + vm)[: 15 - len(suffix)] + suffix
    n = 0
    while taken(name):
        n += 1
        name = f"{BRIDGE_PREFIX}t{n}{suffix}"
    return name


class NetworkService:
    def __init__(self, *, store: Store, run_dir: Path, default_network: bool = True) -> None:
        self._store = store
        # dnsmasq's files (conf, pid, leases, host lists): in the run dir, which dnsmasq's own user can traverse
        # (the state dir is root-only). Leases do not outlive a reboot; dnsmasq hashes MACs to addresses, so a
        # guest mostly gets its address back anyway.
        self._dir = run_dir / "networks"
        self._ovs_dir = run_dir / "ovs"  # vmkit's own Open vSwitch (ovs networks), not the host's
        self._default_network = default_network
        self._lock = asyncio.Lock()
        # Set by the daemon once VMs are loaded: VMs with a NIC on a network, those running, and (MAC, VM name)
        # of every NIC on it.
        self._users: Callable[[str], list[str]] = lambda name: []
        self._running_users: Callable[[str], list[str]] = lambda name: []
        self._hosts: Callable[[str], list[tuple[str, str]]] = lambda name: []

    def set_users(
        self,
        users: Callable[[str], list[str]],
        running: Callable[[str], list[str]],
        hosts: Callable[[str], list[tuple[str, str]]],
    ) -> None:
        self._users, self._running_users, self._hosts = users, running, hosts

    # ----- lookups -------------------------------------------------------------------------------
    def _rows(self) -> dict[str, tuple[NetworkSpec, bool, bool]]:
        return {spec.name: (spec, autostart, active) for spec, autostart, active in self._store.networks()}

    def spec(self, name: str) -> NetworkSpec:
        row = self._rows().get(name)
        if row is None:
            raise NotFound(f"no network named {name!r}")
        return row[0]

    def exists(self, name: str) -> bool:
        return name in self._rows()

    def _dnsmasq(self, spec: NetworkSpec) -> dnsmasq.DnsmasqConfig | None:
        if spec.mode == "bridge" or spec.subnet is None or spec.gateway is None:
            return None
        net = ipaddress.IPv4Network(spec.subnet)
        return dnsmasq.DnsmasqConfig(
            network=spec.name,
            bridge=spec.bridge,
            gateway=spec.gateway,
            prefix_len=net.prefixlen,
            dhcp_range=spec.dhcp_range,
            domain=spec.name,
            directory=self._dir / spec.name,
        )

    def _dnsmasq_hosts(self, spec: NetworkSpec) -> list[dnsmasq.Host]:
        pinned = {f.mac: f.address for f in spec.forwards}
        return [dnsmasq.Host(mac=mac, ip=pinned.get(mac), name=name) for mac, name in self._hosts(spec.name)]

    @staticmethod
    def _rules(spec: NetworkSpec) -> nft.NetRules:
        """The network's nftables rules, in a table named after its bridge (`vmkit-vk-NAME`): a bridge name is
        unique in a network namespace, a network name only in one state dir, and two vmkit daemons may share a
        host (each with its `default`)."""
        forwards = tuple(nft.Forward(f.proto, f.host_port, f.address, f.vm_port) for f in spec.forwards)
        return nft.NetRules(
            network=spec.bridge, mode=spec.mode, bridge=spec.bridge, subnet=spec.subnet, forwards=forwards
        )

    def info(self, name: str) -> NetworkInfo:
        rows = self._rows()
        if name not in rows:
            raise NotFound(f"no network named {name!r}")
        spec, autostart, active = rows[name]
        cfg = self._dnsmasq(spec)
        return NetworkInfo(
            name=spec.name,
            mode=spec.mode,
            bridge=spec.bridge,
            subnet=spec.subnet,
            gateway=spec.gateway,
            dhcp_range=list(spec.dhcp_range) if spec.dhcp_range else None,
            active=active,
            autostart=autostart,
            vms=self._users(name),
            dnsmasq_pid=dnsmasq.running(cfg) if cfg is not None and active else None,
            forwards=spec.forwards,
        )

    def all(self) -> list[NetworkInfo]:
        return [self.info(name) for name in self._rows()]

    def bridge_for_start(self, name: str) -> str:
        """The bridge a VM's tap joins; Conflict when the network is not started. (For an ovs network the tap is
        made a port of it by plug(), not enslaved.)"""
        rows = self._rows()
        if name not in rows:
            raise Conflict(f"no network named {name!r} (vmkit network list)")
        spec, _, active = rows[name]
        if not active:
            raise Conflict(f"network {name!r} is not started: vmkit network start {name}")
        return spec.bridge

    def check_nic(self, name: str, vlan: int | None, trunks: list[int] | None) -> None:
        """VLAN settings exist on ovs networks only."""
        if (vlan is not None or trunks) and self.spec(name).mode != "ovs":
            raise InvalidInput(f"network {name!r} is not an ovs network: VLAN tags and trunks need one")

    def plug(self, name: str, tap: str, *, vlan: int | None = None, trunks: list[int] | None = None) -> None:
        """Make tap a port of network `name`'s bridge (Linux bridge, or an OVS access/trunk port)."""
        spec = self.spec(name)
        if spec.mode == "ovs":
            ovs.add_port(self._ovs_dir, spec.bridge, tap, tag=vlan, trunks=trunks)
        else:
            links.attach(tap, spec.bridge)

    def leases(self, name: str) -> list[Lease]:
        spec = self.spec(name)
        cfg = self._dnsmasq(spec)
        if cfg is None:
            return []
        owners = {mac: vm for mac, vm in self._hosts(name)}
        return [
            Lease(mac=ls.mac, ip=ls.ip, hostname=ls.hostname, expires=ls.expires, vm=owners.get(ls.mac))
            for ls in dnsmasq.leases(cfg)
        ]

    # ----- define / delete -----------------------------------------------------------------------
    def _check_subnet(self, subnet: str, name: str) -> None:
        net = ipaddress.IPv4Network(subnet)
        for other, _, _ in self._store.networks():
            if other.subnet and other.name != name and net.overlaps(ipaddress.IPv4Network(other.subnet)):
                raise Conflict(f"subnet {subnet} overlaps network {other.name!r} ({other.subnet})")
        own = next((o.bridge for o, _, _ in self._store.networks() if o.name == name), None)
        clash = links.overlapping(subnet, ignore_link=own)
        if clash:
            raise Conflict(f"subnet {subnet} overlaps this host's {', '.join(clash)}: pick another with --subnet")

    def _free_subnet(self, name: str) -> str:
        """libvirt's 192.168.122.0/24, or the next free 192.168.N.0/24."""
        for third in range(122, 256):
            candidate = f"192.168.{third}.0/24"
            try:
                self._check_subnet(candidate, name)
            except Conflict:
                continue
            return candidate
        raise Conflict("no free 192.168.N.0/24 subnet on this host: give one with --subnet")

    async def create(self, req: CreateNetwork) -> NetworkInfo:
        async with self._lock:
            rows = self._rows()
            if req.name in rows:
                raise Conflict(f"a network named {req.name!r} already exists")
            if req.mode == "bridge":
                assert req.bridge is not None  # CreateNetwork checks it
                if req.uplink is not None:
                    if not links.link_exists(req.uplink):
                        raise InvalidInput(f"there is no NIC {req.uplink!r} on this host")
                    if links.link_exists(req.bridge) and not links.is_bridge(req.bridge):
                        raise InvalidInput(f"{req.bridge!r} exists and is not a bridge")
                elif not links.link_exists(req.bridge):
                    raise InvalidInput(f"there is no bridge {req.bridge!r} on this host to join (or give --uplink)")
                elif not links.is_bridge(req.bridge):
                    raise InvalidInput(f"{req.bridge!r} is not a bridge: VMs can only join a bridge")
                spec = NetworkSpec(
                    name=req.name, mode="bridge", bridge=req.bridge, dhcp=False, owns_bridge=False, uplink=req.uplink
                )
            elif req.mode == "ovs":
                taken = {s.bridge for s, _, _ in rows.values()} | set(links.links_with_prefix(BRIDGE_PREFIX))
                spec = NetworkSpec(name=req.name, mode="ovs", bridge=bridge_name(req.name, taken), dhcp=False)
            else:
                subnet = req.subnet or self._free_subnet(req.name)
                self._check_subnet(subnet, req.name)
                taken = {s.bridge for s, _, _ in rows.values()} | set(links.links_with_prefix(BRIDGE_PREFIX))
                spec = NetworkSpec(
                    name=req.name, mode=req.mode, bridge=bridge_name(req.name, taken), subnet=subnet, dhcp=req.dhcp
                )
            self._store.add_network(spec, autostart=req.autostart)
        if req.start:
            await self.start(req.name)
        return self.info(req.name)

    async def ensure_default(self) -> str | None:
        """Define and start libvirt's `default` NAT network on a state dir's first start (once: deleting it is
        the user's choice). Its subnet is 192.168.122.0/24 unless that is taken here. Returns what was done."""
        if not self._default_network or self._store.get_meta("default_network") is not None:
            return None
        self._store.set_meta("default_network", "defined")
        if self.exists(DEFAULT_NETWORK):
            return None
        subnet = self._free_subnet(DEFAULT_NETWORK)
        await self.create(CreateNetwork(name=DEFAULT_NETWORK, mode="nat", subnet=subnet))
        if subnet != DEFAULT_SUBNET:
            return f"network default uses {subnet}: {DEFAULT_SUBNET} is in use on this host"
        return f"network default created ({subnet})"

    async def delete(self, name: str) -> None:
        async with self._lock:
            self.spec(name)
            users = self._users(name)
            if users:
                raise Conflict(f"network {name!r} is used by VM(s) {', '.join(users)}: remove their NICs first")
        await self.stop(name)
        async with self._lock:
            spec = self.spec(name)
            if spec.uplink is not None:
                # The uplink gets its addresses and routes back; refused while other ports remain on the bridge.
                await asyncio.to_thread(links.release_uplink_bridge, spec.bridge, spec.uplink)
            self._store.delete_network(name)
            shutil.rmtree(self._dir / name, ignore_errors=True)

    async def set_autostart(self, name: str, enabled: bool) -> NetworkInfo:
        self.spec(name)
        self._store.set_network_flags(name, autostart=enabled)
        return self.info(name)

    # ----- start / stop --------------------------------------------------------------------------
    async def start(self, name: str) -> NetworkInfo:
        async with self._lock:
            spec = self.spec(name)
            # Asked for before the work: a daemon killed half-way finishes it at its next start.
            self._store.set_network_flags(name, active=True)
            try:
                await asyncio.to_thread(self._bring_up, spec)
            except (VmkitError, OSError) as e:
                self._store.set_network_flags(name, active=False)
                await asyncio.to_thread(self._tear_down, spec)
                detail = e.message if isinstance(e, VmkitError) else str(e)
                raise VmkitError(f"cannot start network {name!r}: {detail}") from e
        return self.info(name)

    def _bring_up(self, spec: NetworkSpec) -> None:
        if spec.mode == "bridge":
            if spec.uplink is not None:
                # Idempotent: the bridge holds the uplink (and its addresses and routes) from then on.
                links.make_uplink_bridge(spec.bridge, spec.uplink)
            if not links.is_bridge(spec.bridge):
                raise Conflict(f"the host bridge {spec.bridge!r} of network {spec.name!r} is gone (or not a bridge)")
            return
        if spec.mode == "ovs":
            ovs.ensure(self._ovs_dir)
            ovs.ensure_bridge(self._ovs_dir, spec.bridge)
            return
        net = ipaddress.IPv4Network(spec.subnet or "")
        links.ensure_bridge(spec.bridge, address=f"{spec.gateway}/{net.prefixlen}")
        if spec.mode == "nat":
            links.set_ip_forward(True)
        if spec.mode != "bridge":  # a bridged LAN is not filtered: no table at all
            nft.apply(self._rules(spec))
        cfg = self._dnsmasq(spec)
        if cfg is not None:
            # Passable (not readable) for dnsmasq's own user, whatever the daemon's umask.
            self._dir.mkdir(parents=True, exist_ok=True)
            self._dir.chmod(0o711)
            dnsmasq.ensure(cfg, self._dnsmasq_hosts(spec))

    async def stop(self, name: str) -> NetworkInfo:
        async with self._lock:
            spec = self.spec(name)
            running = self._running_users(name)
            if running:
                raise Conflict(f"network {name!r} has running VM(s) {', '.join(running)}: stop them first")
            self._store.set_network_flags(name, active=False)
            await asyncio.to_thread(self._tear_down, spec)
        return self.info(name)

    def _tear_down(self, spec: NetworkSpec) -> None:
        cfg = self._dnsmasq(spec)
        if cfg is not None:
            dnsmasq.stop(cfg)
        if spec.mode == "ovs":
            if (self._ovs_dir / "db.sock").exists():
                ovs.delete_bridge(self._ovs_dir, spec.bridge)
            return
        if spec.owns_bridge:
            nft.delete(spec.bridge)
            links.delete_link(spec.bridge)

    async def refresh_hosts(self) -> None:
        """Give every started network's dnsmasq the VMs' names (once VMs are loaded, at daemon start)."""
        for name in self._rows():
            try:
                await self.hosts_changed(name)
            except (VmkitError, OSError) as e:
                log.warning("network %s: %s", name, getattr(e, "message", e))

    async def hosts_changed(self, name: str) -> None:
        """A VM's NIC joined or left: give dnsmasq the new MAC → name list (static names for DNS)."""
        rows = self._rows()
        if name not in rows or not rows[name][2]:
            return
        spec = rows[name][0]
        cfg = self._dnsmasq(spec)
        if cfg is not None:
            await asyncio.to_thread(dnsmasq.reload, cfg, self._dnsmasq_hosts(spec))

    # ----- port forwards ------------------------------------------------------------------------
    async def add_forward(self, name: str, req: AddForward, nics: list[tuple[str, str]]) -> NetworkInfo:
        """Forward host_port to the VM's vm_port. nics: (MAC, VM) of the NICs on this network. The VM's NIC gets
        its current lease (or a free address of the range) for good, so the rule keeps reaching it."""
        async with self._lock:
            spec = self.spec(name)
            if spec.mode != "nat":
                raise Conflict(f"network {name!r} is {spec.mode}: port forwards exist on nat networks only")
            for other, _, _ in self._store.networks():
                for f in other.forwards:
                    if (f.proto, f.host_port) == (req.proto, req.host_port):
                        raise Conflict(
                            f"{req.proto} port {req.host_port} already goes to {f.vm} (network {other.name})"
                        )
            macs = [mac for mac, vm in nics if vm == req.vm]
            if not macs:
                raise InvalidInput(f"VM {req.vm!r} has no NIC on network {name!r}")
            mac = macs[0]
            address = next((f.address for f in spec.forwards if f.mac == mac), None)
            if address is None:
                address = self._address_for(spec, mac)
            fwd = PortForward(proto=req.proto, host_port=req.host_port, vm=req.vm, vm_port=req.vm_port, mac=mac,
                              address=address)  # fmt: skip
            new = spec.model_copy(update={"forwards": [*spec.forwards, fwd]})
            await self._replace(new)
        return self.info(name)

    def _address_for(self, spec: NetworkSpec, mac: str) -> str:
        cfg = self._dnsmasq(spec)
        leases = dnsmasq.leases(cfg) if cfg else []
        mine = next((ls.ip for ls in leases if ls.mac == mac), None)
        if mine is not None:
            return mine
        taken = {ls.ip for ls in leases} | {f.address for f in spec.forwards}
        start, end = spec.dhcp_range or (None, None)
        if start is None or end is None:
            raise Conflict(f"network {spec.name!r} has no DHCP range to give the VM a fixed address from")
        first, last = int(ipaddress.IPv4Address(start)), int(ipaddress.IPv4Address(end))
        for n in range(last, first - 1, -1):  # from the top: dnsmasq hands out dynamic ones by hash, anywhere
            if str(ipaddress.IPv4Address(n)) not in taken:
                return str(ipaddress.IPv4Address(n))
        raise Conflict(f"no free address left in network {spec.name!r}")

    async def delete_forward(self, name: str, proto: str, host_port: int) -> NetworkInfo:
        async with self._lock:
            spec = self.spec(name)
            kept = [f for f in spec.forwards if (f.proto, f.host_port) != (proto, host_port)]
            if len(kept) == len(spec.forwards):
                raise NotFound(f"network {name!r} forwards no {proto} port {host_port}")
            await self._replace(spec.model_copy(update={"forwards": kept}))
        return self.info(name)

    async def vm_nic_gone(self, network: str, mac: str) -> None:
        """A NIC left the network: the forwards to it go too."""
        if not self.exists(network):
            return
        async with self._lock:
            spec = self.spec(network)
            if any(f.mac == mac for f in spec.forwards):
                await self._replace(spec.model_copy(update={"forwards": [f for f in spec.forwards if f.mac != mac]}))

    async def vm_gone(self, vm: str) -> None:
        """A deleted VM's forwards go with it."""
        for spec, _, _ in self._store.networks():
            if any(f.vm == vm for f in spec.forwards):
                async with self._lock:
                    spec = self.spec(spec.name)
                    await self._replace(spec.model_copy(update={"forwards": [f for f in spec.forwards if f.vm != vm]}))

    async def _replace(self, spec: NetworkSpec) -> None:
        """Store the new spec; if the network runs, swap its nft table in one transaction and tell dnsmasq the
        fixed addresses. The table is built before anything is stored, so a bad rule changes nothing."""
        nft.ruleset(self._rules(spec))
        active = self._rows()[spec.name][2]
        self._store.set_network_spec(spec)
        if active:
            await asyncio.to_thread(nft.apply, self._rules(spec))
            cfg = self._dnsmasq(spec)
            if cfg is not None:
                await asyncio.to_thread(dnsmasq.reload, cfg, self._dnsmasq_hosts(spec))

    # ----- daemon start --------------------------------------------------------------------------
    async def load(self) -> None:
        """Bring the host in line with the rows (see the module's docstring)."""
        rows = self._rows()
        # After a host reboot (nothing of any network survives one) networks come back as their autostart says,
        # as libvirt does; otherwise as they were left.
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        rebooted = self._store.get_meta("net_boot_id") not in (None, boot_id)
        self._store.set_meta("net_boot_id", boot_id)
        if rebooted:
            for spec, autostart, active in rows.values():
                if autostart != active:
                    self._store.set_network_flags(spec.name, active=autostart)
            rows = self._rows()
        for spec, _, active in rows.values():
            try:
                if active:
                    await asyncio.to_thread(self._bring_up, spec)
                else:
                    await asyncio.to_thread(self._tear_down, spec)
            except (VmkitError, OSError) as e:
                log.error("network %s: %s", spec.name, getattr(e, "message", e))
        await asyncio.to_thread(self._remove_strays, rows)

    def _remove_strays(self, rows: dict[str, tuple[NetworkSpec, bool, bool]]) -> None:
        # No bridge and no nftables table is removed here: a network's row exists before them and goes after them,
        # so one without a row is not this daemon's, whatever its name (a host bridge called vk-lan; the table of
        # another vmkit daemon on the same host). Only dnsmasq dirs in this daemon's own run dir are certain.
        if self._dir.is_dir():
            for d in self._dir.iterdir():
                if d.name not in rows:
                    log.info("stopping dnsmasq of network %s, which no longer exists", d.name)
                    dnsmasq.stop_dir(d)
                    shutil.rmtree(d, ignore_errors=True)
