#!/usr/bin/env python3
"""Network figures: network create/delete, the start latency a NIC adds, VM-to-VM TCP throughput.

Prints tables; never fails on timing. Run as root: `make bench` (or .venv/bin/python bench/network.py).
Everything it builds lives in network namespaces of its own (tests/netns.py), deleted at the end: a vmkit daemon
in one (its bridges, taps, dnsmasq and nftables tables are made there), a hand-made bridge and taps for plain
QEMU in another. Nothing touches the machine's own namespace; the guests only talk to each other.

(1) POST /v1/networks (nat and isolated: bridge, address, dnsmasq, nftables table) and DELETE, through the API.
(2) `vm start` -> running (the API call, as bench/lifecycle.py measures it) for the demo VM with 0, 1 and 4 NICs
    on a nat network, the VM destroyed after each start (not booted to READY); after each, plain QEMU with the
    argv vmkit ran (bench/replay.py), its NICs on taps made beforehand: spawn -> running, what QEMU itself
    spends per NIC. Interleaved rounds; the first is not counted. The daemon runs under `ip netns exec`, which
    mounts a sysfs of its own on /sys and hides /sys/fs/cgroup: VMs start without cgroups here (bench/lifecycle.py
    has the figure with them).
(3) TCP throughput between two demo VMs (256 MiB, 1 vCPU, TCG) on a vmkit nat network (a Linux bridge):
    busybox `nc -l` in one, `dd if=/dev/zero bs=64k | nc` in the other; the sending guest times itself from
    /proc/uptime (busybox nc half-closes at the end of its input and exits when the receiver closes: the time
    covers delivery). Next to it, two plain QEMU processes with vmkit's own argv on a bridge and taps made by
    hand (`ip tuntap`, `ip link set master`; static addresses, no DHCP there), the same guest commands sent over
    the guest agent; two more demo VMs on a vmkit ovs network (Open vSwitch of the daemon's own, in the same
    namespace: ovsdb-server and ovs-vswitchd with the userspace datapath, no kernel module), both access ports of
    VLAN 10, static addresses (ovs networks have no DHCP); and the same nc pair over loopback inside one guest, the
    ceiling the guest's emulated CPU sets without any network. Rounds alternate the four, so they share the
    machine's load of the moment.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import plain_argv, table, wait_running  # noqa: E402
from tests.conftest import Daemon  # noqa: E402 - the same daemon harness the tests use
from tests.netns import Netns, daemon_in, namespaces  # noqa: E402
from vmkit.net import ovs  # noqa: E402

READY = b"VMKIT-DEMO-READY"
NET = "bench"
SUBNET = "192.168.231.0/24"
PLAIN_IPS = ("10.231.0.1", "10.231.0.2")  # the hand-made bridge has no DHCP: static addresses
OVS_NET = "sw"
OVS_VLAN = 10
OVS_IPS = ("10.9.0.1", "10.9.0.2")  # ovs networks have no DHCP either
OVS_VMS = ("orx", "otx")
PORT = 5001
TARGET_CREATE_S = 0.2
TARGET_PER_NIC_S = 0.020
CLONE_NEWNET = 0x40000000

Run = Callable[[str], tuple[int, str]]  # a shell script in a guest -> (exit code, stdout)


class Agent:
    """Just enough of the qemu-guest-agent protocol (guest-sync-delimited, guest-exec) for a plain QEMU."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""
        sync_id = random.randrange(1, 1 << 31)
        self.send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        while b"\xff" not in self.buf:
            self.recv()
        self.buf = self.buf.rpartition(b"\xff")[2]
        while True:
            try:
                if json.loads(self.line()).get("return") == sync_id:
                    break
            except ValueError:
                continue

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("guest agent closed the socket")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            self.recv()
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def call(self, command: str, **arguments: Any) -> Any:
        self.send({"execute": command, "arguments": arguments})
        reply = json.loads(self.line())
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def sh(self, script: str, timeout_s: float = 120) -> tuple[int, str]:
        pid = self.call("guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.call("guest-exec-status", pid=pid)
            if st["exited"]:
                return st.get("exitcode", -1), base64.b64decode(st.get("out-data", "")).decode()
            time.sleep(0.02)
        raise TimeoutError(f"guest-exec {script!r} did not finish")

    def close(self) -> None:
        self.sock.close()


def vmkit_sh(d: Daemon, vm: str) -> Run:
    def run(script: str) -> tuple[int, str]:
        res = d.api.post(f"/v1/vms/{vm}/exec", {"argv": ["/bin/sh", "-c", script], "timeout_s": 120.0})
        return res["exitcode"], base64.b64decode(res["stdout_b64"]).decode()

    return run


def one_round(rx: Run, tx: Run, rx_ip: str, mib: int) -> tuple[float, float]:
    """MB/s (10^6 bytes) of `mib` MiB sent from tx to rx: (timed by the sending guest, by the host around the
    exec call). rx may be tx itself, with 127.0.0.1: the same tools without the network."""
    # The listener's stdin must stay open: busybox nc half-closes towards the peer at EOF on stdin.
    rc, out = rx(f"(sleep 600 | nc -l -p {PORT} >/dev/null) </dev/null >/dev/null 2>&1 &")
    assert rc == 0, out
    rc, out = rx(f"for i in $(seq 100); do netstat -ltn | grep -q ':{PORT} ' && exit 0; usleep 20000; done; exit 1")
    assert rc == 0, "the listener did not come up"
    script = (
        "a=$(cut -d' ' -f1 /proc/uptime); "
        f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc {rx_ip} {PORT}; r=$?; "
        "b=$(cut -d' ' -f1 /proc/uptime); echo $r $a $b"
    )
    t0 = time.monotonic()
    rc, out = tx(script)
    wall = time.monotonic() - t0
    r, a, b = out.split()
    assert rc == 0 and r == "0", out
    rx("killall sleep nc >/dev/null 2>&1; true")
    size = mib * 1024 * 1024 / 1e6
    return size / (float(b) - float(a)), size / wall


def wait_for(path: Path, needle: bytes, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if needle in path.read_bytes():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{needle!r} not seen in {path}")


def lease_of(d: Daemon, vm: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        addrs = json.loads(d.cli("vm", "ifaddr", vm, "--json").stdout)
        if addrs:
            return str(addrs[0]["address"])
        time.sleep(0.3)
    raise TimeoutError(f"{vm}: no DHCP lease")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def networks(d: Daemon, runs: int) -> dict[str, list[float]]:
    """(1): create + start, then delete, of nat and isolated networks through the API."""
    res: dict[str, list[float]] = {}
    for mode in ("nat", "isolated"):
        made: list[float] = []
        gone: list[float] = []
        res[f"{mode}: create + start"], res[f"{mode}: delete"] = made, gone
        for i in range(runs):
            body = {"name": f"{mode[:3]}{i}", "mode": mode, "subnet": f"10.{230 if mode == 'nat' else 229}.{i}.0/24"}
            made.append(timed(lambda body=body: d.api.post("/v1/networks", body)))  # type: ignore[misc]
            info = d.api.get(f"/v1/networks/{body['name']}")
            assert info["active"] and info.get("dnsmasq_pid"), info
            gone.append(timed(lambda n=body["name"]: d.api.request("DELETE", f"/v1/networks/{n}")))  # type: ignore[misc]
    return res


def tap_by_name(argv: list[str], prefix: str) -> list[str]:
    """vmkit's NICs (taps handed over as fds) as taps QEMU opens itself by name: PREFIX0, PREFIX1, ... in order."""
    out, k = [], 0
    for a in argv:
        if re.match(r"tap,id=[^,]+,fd=\d+", a):
            a = re.sub(r",fd=\d+", f",ifname={prefix}{k},script=no,downscript=no", a, count=1)
            k += 1
        out.append(a)
    return out


def in_netns(ns: Netns) -> Callable[[], None]:
    """A preexec_fn moving the child into ns, so a timed spawn does not include `ip netns exec`."""
    fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    return enter


def plain_start(ns: Netns, argv: list[str], vm: dict[str, Any], work: Path) -> float:
    """Seconds from spawning QEMU with vmkit's argv (bench/replay.py; no -S) to QMP's query-status saying
    running, as bench/lifecycle.py measures plain QEMU; then QEMU is killed."""
    out, sock = plain_argv(argv, vm, work)
    enter = in_netns(ns)
    t0 = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603, PLW1509 - the bench is single-threaded
        out, pass_fds=[sock.fileno()], preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    sock.close()
    try:
        wait_running(work / "qmp.sock", proc)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    return elapsed


def nic_latency(d: Daemon, plain: Netns, work: Path, runs: int) -> dict[str, dict[int, list[float]]]:
    """(2): start call -> running with 0, 1 and 4 NICs on NET, each VM destroyed after its start; after each, plain
    QEMU with the argv vmkit ran, its NICs on taps made beforehand in plain (spawn -> running). Interleaved; the
    first round, which records vmkit's argv, is not counted. Seconds by NIC count, for "vmkit" and "plain"."""
    counts = (0, 1, 4)
    for n in counts:
        body: dict[str, Any] = {"name": f"nic{n}", "image": "demo", "memory_mib": 256}
        body |= {"networks": [{"network": NET}] * n} if n else {"nic": False}
        d.api.post("/v1/vms", body)
    for k in range(max(counts)):
        plain.run(["ip", "tuntap", "add", "dev", f"lat{k}", "mode", "tap"])
    argvs: dict[int, list[str]] = {}
    vms = {n: d.vm(f"nic{n}") for n in counts}
    res: dict[str, dict[int, list[float]]] = {"vmkit": {n: [] for n in counts}, "plain": {n: [] for n in counts}}
    for i in range(runs + 1):
        for n in counts[i % 3 :] + counts[: i % 3]:
            t = timed(lambda n=n: d.api.post(f"/v1/vms/nic{n}/start"))  # type: ignore[misc]
            assert d.vm(f"nic{n}")["state"] == "running"
            if not i:
                argvs[n] = tap_by_name(json.loads((d.run_dir / "vms" / f"nic{n}" / "argv.json").read_text()), "lat")
            d.api.post(f"/v1/vms/nic{n}/destroy")
            time.sleep(0.2)  # the killed QEMU's teardown out of the way
            p = plain_start(plain, argvs[n], vms[n], work)
            time.sleep(0.2)
            if i:
                res["vmkit"][n].append(t)
                res["plain"][n].append(p)
    for n in counts:
        d.api.request("DELETE", f"/v1/vms/nic{n}")
    return res


def vmkit_pair(d: Daemon) -> tuple[Run, Run, dict[str, list[str]]]:
    """(3) through vmkit: two VMs on NET, started, not waited for. Returns (rx, tx, the argv vmkit ran for each)."""
    for name in ("rx", "tx"):
        d.api.post("/v1/vms", {"name": name, "image": "demo", "memory_mib": 256, "networks": [{"network": NET}]})
        d.api.post(f"/v1/vms/{name}/start")
    argvs = {name: json.loads((d.run_dir / "vms" / name / "argv.json").read_text()) for name in ("rx", "tx")}
    return vmkit_sh(d, "rx"), vmkit_sh(d, "tx"), argvs


def ovs_pair(d: Daemon) -> None:
    """(3) on Open vSwitch: two VMs on OVS_NET, access ports of VLAN OVS_VLAN, started, not waited for."""
    for name in OVS_VMS:
        nic = {"network": OVS_NET, "vlan": OVS_VLAN}
        d.api.post("/v1/vms", {"name": name, "image": "demo", "memory_mib": 256, "networks": [nic]})
        d.api.post(f"/v1/vms/{name}/start")


def ovs_ready(d: Daemon) -> tuple[Run, Run]:
    """Wait for both ovs guests, give them static addresses, check that they reach each other."""
    for name, ip in zip(OVS_VMS, OVS_IPS, strict=True):
        d.cli("vm", "wait", name, "--for", "agent", "--timeout", "120")
        # Stop the guest's udhcpc first (nothing answers it here): its deconfig would flush the address.
        rc, out = vmkit_sh(d, name)(
            f"kill $(cat /run/udhcpc.eth0.pid) 2>/dev/null; ip addr add {ip}/24 dev eth0 && ip link set eth0 up"
        )
        assert rc == 0, out
    rc, out = vmkit_sh(d, OVS_VMS[1])(f"ping -c 1 -W 5 {OVS_IPS[0]}")
    assert rc == 0, out
    return vmkit_sh(d, OVS_VMS[0]), vmkit_sh(d, OVS_VMS[1])


def plain_pair(
    d: Daemon, ns: Netns, argvs: dict[str, list[str]], work: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """(3) with plain QEMU: vmkit's argv for rx and tx, each on a tap made by hand on a hand-made bridge in ns.
    Started, not waited for; the processes are added to procs."""
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    ns.run(["ip", "link", "set", "br0", "up"])
    for i, name in enumerate(("rx", "tx")):
        tap = f"ptap{i}-0"
        ns.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        ns.run(["ip", "link", "set", tap, "master", "br0", "up"])
        argv, qmp = plain_argv(argvs[name], d.vm(name), work / name)
        # The tap by name (QEMU opens it itself, as root in the namespace) instead of vmkit's handed-over fd.
        argv = tap_by_name(argv, f"ptap{i}-")
        procs.append(ns.popen(argv, pass_fds=[qmp.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        qmp.close()


def plain_ready(work: Path, agents: dict[str, Agent]) -> tuple[Run, Run]:
    """Wait for both plain guests, give them static addresses (no DHCP on the hand-made bridge)."""
    for i, name in enumerate(("rx", "tx")):
        wait_for(work / name / "serial.log", READY)
        agents[name] = Agent(work / name / "qga.sock")
        # Stop the guest's udhcpc first: its deconfig would flush the address.
        rc, out = agents[name].sh(
            "kill $(cat /run/udhcpc.eth0.pid) 2>/dev/null; "
            f"ip addr add {PLAIN_IPS[i]}/24 dev eth0 && ip link set eth0 up"
        )
        assert rc == 0, out
    rc, out = agents["tx"].sh(f"ping -c 1 -W 5 {PLAIN_IPS[0]}")
    assert rc == 0, out
    return agents["rx"].sh, agents["tx"].sh


def throughput(
    d: Daemon, plain: Netns, work: Path, mib: int, rounds: int
) -> tuple[dict[str, list[tuple[float, float]]], str]:
    """(3): the vmkit pair and the plain pair run side by side; rounds alternate vmkit, plain QEMU, and nc over
    loopback inside one vmkit guest (what the guest's own CPU allows without a network), so all share the
    machine's load of the moment; the ovs pair runs alongside too. Returns MB/s (guest-timed, host-timed) by
    kind, and why plain QEMU or OVS is missing if one is."""
    rx, tx, argvs = vmkit_pair(d)
    procs: list[subprocess.Popen[bytes]] = []
    agents: dict[str, Agent] = {}
    note = ovs_note = ""
    try:
        try:
            ovs_pair(d)
        except Exception as e:  # noqa: BLE001 - a figure missing, not a failed bench
            ovs_note = f"ovs VMs did not start: {e!r}"
        try:
            plain_pair(d, plain, argvs, work, procs)
        except Exception as e:  # noqa: BLE001 - a figure missing, not a failed bench
            note = f"plain QEMU did not start: {e!r}"
        for name in ("rx", "tx"):
            d.cli("vm", "wait", name, "--for", "agent", "--timeout", "120")
        rx_ip = lease_of(d, "rx")
        lease_of(d, "tx")
        kinds: dict[str, tuple[Run, Run, str]] = {"vmkit": (rx, tx, rx_ip)}
        if not ovs_note:
            try:
                orx, otx = ovs_ready(d)
                kinds["ovs"] = (orx, otx, OVS_IPS[0])
            except Exception as e:  # noqa: BLE001
                ovs_note = f"ovs guests not usable: {e!r}"
        if not note:
            try:
                prx, ptx = plain_ready(work, agents)
                kinds["plain"] = (prx, ptx, PLAIN_IPS[0])
            except Exception as e:  # noqa: BLE001
                err = b"".join(p.stderr.read() if p.poll() is not None and p.stderr else b"" for p in procs)
                note = f"plain QEMU guests not usable: {e!r} {err.decode(errors='replace')[-300:]}"
        kinds["loopback"] = (tx, tx, "127.0.0.1")
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for _ in range(rounds):
            for kind, (r, t, ip) in kinds.items():
                res[kind].append(one_round(r, t, ip, mib))
        return res, "\n".join(n for n in (note, ovs_note) if n)
    finally:
        for agent in agents.values():
            agent.close()
        for p in procs:  # `ip netns exec` execs QEMU: the pid is QEMU's
            p.kill()
            p.wait()
        for name in ("rx", "tx", *OVS_VMS):
            with contextlib.suppress(Exception):  # an ovs VM may not exist
                d.api.post(f"/v1/vms/{name}/destroy")


def fmt(values: list[float], unit: str = "s") -> str:
    if unit == "ms":
        return f"{statistics.median(values) * 1000:.1f} ms (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"
    if unit == "MB/s":
        return f"{statistics.median(values):.1f} MB/s (min {min(values):.1f}, max {max(values):.1f})"
    return f"{statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="network creates and deletes")
    ap.add_argument("--starts", type=int, default=15, help="VM starts for each NIC count")
    ap.add_argument("--mib", type=int, default=8, help="MiB sent per throughput round")
    ap.add_argument("--rounds", type=int, default=5, help="throughput rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    started = time.monotonic()
    with namespaces("vmkit", "plain") as (host, plain), daemon_in(host, "vmkit-bench-net-") as d:
        try:
            nets = networks(d, args.runs)
            d.api.post("/v1/networks", {"name": NET, "mode": "nat", "subnet": SUBNET})
            d.api.post("/v1/networks", {"name": OVS_NET, "mode": "ovs"})  # starts the daemon's ovsdb + vswitchd
            nics = nic_latency(d, plain, d.root / "latency", args.starts)
            tput, tput_note = throughput(d, plain, d.root / "plain", args.mib, args.rounds)
        finally:
            ovs.stop(d.run_dir / "ovs")  # it outlives the daemon (the namespace's deletion would kill it too)
    elapsed = time.monotonic() - started

    if args.json:
        print(json.dumps({"networks_s": nets, "start_s_by_nics": nics, "throughput_mbps_guest_host": tput}))
        return
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"networks, demo guest under {os.environ.get('VMKIT_ACCEL', 'tcg')}, "
        f"{os.cpu_count()} CPUs; load average at the end {load}; {elapsed:.0f} s in all"
    )
    rows: list[tuple[str, ...]] = [
        (k, fmt(v, "ms"), f"<= {TARGET_CREATE_S * 1000:.0f} ms" if "create" in k else "") for k, v in nets.items()
    ]
    table(
        f"networks through the API (bridge, address, dnsmasq, nftables table), {args.runs} runs",
        ("figure", "median", "target"),
        rows,
    )
    med = statistics.median
    rows = []
    for n in nics["vmkit"]:
        vm, pl = nics["vmkit"][n], nics["plain"][n]
        # Per NIC: the median over rounds of (n NICs - 0 NICs) / n, each pair from the same round.
        per_nic = [(a - b) / n for a, b in zip(vm, nics["vmkit"][0], strict=True)] if n else []
        plain_per_nic = [(a - b) / n for a, b in zip(pl, nics["plain"][0], strict=True)] if n else []
        rows.append(
            (
                f"{n} NIC{'s' if n != 1 else ''}",
                fmt(vm, "ms"),
                f"{med(per_nic) * 1000:+.1f} ms" if n else "",
                fmt(pl, "ms"),
                f"{med(plain_per_nic) * 1000:+.1f} ms" if n else "",
                f"<= {TARGET_PER_NIC_S * 1000:.0f} ms" if n else "",
            )
        )
    table(
        f"start -> running by NICs on a nat network, {len(nics['vmkit'][0])} starts each (medians; per NIC: "
        "paired with the 0-NIC start of the same round; VMs not booted)",
        ("NICs", "vmkit: start call", "per NIC", "plain QEMU: spawn", "per NIC", "target per NIC"),
        rows,
    )
    names = {
        "vmkit": "vmkit nat network (Linux bridge)",
        "ovs": f"vmkit ovs network (OVS userspace datapath, userspace TSO on; VLAN {OVS_VLAN} access ports)",
        "plain": "plain QEMU, hand-made bridge + taps",
        "loopback": "nc over loopback in one guest (no network)",
    }
    rows = []
    for kind, values in tput.items():
        rows.append((names[kind], fmt([g for g, _ in values], "MB/s"), fmt([h for _, h in values], "MB/s")))
    if "ovs" not in tput:
        rows.append(("Open vSwitch", "n/a: see the note below", ""))
    table(
        f"VM-to-VM TCP, {args.mib} MiB per round, {args.rounds} rounds (busybox nc, 256 MiB guests, 1 vCPU each)",
        ("network", "timed in the guest", "timed by the host (exec call)"),
        rows,
    )
    if tput_note:
        print(tput_note)


if __name__ == "__main__":
    main()
