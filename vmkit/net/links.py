"""Links over netlink (pyroute2): bridges, taps, addresses, routes — in the caller's network namespace.

Every function opens its own rtnetlink socket and closes it before returning, so it always acts on the
namespace the process (thread) is in at the time of the call: a daemon started inside a namespace only ever
touches that namespace. Nothing here runs `ip` or any other program.

These functions block (briefly: a few netlink round trips, 1-5 ms). pyroute2's synchronous IPRoute runs an
event loop of its own and fails on a thread whose asyncio loop is running, so a call made from a coroutine is
carried out on a short-lived worker thread (@_off_loop) while the caller waits: it works, but blocks that
loop for the call's length; async code should prefer `await asyncio.to_thread(...)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import hashlib
import ipaddress
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from socket import AF_INET
from typing import Any, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmkit.errors import CommandFailed, Conflict, InvalidInput, NotFound

# IFNAMSIZ is 16 including the NUL; the kernel also refuses "/", ":" and whitespace, and "." / "..".
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

_TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000  # QEMU probes for it on a tap fd and then uses virtio-net headers
_IFF_TUN_EXCL = 0x8000  # fail with EBUSY if the name exists, instead of attaching to that device
_IFF_UP = 0x1
# Route types that come from local addresses (the kernel's "local" table); addresses are reported as such.
_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST, _RTN_MULTICAST = 2, 3, 4, 5
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

P = ParamSpec("P")
T = TypeVar("T")


def check_ifname(name: str, what: str = "link") -> str:
    """Return name if the kernel accepts it as an interface name, else raise InvalidInput."""
    if _IFNAME_RE.fullmatch(name) is None or name in (".", ".."):
        raise InvalidInput(f"invalid {what} name {name!r}: use 1-15 characters from A-Z a-z 0-9 _ . -")
    return name


def _off_loop(fn: Callable[P, T]) -> Callable[P, T]:
    """Run fn on a worker thread when this thread runs an asyncio loop (see the module's docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)  # no loop here: pyroute2 may run its own
        # A new thread starts in its creator's network namespace, so the call still acts on the caller's.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(fn, *args, **kwargs).result()

    return wrapper


@contextlib.contextmanager
def _ipr() -> Iterator[Any]:
    ipr = IPRoute(groups=0)  # requests only: no subscription to the namespace's event stream
    try:
        yield ipr
    except NetlinkError as e:
        raise CommandFailed(f"netlink: {e.args[-1] if e.args else e}") from e
    finally:
        ipr.close()


def _get_link(ipr: Any, name: str) -> Any | None:
    try:
        (msg,) = ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return msg


def _kind(msg: Any) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _bridge(ipr: Any, name: str) -> Any:
    msg = _get_link(ipr, check_ifname(name, "bridge"))
    if msg is None:
        raise NotFound(f"bridge {name!r} does not exist (is its network started?)")
    if _kind(msg) != "bridge":
        raise Conflict(f"link {name!r} is not a bridge")
    return msg


def _interface(a: Any) -> ipaddress.IPv4Interface:
    # IFA_LOCAL is the link's own address; IFA_ADDRESS is the peer's on a point-to-point address (and the
    # same as IFA_LOCAL otherwise), whose prefix the kernel routes and ipv4_routes_and_addresses() sees as such.
    return ipaddress.IPv4Interface(f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")


def _ipv4_of(ipr: Any, index: int) -> list[ipaddress.IPv4Interface]:
    return [_interface(a) for a in ipr.addr("dump", family=AF_INET, index=index)]


def _stable_mac(name: str) -> str:
    # Locally administered, unicast, derived from the bridge name. A bridge whose MAC was set explicitly keeps
    # it; otherwise the kernel gives the bridge the lowest MAC among its ports, so it would change as taps come
    # and go, and guests would keep sending to a stale gateway MAC from their ARP caches.
    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _tap_mac() -> str:
    # First byte 0xfe (locally administered, unicast, the highest such): a tap never has the lowest MAC on its
    # bridge, so it can never become the MAC of a bridge that was not given one (libvirt's rule for taps).
    return ":".join(f"{b:02x}" for b in (0xFE, *secrets.token_bytes(5)))


@_off_loop
def link_exists(name: str) -> bool:
    with _ipr() as ipr:
        return _get_link(ipr, check_ifname(name)) is not None


@_off_loop
def is_bridge(name: str) -> bool:
    """True if link `name` exists and is a Linux bridge."""
    with _ipr() as ipr:
        msg = _get_link(ipr, check_ifname(name))
        return msg is not None and _kind(msg) == "bridge"


@_off_loop
def ensure_bridge(name: str, *, address: str | None) -> None:
    """Make `name` a bridge (STP off, forward delay 0) that is up and whose only IPv4 address is `address`.

    address is an interface address such as "192.168.122.1/24"; None: no IPv4 address (any there is removed).
    Idempotent: on a bridge that is already so, it only reads. Meant for bridges vmkit owns (nat and isolated
    networks): given a user's bridge, it would take that bridge's addresses away.
    """
    check_ifname(name, "bridge")
    want: ipaddress.IPv4Interface | None = None
    if address is not None:
        try:
            want = ipaddress.IPv4Interface(address)
        except ValueError as e:
            raise InvalidInput(f"invalid bridge address {address!r}: {e}") from e
        if "/" not in address:
            raise InvalidInput(f"bridge address {address!r} needs a prefix length (e.g. 192.168.122.1/24)")
    with _ipr() as ipr:
        msg = _get_link(ipr, name)
        if msg is None:
            # stp off + forward delay 0: a port forwards at once (as libvirt's networks); a guest's DHCP
            # request must not be lost in STP's listening/learning states.
            ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0, address=_stable_mac(name))
            msg = _get_link(ipr, name)
            if msg is None:
                raise CommandFailed(f"bridge {name!r} vanished right after it was created")
        elif _kind(msg) != "bridge":
            raise Conflict(f"link {name!r} exists and is not a bridge")
        else:
            data = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
            # Two requests: the kernel applies a forward delay before the STP state, and refuses a delay under
            # 2 s while STP is on.
            if data is None or data.get_attr("IFLA_BR_STP_STATE"):
                ipr.link("set", index=msg["index"], kind="bridge", br_stp_state=0)
            if data is None or data.get_attr("IFLA_BR_FORWARD_DELAY"):
                ipr.link("set", index=msg["index"], kind="bridge", br_forward_delay=0)
        index = msg["index"]
        for have in _ipv4_of(ipr, index):
            if have != want:
                ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
        if want is not None and want not in _ipv4_of(ipr, index):
            kw = {}
            if want.network.prefixlen < 31:  # /31 and /32 have no broadcast address
                kw["broadcast"] = str(want.network.broadcast_address)
            ipr.addr("add", index=index, address=str(want.ip), prefixlen=want.network.prefixlen, **kw)
        if not msg["flags"] & _IFF_UP:
            ipr.link("set", index=index, state="up")


@_off_loop
def delete_link(name: str) -> bool:
    """Delete a link; True if it existed."""
    with _ipr() as ipr:
        msg = _get_link(ipr, check_ifname(name))
        if msg is None:
            return False
        try:
            ipr.link("del", index=msg["index"])
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):  # went away meanwhile (a tap whose QEMU exited)
                return False
            raise
        return True


