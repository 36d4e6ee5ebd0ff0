"""Pure data types for networks: what is stored, what the API accepts, what it answers.

Modes follow the seed and libvirt: `nat` (libvirt's `default`: its own bridge, DHCP and DNS, masquerade out),
`isolated` (a bridge of its own with optional DHCP, no route anywhere), `bridge` (VMs join an existing host
bridge, the LAN's DHCP serves them), `ovs` (an Open vSwitch bridge of vmkit's own OVS, a layer-2 switch whose
ports are VLAN access or trunk ports; no addresses, DHCP or routing of vmkit's).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmkit.model.names import NAME_PATTERN, check_name

NetworkMode = Literal["nat", "isolated", "bridge", "ovs"]
VlanId = Annotated[int, Field(ge=1, le=4094)]
LINK_NAME_PATTERN = r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,14}$"  # IFNAMSIZ: 15 characters
_LINK_RE = re.compile(LINK_NAME_PATTERN)
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"
DEFAULT_NETWORK = "default"
DEFAULT_SUBNET = "192.168.122.0/24"  # libvirt's


def check_link(v: str) -> str:
    if not _LINK_RE.fullmatch(v):
        raise ValueError(f"invalid interface name {v!r}: 1-15 characters from A-Z a-z 0-9 _ . -")
    return v


def check_subnet(v: str) -> str:
    """A private-use IPv4 network with room for a gateway and guests: '192.168.122.0/24'."""
    try:
        net = ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"invalid subnet {v!r}: {e} (write it like 192.168.122.0/24)") from None
    if not 8 <= net.prefixlen <= 29:
        raise ValueError(f"subnet {v} must have a prefix length from /8 to /29")
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise ValueError(f"subnet {v} is not a private-use range (10/8, 172.16/12, 192.168/16, …)")
    return str(net)


Port = Annotated[int, Field(ge=1, le=65535)]


class PortForward(BaseModel):
    """Connections to the host's own addresses on host_port (proto) go to the VM's vm_port. The VM's NIC on the
    network is given `address` for good (a static lease), so the rule always reaches it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    proto: Literal["tcp", "udp"]
    host_port: int
    vm: str
    vm_port: int
    mac: str
    address: str


class AddForward(BaseModel):
    """Body of POST /v1/networks/{name}/forwards."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    host_port: Port
    vm: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    vm_port: Port
    proto: Literal["tcp", "udp"] = "tcp"

    @field_validator("vm")
    @classmethod
    def _vm(cls, v: str) -> str:
        return check_name(v)


class NetworkSpec(BaseModel):
    """A network as stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    mode: NetworkMode
    bridge: str  # the Linux bridge VMs' taps join
    subnet: str | None = None  # nat / isolated
    dhcp: bool = True
    # True when vmkit made the bridge (nat, isolated) and so removes it; a bridge network joins one of the host's.
    owns_bridge: bool = True
    # bridge mode: the NIC vmkit enslaved to `bridge`, moving its addresses and routes over (back on delete).
    uplink: str | None = None
    forwards: list[PortForward] = Field(default_factory=list)  # nat only

    @property
    def gateway(self) -> str | None:
        return str(next(ipaddress.IPv4Network(self.subnet).hosts())) if self.subnet else None

    @property
    def dhcp_range(self) -> tuple[str, str] | None:
        """libvirt's shape: .2 to the last host address."""
        if not (self.subnet and self.dhcp):
            return None
        hosts = list(ipaddress.IPv4Network(self.subnet).hosts())
        return str(hosts[1]), str(hosts[-1])


class CreateNetwork(BaseModel):
    """Body of POST /v1/networks."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    mode: NetworkMode = "nat"
    subnet: Annotated[str | None, Field(description="e.g. 192.168.100.0/24 (nat, isolated)", max_length=18)] = None
    dhcp: bool = True
    bridge: Annotated[
        str | None,
        Field(description="bridge mode: the host bridge to join", json_schema_extra={"pattern": LINK_NAME_PATTERN}),
    ] = None
    uplink: Annotated[
        str | None,
        Field(
            description="bridge mode: a host NIC to enslave to a new bridge (its addresses and routes move over)",
            json_schema_extra={"pattern": LINK_NAME_PATTERN},
        ),
    ] = None
    autostart: bool = True
    start: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "network")

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
        return v if v is None else check_link(v)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str | None) -> str | None:
        return v if v is None else check_subnet(v)

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str | None) -> str | None:
        return v if v is None else check_link(v)

    @model_validator(mode="after")
    def _fits_mode(self) -> CreateNetwork:
        if self.mode == "ovs":
            if self.subnet is not None or self.bridge is not None or self.uplink is not None:
                raise ValueError("an ovs network is a layer-2 switch of vmkit's own: give no subnet, bridge or uplink")
            return self
        if self.mode == "bridge":
            if self.bridge is None:
                raise ValueError("a bridge network needs bridge: the host bridge its VMs join")
            if self.subnet is not None:
                raise ValueError("a bridge network takes its addresses from the LAN: give no subnet")
        elif self.bridge is not None or self.uplink is not None:
            raise ValueError(f"a {self.mode} network makes its own bridge: give no bridge or uplink")
        return self


class NetworkInfo(BaseModel):
    name: str
    mode: NetworkMode
    bridge: str
    subnet: str | None
    gateway: str | None
    dhcp_range: list[str] | None
    active: bool
    autostart: bool
    vms: list[str] = Field(default_factory=list)  # VMs with a NIC on it
    dnsmasq_pid: int | None = None
    forwards: list[PortForward] = Field(default_factory=list)


class Lease(BaseModel):
    mac: str
    ip: str
    hostname: str | None = None
    expires: int  # UNIX time; 0: never
    vm: str | None = None  # the VM whose NIC has this MAC


class NicRequest(BaseModel):
    """One NIC of a new VM: a network's name (or "user": QEMU's restricted user networking)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    network: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    mac: Annotated[str | None, Field(json_schema_extra={"pattern": MAC_PATTERN})] = None
    model: Literal["virtio", "e1000"] = "virtio"
    # ovs networks: an access port of VLAN `vlan`, or a trunk port carrying `trunks` (tagged).
    vlan: VlanId | None = None
    trunks: Annotated[list[VlanId] | None, Field(min_length=1, max_length=64)] = None

    @model_validator(mode="after")
    def _one_vlan_kind(self) -> NicRequest:
        if self.vlan is not None and self.trunks is not None:
            raise ValueError("a NIC is an access port (vlan) or a trunk port (trunks), not both")
        return self

    @field_validator("network")
    @classmethod
    def _network(cls, v: str) -> str:
        return check_name(v, "network")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.lower()
        if not re.fullmatch(MAC_PATTERN, v):
            raise ValueError(f"invalid MAC {v!r}: six hex pairs like 52:54:00:12:34:56")
        if int(v[:2], 16) & 1:
            raise ValueError(f"MAC {v} is a multicast address")
        return v
