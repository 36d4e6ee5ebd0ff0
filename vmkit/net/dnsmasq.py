"""One dnsmasq per vmkit network: DHCP and DNS on that network's bridge and nowhere else, the way libvirt runs it.

Lifetime. dnsmasq daemonizes itself (fork, setsid, fork). Its foreground process exits once its sockets are bound
and the grandchild has written the pid file — with status 0, or non-zero and dnsmasq's own message on stderr if it
could not start (address in use, bad option) — so `start` runs it as an ordinary command and then reads the pid
file. The grandchild lives in a session of its own, is re-parented away from the daemon, has its std fds on
/dev/null and none of ours (and no parent-death signal: that is not inherited across fork): it outlives the
daemon, and a signal to the daemon's process group never reaches it. A later daemon finds it through the pid
file, trusting that pid only while /proc/PID/cmdline is dnsmasq with exactly this network's `--conf-file=`, so a
recycled pid is never taken, or signalled, for ours. (Under systemd, the daemon's unit needs KillMode=process, as
libvirtd's has, or stopping the unit kills every dnsmasq in its cgroup with it.)

Privileges. dnsmasq starts as root: it reads the conf file, opens the lease and pid files and binds its sockets,
then drops to `user`:`group` (keeping only the capabilities bind-dynamic and DHCP need). It reads dhcp-hostsfile
and addn-hosts after the drop — the first time as well as on each SIGHUP — so:
- the directory is root:GROUP 0710: dnsmasq's group may pass through it, nobody else may look in; every directory
  above it must be searchable by dnsmasq too. `start` checks that, because otherwise dnsmasq only logs "Permission
  denied" and serves no names and no static leases (a 0700 state dir above it is enough to cause that).
- the host lists and the lease file are owned by USER, mode 0600 (dnsmasq rewrites the lease file in place through
  the descriptor it opened as root, but owning it keeps that working should it ever reopen it).
- the conf file stays root's, 0600: only root reads it, and a dnsmasq able to rewrite its own conf could give
  itself a dhcp-script that the next start would run as root.
- dnsmasq writes the pid file as root and chowns it to USER (so that it could unlink it on exit; it cannot here,
  the directory is not writable to it). `stop` removes it.

DNS. dnsmasq answers from its own data only: the host list (NAME and NAME.DOMAIN) and the names of its DHCP
clients. It reads neither /etc/hosts (the host's own names are not the guests' business) nor /etc/resolv.conf,
and has no upstream server, so it forwards nothing: other names are answered REFUSED (dotted) or NXDOMAIN (plain
names, domain-needed), and a guest's lookups never make the host send DNS traffic anywhere. A network that wants
forwarding would add `server=` lines chosen explicitly, not whatever the host's resolv.conf says at the time.

IPv4 only. Every function here blocks (start: ~10 ms); async callers use asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pwd
import re
import select
import signal
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import CommandFailed, Conflict, InvalidInput, Timeout
from vmkit.model.names import valid_name
from vmkit.model.network import MAC_PATTERN
from vmkit.util import proc

DNSMASQ = "/usr/sbin/dnsmasq"
# Debian's dnsmasq-base creates this system user (primary group nogroup) in its postinst; its uid is dnsmasq's
# alone, unlike nobody's, so no other daemon running as nobody can signal or ptrace our dnsmasq.
DEFAULT_USER = "dnsmasq"
DEFAULT_GROUP = "nogroup"
LEASE_TIME = "1h"  # libvirt's; a guest renews at half of it, so a dead dnsmasq is noticed within 30 min
STOP_TIMEOUT_S = 5.0

CONF_FILE = "dnsmasq.conf"
PID_FILE = "dnsmasq.pid"
LEASE_FILE = "dnsmasq.leases"
HOSTS_FILE = "dnsmasq.hostsfile"  # dhcp-hostsfile: MAC -> address and name
ADDN_HOSTS_FILE = "dnsmasq.addnhosts"  # addn-hosts: address -> names

_MAC_RE = re.compile(MAC_PATTERN)
# A DNS label (underscores too: dnsmasq takes them, and VM names may have them). No dot: a VM named `example.com`
# must not make dnsmasq answer for example.com; such a VM gets its lease but no name.
_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DOMAIN_RE = re.compile(rf"{_LABEL_RE.pattern}(\.{_LABEL_RE.pattern})*")
_ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# Everything written into the conf file must be unable to end a line, start a comment or be split at a comma.
_PATH_RE = re.compile(r"/[A-Za-z0-9._+/-]*")


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidInput(f"invalid {what} {value!r}: an IPv4 address like 192.168.122.1") from None


def dns_name(name: str) -> bool:
    """True if `name` may be published in DNS as NAME and NAME.DOMAIN."""
    return _LABEL_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class Host:
    """A guest dnsmasq knows by MAC: a fixed address if `ip` is set (else one from the range), and its name.

    The name is a VM name; one that is not a DNS label (it has a dot) gets no DNS entry (see dns_name).
    """

    mac: str
    ip: str | None
    name: str

    def __post_init__(self) -> None:
        if _MAC_RE.fullmatch(self.mac) is None:
            raise InvalidInput(f"invalid MAC {self.mac!r}: six lower-case hex pairs like 52:54:00:12:34:56")
        if self.ip is not None:
            _ipv4(self.ip, f"address of host {self.name!r}")
        if not valid_name(self.name):
            raise InvalidInput(f"invalid host name {self.name!r}")


@dataclass(frozen=True)
class DnsmasqConfig:
    network: str  # vmkit network name
    bridge: str  # the only interface dnsmasq may listen on
    gateway: str  # the bridge's address, e.g. 192.168.122.1: dnsmasq's address, the guests' router and DNS server
    prefix_len: int
    dhcp_range: tuple[str, str] | None  # None: DNS only, no DHCP
    domain: str  # VM names resolve as NAME and NAME.domain
    directory: Path  # conf, pid, lease and host files; one per network
    user: str = DEFAULT_USER  # what dnsmasq drops root for
    group: str = DEFAULT_GROUP

    def __post_init__(self) -> None:
        # Every field ends up in the conf file, which root reads: nothing may smuggle in a line of its own.
        if not valid_name(self.network):
            raise InvalidInput(f"invalid network name {self.network!r}")
        if re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.bridge) is None or self.bridge in (".", ".."):
            raise InvalidInput(f"invalid bridge name {self.bridge!r}")
        if not 8 <= self.prefix_len <= 30:
            raise InvalidInput(f"prefix length {self.prefix_len} out of range 8-30")
        gateway = _ipv4(self.gateway, "gateway")
        net = self.subnet
        if gateway in (net.network_address, net.broadcast_address):
            raise InvalidInput(f"gateway {gateway} is not a host address of {net}")
        if self.dhcp_range is not None:
            first, last = (_ipv4(a, "DHCP range address") for a in self.dhcp_range)
            hosts = (net.network_address + 1, net.broadcast_address - 1)
            if not hosts[0] <= first <= last <= hosts[1]:
                raise InvalidInput(f"DHCP range {first}-{last} is not an ascending range of host addresses of {net}")
            if first <= gateway <= last:
                raise InvalidInput(f"DHCP range {first}-{last} contains the gateway {gateway}")
        if _DOMAIN_RE.fullmatch(self.domain) is None or len(self.domain) > 253:
            raise InvalidInput(f"invalid DNS domain {self.domain!r}")
        if _PATH_RE.fullmatch(str(self.directory)) is None:
            raise InvalidInput(f"dnsmasq directory {str(self.directory)!r}: an absolute path of A-Z a-z 0-9 . _ + - /")
        for account in (self.user, self.group):
            if _ACCOUNT_RE.fullmatch(account) is None:
                raise InvalidInput(f"invalid user or group name {account!r}")

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.gateway}/{self.prefix_len}", strict=False)

    @property
    def conf_file(self) -> Path:
        return self.directory / CONF_FILE

    @property
    def pid_file(self) -> Path:
        return self.directory / PID_FILE

    @property
    def lease_file(self) -> Path:
        return self.directory / LEASE_FILE

    @property
    def hosts_file(self) -> Path:
        return self.directory / HOSTS_FILE

    @property
    def addn_hosts_file(self) -> Path:
        return self.directory / ADDN_HOSTS_FILE


# ----- pure text -----------------------------------------------------------------------------------------------


def config_text(cfg: DnsmasqConfig) -> str:
    """The conf file for cfg. No side effects; golden-tested."""
    lines = [
        f"# vmkit network {cfg.network}: written by vmkit at each start, edits are lost",
        # Listening: the bridge and nothing else. dnsmasq adds lo by itself whenever interface= is given, hence
        # except-interface. bind-dynamic (not bind-interfaces) binds the bridge's own addresses and also drops
        # queries that reach them through another interface (CVE-2012-3411: a host routing between its networks
        # made a bridge's dnsmasq an open resolver for every network it could reach); it also follows the
        # bridge's addresses as they come and go.
        f"interface={cfg.bridge}",
        "except-interface=lo",
        "bind-dynamic",
        # DNS from our own data only (see the module docstring): no /etc/hosts, no resolv.conf, no upstream.
        "no-hosts",
        "no-resolv",
        "strict-order",
        "domain-needed",
        f"domain={cfg.domain}",
        f"local=/{cfg.domain}/",
        f"addn-hosts={cfg.addn_hosts_file}",
        f"pid-file={cfg.pid_file}",
        f"user={cfg.user}",
        f"group={cfg.group}",
    ]
    if cfg.dhcp_range is not None:
        first, last = cfg.dhcp_range
        lines += [
            f"dhcp-range={first},{last},{cfg.subnet.netmask},{LEASE_TIME}",
            # The only DHCP server on its bridge: answer a guest that asks for an address it had elsewhere with a
            # NAK at once instead of letting it wait for a server that does not exist.
            "dhcp-authoritative",
            # dnsmasq pings an address before its first offer and waits ~3 s for no reply: 3 s added to every new
            # guest's first boot (measured: 3.1 s against 0.09 s). On a bridge vmkit owns, where every address is
            # handed out by this dnsmasq and its leases persist in the lease file, only a guest configured by hand
            # with an address inside the range could answer, and that is the guest's misconfiguration to own.
            "no-ping",
            f"dhcp-leasefile={cfg.lease_file}",
            f"dhcp-hostsfile={cfg.hosts_file}",
        ]
    return "\n".join(lines) + "\n"


def dhcp_hosts_text(cfg: DnsmasqConfig, hosts: list[Host]) -> str:
    """dhcp-hostsfile: one `dhcp-host` per line, MAC[,IP][,NAME]. Pure."""
    _check_hosts(cfg, hosts)
    lines = []
    for h in hosts:
        fields = [h.mac]
        if h.ip is not None:
            fields.append(h.ip)
        if dns_name(h.name):
            fields.append(h.name)  # the name dnsmasq gives the lease in DNS, whatever the guest calls itself
        if len(fields) > 1:
            lines.append(",".join(fields))
    return "".join(line + "\n" for line in lines)


def addn_hosts_text(cfg: DnsmasqConfig, hosts: list[Host]) -> str:
    """addn-hosts: `IP NAME NAME.DOMAIN` for each host with a fixed address, so it resolves before its first lease.

    Hosts without a fixed address are named through their lease (dhcp_hosts_text). Pure.
    """
    _check_hosts(cfg, hosts)
    return "".join(f"{h.ip} {h.name} {h.name}.{cfg.domain}\n" for h in hosts if h.ip is not None and dns_name(h.name))


def _check_hosts(cfg: DnsmasqConfig, hosts: list[Host]) -> None:
    """Refuse lists dnsmasq would take half of: one MAC, address or DNS name twice, or an address off the subnet."""
    seen: dict[str, set[str]] = {"MAC": set(), "address": set(), "name": set()}
    gateway = ipaddress.IPv4Address(cfg.gateway)
    for h in hosts:
        keys = {"MAC": h.mac, "address": h.ip, "name": h.name.lower() if dns_name(h.name) else None}
        for what, key in keys.items():
            if key is None:
                continue
            if key in seen[what]:
                raise InvalidInput(f"network {cfg.network}: {what} {key} given to two hosts")
            seen[what].add(key)
        if h.ip is not None:
            ip = ipaddress.IPv4Address(h.ip)
            if ip not in cfg.subnet or ip in (cfg.subnet.network_address, cfg.subnet.broadcast_address, gateway):
                raise InvalidInput(
                    f"network {cfg.network}: {h.ip} of host {h.name} is not a guest address of {cfg.subnet}"
                )


@dataclass(frozen=True)
class Lease:
    expires: int  # seconds since the epoch; 0: never
    mac: str
    ip: str
    hostname: str | None
    client_id: str | None


def parse_leases(text: str) -> list[Lease]:
    """dnsmasq's lease file: `EXPIRES MAC IP HOSTNAME CLIENT-ID` per line, `*` for an unknown name or id.

    dnsmasq rewrites the file in place (truncate, then write), so a reader may catch it torn: lines that do not
    parse are skipped, as are the `duid` line and DHCPv6 leases (IAID in place of a MAC).
    """
    leases = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 5 or not fields[0].isdigit():
            continue
        expires, mac, ip, hostname, client_id = fields
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            continue
        leases.append(
            Lease(
                expires=int(expires),
                mac=mac.lower(),
                ip=ip,
                hostname=None if hostname == "*" else hostname,
                client_id=None if client_id == "*" else client_id,
            )
        )
    return leases


# ----- files ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ids:
    uid: int
    gid: int


def _ids(cfg: DnsmasqConfig) -> _Ids:
    try:
        uid = pwd.getpwnam(cfg.user).pw_uid
        gid = grp.getgrnam(cfg.group).gr_gid
    except KeyError as e:
        raise CommandFailed(f"dnsmasq for network {cfg.network}: no such user or group ({e.args[0]})") from None
    return _Ids(uid, gid)


def _prepare_dir(cfg: DnsmasqConfig, ids: _Ids) -> None:
    d = cfg.directory
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Owner and mode are set on every call, not only on creation: a directory left by an older daemon or another
    # user/group setting is brought in line.
    os.chown(d, 0, ids.gid)
    d.chmod(0o710)


def _reachable(directory: Path, ids: _Ids) -> Path | None:
    """The first directory from / down to `directory` that ids cannot search, or None if it can reach it."""
    for d in [*reversed(directory.parents), directory]:
        st = d.stat()
        if st.st_uid == ids.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == ids.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def _write(path: Path, text: str, *, uid: int, gid: int, mode: int) -> bool:
    """Replace path by text atomically (a reader sees the old or the new file), unless it holds text already.

    Returns whether it wrote. No fsync: every file here is derived from the daemon's store and rewritten by the
    next ensure(), which compares contents, so a file torn by a power cut is repaired, not trusted.
    """
    try:
        st = path.stat()
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode) and path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchown(f.fileno(), uid, gid)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _write_hosts(cfg: DnsmasqConfig, hosts: list[Host], ids: _Ids) -> bool:
    dhcp, addn = dhcp_hosts_text(cfg, hosts), addn_hosts_text(cfg, hosts)  # both checked before either is written
    _prepare_dir(cfg, ids)
    wrote = _write(cfg.hosts_file, dhcp, uid=ids.uid, gid=ids.gid, mode=0o600)
    return _write(cfg.addn_hosts_file, addn, uid=ids.uid, gid=ids.gid, mode=0o600) or wrote


def hosts_files(cfg: DnsmasqConfig, hosts: list[Host]) -> None:
    """Write the dhcp-hostsfile and addn-hosts for hosts, each atomically. dnsmasq rereads them on SIGHUP."""
    _write_hosts(cfg, hosts, _ids(cfg))


# ----- the process ---------------------------------------------------------------------------------------------


def _is_ours(pid: int, conf_file: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    # The exact argument, not a substring: another network's directory may have this one's as its prefix.
    ours = os.path.basename(argv[0]) == b"dnsmasq" and f"--conf-file={conf_file}".encode() in argv[1:]
    return ours and state != "Z"  # a zombie has exited; only its parent's wait() is missing


def _running_in(directory: Path) -> int | None:
    try:
        pid = int((directory / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 0 and _is_ours(pid, directory / CONF_FILE) else None


def running(cfg: DnsmasqConfig) -> int | None:
    """The pid of the dnsmasq serving cfg's network, if one runs: pid file, then /proc/PID/cmdline."""
    return _running_in(cfg.directory)