@_off_loop
def links_with_prefix(prefix: str) -> list[str]:
    """Names of the links whose name starts with prefix, sorted."""
    with _ipr() as ipr:
        names = (msg.get_attr("IFLA_IFNAME") for msg in ipr.link("dump"))
        return sorted(n for n in names if n and n.startswith(prefix))


@_off_loop
def open_tap(name: str, *, bridge: str | None) -> int:
    """Create tap `name`, up and enslaved to `bridge` (None: no bridge), and return its fd for QEMU.

    The tap is not persistent: it exists while some process holds the returned fd, so it disappears when the
    QEMU it is handed to exits (and at once if this process closes it before that). The fd is O_CLOEXEC; the
    caller hands it over with pass_fds. Conflict if a link of that name exists: the tap is created with
    IFF_TUN_EXCL, so even a name taken between a check and the creation is refused, never reused.
    The tap takes its bridge's MTU: a port with a smaller MTU would lower the bridge's.
    """
    check_ifname(name, "tap")
    with _ipr() as ipr:
        br = _bridge(ipr, bridge) if bridge is not None else None
        try:
            fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise CommandFailed(f"cannot open {_TUN_DEVICE}: {e.strerror}") from e
        try:
            flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | _IFF_TUN_EXCL
            try:
                # struct ifreq: 16-byte name, then a union (40 bytes in all) whose first member is the flags.
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.EEXIST):
                    raise Conflict(f"a link named {name!r} already exists") from e
                raise CommandFailed(f"cannot create tap {name!r}: {e.strerror}") from e
            tap = _get_link(ipr, name)
            if tap is None:
                raise CommandFailed(f"tap {name!r} vanished right after it was created")
            kw: dict[str, Any] = {"address": _tap_mac(), "state": "up"}
            if br is not None:
                kw.update(master=br["index"], mtu=br.get_attr("IFLA_MTU"))
            ipr.link("set", index=tap["index"], **kw)
        except BaseException:
            os.close(fd)  # the tap goes with its only fd
            raise
        return fd


