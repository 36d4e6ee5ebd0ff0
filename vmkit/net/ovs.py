"""A private Open vSwitch per vmkit daemon: its own ovsdb-server and ovs-vswitchd, userspace datapath.

Everything (conf.db, db.sock, pid files, logs, ovs-vswitchd's control socket) lives in the directory the caller
gives, e.g. RUN_DIR/ovs; the system's openvswitch-switch service is never used (nor /var/run/openvswitch). The
host kernel may lack the openvswitch module, so bridges use datapath_type=netdev: ovs-vswitchd switches the
packets itself and each bridge's own (internal) port is a tap device it creates. The daemons run in the caller's
network namespace and outlive the caller; stop() ends them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from pyroute2 import IPRoute

from vmkit.errors import CommandFailed, InvalidInput
from vmkit.net.links import check_ifname
from vmkit.util import proc

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
_TIMEOUT_S = 30.0
_DAEMONS = ("ovsdb-server", "ovs-vswitchd")


def _dir(directory: Path) -> Path:
    return Path(directory).resolve()


def _sock(d: Path) -> Path:
    return d / "db.sock"


def _env(d: Path) -> dict[str, str]:
    """Point every OVS default path into d, so nothing lands in /var/run/openvswitch or /etc/openvswitch."""
    s = str(d)
    return {"OVS_RUNDIR": s, "OVS_DBDIR": s, "OVS_LOGDIR": s, "OVS_SYSCONFDIR": s}


def _pidfile(d: Path, daemon: str) -> Path:
    return d / f"{daemon}.pid"


def _running_pid(d: Path, daemon: str) -> int | None:
    """The daemon's pid if its pid file names a live process whose command line names this directory's socket."""
    try:
        pid = int(_pidfile(d, daemon).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    sock = str(_sock(d)).encode()
    if not cmdline or not cmdline[0].endswith(daemon.encode()):
        return None  # empty for a zombie; another program if the pid was reused
    if not any(arg.endswith(sock) for arg in cmdline):
        return None
    return pid


def running(directory: Path) -> bool:
    d = _dir(directory)
    return all(_running_pid(d, daemon) is not None for daemon in _DAEMONS)


def ensure(directory: Path) -> None:
    """Start this directory's ovsdb-server and ovs-vswitchd unless both already run. Idempotent."""
    d = _dir(directory)
    if running(d):
        return
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = _env(d)
    db, sock = d / "conf.db", _sock(d)
    if _running_pid(d, "ovsdb-server") is None:
        if not db.exists():
            if not SCHEMA.exists():
                raise CommandFailed(f"Open vSwitch is not installed ({SCHEMA} missing): install openvswitch-switch")
            proc.run(["ovsdb-tool", "create", db, SCHEMA], env=env, timeout_s=_TIMEOUT_S)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a stale socket from a killed server
        proc.run(
            [
                "ovsdb-server",
                db,
                f"--remote=punix:{sock}",
                f"--pidfile={_pidfile(d, 'ovsdb-server')}",
                "--detach",
                "--no-chdir",
                f"--log-file={d / 'ovsdb-server.log'}",
                f"--unixctl={d / 'ovsdb-server.ctl'}",
            ],
            env=env,
            timeout_s=_TIMEOUT_S,
        )
        # The Open_vSwitch table's one row (ovs-ctl does the same); harmless when it exists.
        proc.run(["ovs-vsctl", f"--db=unix:{sock}", "--timeout=10", "--no-wait", "init"], env=env, timeout_s=_TIMEOUT_S)
    if _running_pid(d, "ovs-vswitchd") is None:
        # Taps from QEMU's virtio-net hand over packets whose TCP checksum the guest left to be filled in later
        # (offload); the userspace datapath fills it in only with TSO support on. Without it, ping works but no
        # TCP segment arrives. Read at ovs-vswitchd's start, so set before it.
        proc.run(
            ["ovs-vsctl", f"--db=unix:{sock}", "--timeout=10", "--no-wait", "set", "Open_vSwitch", ".",
             "other_config:userspace-tso-enable=true"],
            env=env, timeout_s=_TIMEOUT_S,
        )  # fmt: skip
        proc.run(
            [
                "ovs-vswitchd",
                f"unix:{sock}",
                f"--pidfile={_pidfile(d, 'ovs-vswitchd')}",
                "--detach",
                "--no-chdir",
                f"--log-file={d / 'ovs-vswitchd.log'}",
                f"--unixctl={d / 'ovs-vswitchd.ctl'}",
            ],
            env=env,
            timeout_s=_TIMEOUT_S,
        )


def stop(directory: Path) -> None:
    """End this directory's ovs-vswitchd and ovsdb-server (SIGTERM, then SIGKILL after 5 s). Idempotent."""
    d = _dir(directory)
    for daemon in ("ovs-vswitchd", "ovsdb-server"):
        pid = _running_pid(d, daemon)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _running_pid(d, daemon) == pid and time.monotonic() < deadline:
            time.sleep(0.02)
        if _running_pid(d, daemon) == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def vsctl(directory: Path, *args: str) -> str:
    """Run `ovs-vsctl ARGS` against this directory's database and return its stdout."""
    d = _dir(directory)
    argv = ["ovs-vsctl", f"--db=unix:{_sock(d)}", "--timeout=10", *args]
    return proc.run(argv, env=_env(d), timeout_s=_TIMEOUT_S).stdout


def _set_up(name: str) -> None:
    """Bring link `name` up (in this namespace); ovs-vswitchd creates it, so wait briefly for it to appear."""
    deadline = time.monotonic() + 5
    with IPRoute() as ipr:
        while True:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("set", index=found[0], state="up")
                return
            if time.monotonic() > deadline:
                raise CommandFailed(f"ovs-vswitchd did not create the link of bridge {name}")
            time.sleep(0.02)


def ensure_bridge(directory: Path, name: str) -> None:
    vsctl(directory, *bridge_args(name))
    _set_up(name)


def delete_bridge(directory: Path, name: str) -> None:
    check_ifname(name, "bridge")
    vsctl(directory, "--if-exists", "del-br", name)


def _vlan(vid: int) -> int:
    if isinstance(vid, bool) or not isinstance(vid, int) or not 1 <= vid <= 4094:
        raise InvalidInput(f"invalid VLAN id {vid!r}: use 1-4094")
    return vid


def port_args(bridge: str, port: str, *, tag: int | None = None, trunks: list[int] | None = None) -> list[str]:
    """The ovs-vsctl arguments that (re)attach link `port` to `bridge`: an access port with tag=N, a trunk with
    trunks=[...], else untagged. Pure (golden-tested); refuses bad names and VLAN ids."""
    check_ifname(bridge, "bridge")
    check_ifname(port, "port")
    if tag is not None and trunks is not None:
        raise InvalidInput("a port takes either tag (access) or trunks, not both")
    args = ["--if-exists", "del-port", port, "--", "add-port", bridge, port]
    if tag is not None:
        args += ["tag=" + str(_vlan(tag))]
    if trunks is not None:
        if not trunks:
            raise InvalidInput("trunks needs at least one VLAN id")
        args += ["trunks=" + ",".join(str(_vlan(v)) for v in trunks)]
    return args


def bridge_args(name: str) -> list[str]:
    """The ovs-vsctl arguments that make bridge `name` (userspace datapath: no kernel module needed). Pure."""
    check_ifname(name, "bridge")
    return ["--may-exist", "add-br", name, "--", "set", "bridge", name, "datapath_type=netdev"]


def add_port(
    directory: Path, bridge: str, port: str, *, tag: int | None = None, trunks: list[int] | None = None
) -> None:
    """(Re)attach link `port` to `bridge` (see port_args)."""
    vsctl(directory, *port_args(bridge, port, tag=tag, trunks=trunks))


def del_port(directory: Path, port: str) -> None:
    check_ifname(port, "port")
    vsctl(directory, "--if-exists", "del-port", port)


def bridges(directory: Path) -> list[str]:
    return vsctl(directory, "list-br").split()