def _pidfd(pid: int, directory: Path) -> int | None:
    """A pidfd for our dnsmasq `pid`, or None if it has gone.

    Opened before the cmdline check: the fd then names the very process checked, so a signal sent through it
    can never reach a process that took over the pid after ours exited.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not _is_ours(pid, directory / CONF_FILE):
        os.close(fd)
        return None
    return fd


def _signal(pid: int, directory: Path, sig: int) -> bool:
    fd = _pidfd(pid, directory)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True


def _check_bridge(cfg: DnsmasqConfig) -> None:
    # With bind-dynamic dnsmasq starts happily on a missing interface and waits for it: that would be "serving"
    # nothing, so insist on the bridge first (looked up in this process's network namespace, as dnsmasq will).
    try:
        socket.if_nametoindex(cfg.bridge)
    except OSError:
        raise Conflict(f"network {cfg.network}: bridge {cfg.bridge} does not exist") from None


def start(cfg: DnsmasqConfig, hosts: list[Host]) -> int:
    """Write the conf and host files, start dnsmasq, and return its pid once it serves (its pid file written).

    Conflict if it already runs (ensure() is the idempotent form) or the bridge is missing; CommandFailed with
    dnsmasq's message if it cannot start.
    """
    if (pid := running(cfg)) is not None:
        raise Conflict(f"dnsmasq for network {cfg.network} already runs (pid {pid})")
    _check_bridge(cfg)
    ids = _ids(cfg)
    _write_hosts(cfg, hosts, ids)
    if (blocked := _reachable(cfg.directory, ids)) is not None:
        raise Conflict(
            f"network {cfg.network}: dnsmasq runs as {cfg.user}:{cfg.group} and could not reach {cfg.directory} "
            f"to read its host lists: {blocked} is not searchable to it (keep the directory under one that is, "
            "such as the daemon's run dir, or give that directory o+x)"
        )
    _write(cfg.conf_file, config_text(cfg), uid=0, gid=0, mode=0o600)
    # Opened without truncating: dnsmasq reads back the leases it gave before a restart (or a host reboot).
    lease_fd = os.open(cfg.lease_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(lease_fd, ids.uid, ids.gid)
        os.fchmod(lease_fd, 0o600)
    finally:
        os.close(lease_fd)
    # A stale pid file must not be mistaken for the new one should dnsmasq fail to write it.
    with contextlib.suppress(FileNotFoundError):
        cfg.pid_file.unlink()
    try:
        proc.run([DNSMASQ, f"--conf-file={cfg.conf_file}"], timeout_s=30)
    except CommandFailed as e:
        raise CommandFailed(f"network {cfg.network}: {e.message}") from None
    # dnsmasq 2.90's foreground process exits only after the pid file is written (never otherwise in 400 starts
    # measured), but a short grace keeps this true of versions that report earlier.
    deadline = time.monotonic() + 1.0
    while (pid := running(cfg)) is None:
        if time.monotonic() > deadline:
            raise CommandFailed(f"network {cfg.network}: dnsmasq exited 0 but is not running (see its syslog)")
        time.sleep(0.005)
    return pid


def ensure(cfg: DnsmasqConfig, hosts: list[Host]) -> int:
    """The pid of cfg's dnsmasq, started if it does not run.

    A running one keeps running when it was started from this very conf text (its host lists are brought up to
    date and reread if they changed); one started from other settings is restarted, since dnsmasq rereads
    its conf file only at start.
    """
    pid = running(cfg)
    if pid is not None:
        try:
            current = cfg.conf_file.read_text() == config_text(cfg)
        except OSError:
            current = False
        if current:
            if _write_hosts(cfg, hosts, _ids(cfg)):
                _signal(pid, cfg.directory, signal.SIGHUP)
            return pid
        stop(cfg)
    return start(cfg, hosts)


def reload(cfg: DnsmasqConfig, hosts: list[Host]) -> None:
    """Rewrite the host lists and make a running dnsmasq reread them (SIGHUP, which also drops its DNS cache).

    A dnsmasq that is not running reads them when next started (ensure).
    """
    _write_hosts(cfg, hosts, _ids(cfg))
    if (pid := running(cfg)) is not None:
        _signal(pid, cfg.directory, signal.SIGHUP)


def _wait_gone(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # a pidfd becomes readable when its process exits
    return bool(poller.poll(int(timeout_s * 1000)))


def stop_dir(directory: Path) -> None:
    """Stop the dnsmasq whose files are in directory (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and remove its
    pid file. No-op if none runs. For directories whose network config is gone."""
    pid = _running_in(directory)
    fd = _pidfd(pid, directory) if pid is not None else None
    if pid is not None and fd is not None:
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            if not _wait_gone(fd, STOP_TIMEOUT_S):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                if not _wait_gone(fd, STOP_TIMEOUT_S):
                    raise Timeout(f"dnsmasq {pid} ({directory}) did not exit after SIGKILL")
        finally:
            os.close(fd)
        # Normally dnsmasq is init's child (it daemonized), but reap it should it have been ours (a subreaper).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    with contextlib.suppress(FileNotFoundError):
        (directory / PID_FILE).unlink()


def stop(cfg: DnsmasqConfig) -> None:
    """Stop cfg's dnsmasq (SIGTERM, wait) and remove its pid file; no-op if it is not running."""
    stop_dir(cfg.directory)


def leases(cfg: DnsmasqConfig) -> list[Lease]:
    """The leases in cfg's lease file (expired ones included until dnsmasq drops them)."""
    try:
        return parse_leases(cfg.lease_file.read_text())
    except FileNotFoundError:
        return []