@_off_loop
def attach(link: str, bridge: str | None) -> None:
    """Enslave link to bridge; None: release it from any bridge."""
    with _ipr() as ipr:
        msg = _get_link(ipr, check_ifname(link))
        if msg is None:
            raise NotFound(f"link {link!r} does not exist")
        master = _bridge(ipr, bridge)["index"] if bridge is not None else 0  # 0 means nomaster
        ipr.link("set", index=msg["index"], master=master)


@_off_loop
def _networks(ignore_link: str | None) -> list[ipaddress.IPv4Network]:
    nets: set[ipaddress.IPv4Network] = set()
    with _ipr() as ipr:
        skip = None
        if ignore_link is not None:
            msg = _get_link(ipr, check_ifname(ignore_link))
            skip = None if msg is None else msg["index"]
        for a in ipr.addr("dump", family=AF_INET):
            if a["index"] != skip:
                nets.add(_interface(a).network)
        # Routes of every table (policy routing puts VPN routes elsewhere than main). Default routes overlap
        # everything and say nothing about which subnets are in use; the local/broadcast routes the kernel
        # derives from addresses are covered by the addresses themselves.
        for r in ipr.route("dump", family=AF_INET):
            if r["dst_len"] == 0 or r["type"] in (_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST, _RTN_MULTICAST):
                continue
            if skip is not None and r.get_attr("RTA_OIF") == skip:
                continue
            nets.add(ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", strict=False))
    return sorted(nets)


def ipv4_routes_and_addresses(*, ignore_link: str | None = None) -> list[str]:
    """Every IPv4 network of this namespace's routes (but default routes) and addresses, as sorted CIDRs.

    ignore_link leaves out the addresses of that link and the routes through it (a network checking its
    subnet again while its own bridge holds it).
    """
    return [str(n) for n in _networks(ignore_link)]


def overlapping(cidr: str, *, ignore_link: str | None = None) -> list[str]:
    """Those of ipv4_routes_and_addresses() that overlap cidr (to refuse a network's subnet)."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as e:
        raise InvalidInput(f"invalid IPv4 network {cidr!r}: {e}") from e
    return [str(n) for n in _networks(ignore_link) if n.overlaps(net)]


def set_ip_forward(enabled: bool = True) -> None:
    """Set IPv4 forwarding of the current namespace (/proc/sys/net is the namespace's own).

    Turning it on also sets net.ipv4.conf.*.forwarding on every interface: that is the kernel's rule for this
    switch, and what NAT networks need (the host routes between the bridge and its uplinks).
    """
    _IP_FORWARD.write_text("1\n" if enabled else "0\n")


@_off_loop
def ipv4_addresses(link: str) -> list[str]:
    """The IPv4 addresses of link as "address/prefixlen"."""
    with _ipr() as ipr:
        msg = _get_link(ipr, check_ifname(link))
        if msg is None:
            raise NotFound(f"link {link!r} does not exist")
        return [str(a) for a in _ipv4_of(ipr, msg["index"])]


# ----- an uplink NIC moved under a bridge (bridge networks that make their own host bridge) -------------------
_IFF_LOOPBACK = 0x8
_RTPROT_KERNEL = 2  # routes the kernel derives from addresses: they come back with the address on the other link
_RTNH_F_ONLINK = 0x4
_IFA_F_SECONDARY = 0x01
_IFA_F_NOPREFIXROUTE = 0x200
_IFA_FOREVER = 0xFFFFFFFF


def _ifa_key(a: Any) -> tuple[str | None, str | None, int]:
    return a.get_attr("IFA_LOCAL"), a.get_attr("IFA_ADDRESS"), a["prefixlen"]


def _route_key(r: Any) -> tuple[Any, ...]:
    """What makes a route itself, whatever link it goes through (and that its copy on another link shares)."""
    return (
        r.get_attr("RTA_TABLE") or r["table"],
        r.get_attr("RTA_DST"),
        r["dst_len"],
        r["tos"],
        r.get_attr("RTA_PRIORITY") or 0,
        r["type"],
        r.get_attr("RTA_GATEWAY"),
    )


def _route_kwargs(r: Any, oif: int) -> dict[str, Any]:
    """Arguments re-creating route r through link oif: table, destination, TOS, metric, gateway, protocol, scope,
    type, preferred source, realm and metrics (MTU, advmss, …) as they were."""
    kw: dict[str, Any] = {
        "family": AF_INET,
        "table": r.get_attr("RTA_TABLE") or r["table"],
        "dst_len": r["dst_len"],
        "tos": r["tos"],
        "proto": r["proto"],
        "scope": r["scope"],
        "type": r["type"],
        "oif": oif,
        "priority": r.get_attr("RTA_PRIORITY") or 0,
    }
    if r.get_attr("RTA_DST") is not None:
        kw["dst"] = r.get_attr("RTA_DST")
    for attr, key in (("RTA_GATEWAY", "gateway"), ("RTA_PREFSRC", "prefsrc"), ("RTA_FLOW", "flow")):
        if r.get_attr(attr) is not None:
            kw[key] = r.get_attr(attr)
    metrics = r.get_attr("RTA_METRICS")
    if metrics is not None:
        kw["metrics"] = {name: value for name, value in metrics["attrs"]}
    if r["flags"] & _RTNH_F_ONLINK:
        kw["flags"] = _RTNH_F_ONLINK
    return kw


def _routes_via(ipr: Any, index: int) -> list[Any]:
    """The IPv4 routes (every table) that go out through link `index` and that no address of it makes: those
    the kernel made for its addresses come and go with them. Link-scope routes first: a gateway route needs
    its gateway reachable on the link. Multipath routes and routes using nexthop objects are left alone."""
    routes = [
        r
        for r in ipr.route("dump", family=AF_INET)
        if r.get_attr("RTA_OIF") == index and r["proto"] != _RTPROT_KERNEL and r.get_attr("RTA_NH_ID") is None
    ]
    return sorted(routes, key=lambda r: -r["scope"])  # host (254), link (253), then universe (0)


def _move_ipv4(ipr: Any, src: Any, dst: Any) -> None:
    """Move the IPv4 addresses of link src and the routes through it onto link dst: each is added on dst first
    and only then removed from src, so the host keeps its addresses and routes all along. Idempotent."""
    src_name, dst_name = src.get_attr("IFLA_IFNAME"), dst.get_attr("IFLA_IFNAME")
    have = {_ifa_key(a) for a in ipr.addr("dump", family=AF_INET, index=dst["index"])}
    # Primary addresses first, so they are primary on dst as well.
    addrs = sorted(ipr.addr("dump", family=AF_INET, index=src["index"]), key=lambda a: a["flags"] & _IFA_F_SECONDARY)
    for a in addrs:
        if _ifa_key(a) in have:
            continue
        local, peer, _ = _ifa_key(a)
        kw: dict[str, Any] = {
            "index": dst["index"],
            "family": AF_INET,
            "address": peer or local,
            "local": local or peer,
            "prefixlen": a["prefixlen"],
            "scope": a["scope"],
        }
        flags = a.get_attr("IFA_FLAGS") or a["flags"]
        if flags & _IFA_F_NOPREFIXROUTE:
            kw["flags"] = _IFA_F_NOPREFIXROUTE
        for attr, key in (("IFA_BROADCAST", "broadcast"), ("IFA_RT_PRIORITY", "rt_priority")):
            if a.get_attr(attr) is not None:
                kw[key] = a.get_attr(attr)
        label = a.get_attr("IFA_LABEL") or ""
        if label.startswith(src_name + ":") and len(dst_name + label[len(src_name) :]) <= 15:
            kw["label"] = dst_name + label[len(src_name) :]  # an alias such as eth0:1 becomes br0:1
        cache = a.get_attr("IFA_CACHEINFO")
        if cache is not None and cache["ifa_valid"] != _IFA_FOREVER:  # a lease's address: its lifetimes go along
            kw["valid_lft"] = cache["ifa_valid"]
            kw["preferred_lft"] = min(cache["ifa_preferred"], cache["ifa_valid"])
        ipr.addr("add", **kw)

    existing = {_route_key(r) for r in ipr.route("dump", family=AF_INET) if r.get_attr("RTA_OIF") == dst["index"]}
    for r in _routes_via(ipr, src["index"]):
        if _route_key(r) not in existing:
            # append: the route's twin through src still exists, and `add` would refuse the same destination, TOS
            # and metric twice.
            ipr.route("append", **_route_kwargs(r, dst["index"]))
        try:
            ipr.route("del", **_route_kwargs(r, src["index"]))
        except NetlinkError as e:
            if e.code != errno.ESRCH:
                raise

    # Secondary addresses before primaries: deleting a primary takes its secondaries along (or promotes them).
    for a in sorted(
        ipr.addr("dump", family=AF_INET, index=src["index"]), key=lambda a: -(a["flags"] & _IFA_F_SECONDARY)
    ):
        local, peer, prefixlen = _ifa_key(a)
        try:
            ipr.addr("del", index=src["index"], address=peer or local, local=local or peer, prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:
                raise


@_off_loop
def make_uplink_bridge(bridge: str, uplink: str) -> None:
    """Put the host's uplink NIC under bridge `bridge` (made if missing), so that VMs' taps on it reach the LAN.

    The bridge takes the uplink's MAC (a DHCP server or switch of the LAN keeps seeing the same host) and MTU;
    one it creates has STP off and forward delay 0. The uplink becomes a port of the bridge, and the uplink's
    IPv4 addresses and the routes through it (the default route among them, with their gateways, metrics and
    tables) move onto the bridge: each is added on the bridge before it is removed from the uplink, and the
    uplink is enslaved before that, so the host stays reachable throughout (a reply arriving on the port is
    delivered by the bridge, which holds the same MAC). IPv6 is left to the kernel (link-local addresses and
    SLAAC come up on the bridge by themselves). Idempotent: when it is already so, it only reads.
    Conflict if `bridge` exists and is not a bridge, or the uplink is a bridge or a port of another master.
    """
    check_ifname(bridge, "bridge")
    check_ifname(uplink, "uplink")
    if bridge == uplink:
        raise InvalidInput(f"the bridge and its uplink cannot both be {bridge!r}")
    with _ipr() as ipr:
        up = _get_link(ipr, uplink)
        if up is None:
            raise NotFound(f"uplink {uplink!r} does not exist")
        if up["flags"] & _IFF_LOOPBACK or _kind(up) == "bridge":
            raise Conflict(f"link {uplink!r} cannot be a bridge's uplink (it is a {_kind(up) or 'loopback'})")
        mac = up.get_attr("IFLA_ADDRESS")
        br = _get_link(ipr, bridge)
        if br is None:
            ipr.link(
                "add",
                ifname=bridge,
                kind="bridge",
                br_stp_state=0,
                br_forward_delay=0,
                address=mac,
                mtu=up.get_attr("IFLA_MTU"),
            )
            br = _get_link(ipr, bridge)
            if br is None:
                raise CommandFailed(f"bridge {bridge!r} vanished right after it was created")
        elif _kind(br) != "bridge":
            raise Conflict(f"link {bridge!r} exists and is not a bridge")
        master = up.get_attr("IFLA_MASTER") or 0
        if master not in (0, br["index"]):
            raise Conflict(f"uplink {uplink!r} is already a port of another link (index {master})")
        if br.get_attr("IFLA_ADDRESS") != mac:
            ipr.link("set", index=br["index"], address=mac)
        if not br["flags"] & _IFF_UP:
            ipr.link("set", index=br["index"], state="up")
        if master != br["index"]:
            ipr.link("set", index=up["index"], master=br["index"])
        if not up["flags"] & _IFF_UP:
            ipr.link("set", index=up["index"], state="up")
        _move_ipv4(ipr, up, br)


@_off_loop
def release_uplink_bridge(bridge: str, uplink: str) -> None:
    """Undo make_uplink_bridge: the bridge's IPv4 addresses and routes go back onto the uplink (added there
    before they leave the bridge), the uplink leaves the bridge, and the bridge is deleted. Idempotent: with no
    such bridge left, it does nothing.
    Conflict (and nothing changed) if the bridge still has other ports (VMs' taps): their VMs would lose the
    network; or if `bridge` is not a bridge, or the uplink is a port of another one.
    """
    check_ifname(bridge, "bridge")
    check_ifname(uplink, "uplink")
    with _ipr() as ipr:
        br = _get_link(ipr, bridge)
        if br is None:
            return
        if _kind(br) != "bridge":
            raise Conflict(f"link {bridge!r} is not a bridge")
        up = _get_link(ipr, uplink)
        if up is None:
            raise NotFound(f"uplink {uplink!r} does not exist: bridge {bridge!r} is left as it is")
        master = up.get_attr("IFLA_MASTER") or 0
        if master not in (0, br["index"]):
            raise Conflict(f"uplink {uplink!r} is a port of another link (index {master})")
        others = sorted(
            m.get_attr("IFLA_IFNAME")
            for m in ipr.link("dump")
            if m.get_attr("IFLA_MASTER") == br["index"] and m["index"] != up["index"]
        )
        if others:
            raise Conflict(f"bridge {bridge!r} still has ports besides {uplink!r}: {', '.join(others)}")
        if not up["flags"] & _IFF_UP:
            ipr.link("set", index=up["index"], state="up")
        _move_ipv4(ipr, br, up)
        if master == br["index"]:
            ipr.link("set", index=up["index"], master=0)
        try:
            ipr.link("del", index=br["index"])
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise
