#!/usr/bin/env python3
"""The Debian image (issue 11): build times, start -> guest agent answering, and start -> SSH and cloud-init done
with a seed; vmkit next to plain QEMU.

A daemon of its own (tests/conftest.py's harness) with a build cache of its own, so that the first build is
cold: debootstrap downloads every package from the host's Debian mirror (network time included), then
configures, makes the initramfs, the disk and the compressed qcow2. Then:
- the same build asked again of the same daemon (its image record has the recipe: answered at once), and of a
  second daemon sharing the build cache (a cache hit: the files are copied into its pool);
- --runs fresh VMs (1024 MiB, 2 vCPUs, TCG, a NIC on QEMU's user networking, no cloud-init seed) booted each
  way, first boot every time: direct kernel boot (`--image debian-12`) and from the disk alone (`--image
  images/<disk volume>`: SeaBIOS, MBR, syslinux, the same kernel); the figure runs from the start call until
  GET /v1/vms/NAME/wait?state=agent answers;
- plain QEMU booting the same files by hand (same memory and vCPUs, -accel tcg, q35, a virtio disk on a fresh
  overlay of the same qcow2, the agent's virtio-serial port, the same user-networking NIC): spawn -> the agent
  answers guest-sync-delimited. Runs alternate vmkit / plain, so each pair shares the machine's load.
Then, with a cloud-init NoCloud seed (--seed-only: this part alone, with the image of the tests' build cache),
--runs first boots each way, alternated, from the start call (vmkit) or the spawn (plain QEMU) until:
- QEMU is running (vmkit's start call returns; plain: QMP query-status says running);
- SSH: sshd on port 22 of the guest's lease address sends its banner (`SSH-2.0-…`), polled from inside the
  namespace (a TCP connect every 0.05 s once the lease is there, then a read);
- cloud-init done: one ssh login (the seed's user and key) runs a shell loop that prints a line as soon as
  /run/cloud-init/result.json exists (written at the end of cloud-init's last stage: what `cloud-init status`
  reports as done; the loop polls every 0.05 s with no Python, where `cloud-init status --wait` would import
  cloud-init under TCG and poll every 0.25 s); the figure is when that line reaches the host, and the same
  session then checks that `cloud-init status` says done.
With each, QEMU's CPU time (all its threads) and the time its threads spent runnable but waiting for a CPU, by
then (from /proc schedstat: how much of a difference is the machine's load), and the daemon's CPU time from the
start to cloud-init done (in plain runs it serves only the bench's lease polls: GET /v1/networks/NET/leases
every 0.1 s until the guest's MAC has one, the same way for both).
vmkit: a daemon in a network namespace of the bench's own (tests/netns.py), a NAT network there, each VM made by
`vmkit vm create --image debian-12 --ssh-key … --user … --hostname …` on it. Plain QEMU: the argv vmkit ran for
that VM (bench/replay.py: same machine, kernel, initrd, cmdline, devices), a fresh overlay of the same image, a
seed ISO made by hand (`xorriso -as mkisofs -V cidata -J -r` from a meta-data and user-data written here: same
user, key and host name; checked equal to vmkit's), its NIC a tap made by hand on the network's bridge with a
MAC of its own (so vmkit's dnsmasq leases it an address too).
Prints tables; never fails on timing. Run as root: `make bench` (or .venv/bin/python bench/debian.py).
Everything it made (QEMUs, daemons, namespaces, taps, state dirs, cache) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.concurrent_start import _schedstat  # noqa: E402
from bench.network import in_netns, tap_by_name  # noqa: E402
from bench.replay import own, plain_argv, stats, table, wait_running  # noqa: E402
from tests.conftest import CACHE_DIR, Daemon  # noqa: E402 - the same daemon harness the tests use
from tests.netns import Netns, daemon_in, namespaces  # noqa: E402

MEMORY_MIB = 1024
VCPUS = 2
AGENT_TIMEOUT_S = 300
SEED_TIMEOUT_S = 600  # start -> cloud-init done, at most (~40 s on a quiet machine, 90 s seen under load)
NET, SUBNET, TAP = "lab", "192.168.233.0/24", "pdeb"  # the plain QEMU's tap is TAP0, on NET's bridge
USER, HOST = "ada", "deb-bench"
# The seed by hand, as one would write it for plain QEMU: what vmkit writes for --user/--ssh-key/--hostname.
HAND_USER_DATA = """#cloud-config
hostname: {host}
users:
- default
- name: {user}
  sudo: ALL=(ALL) NOPASSWD:ALL
  shell: /bin/bash
  lock_passwd: true
  ssh_authorized_keys:
  - {key}
locale: C.UTF-8
manage_etc_hosts: true
ssh_genkeytypes:
- ed25519
"""
# Run over ssh: a line as soon as cloud-init's last stage wrote result.json, then cloud-init's own word on it.
WAIT_DONE = "while [ ! -e /run/cloud-init/result.json ]; do sleep 0.05; done; echo done; cloud-init status"
SSH_OPTS = ("-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10")  # fmt: skip


def build(d: Daemon) -> tuple[float, dict[str, Any]]:
    """(seconds, image) for POST /v1/images/build/debian-12 until the image is registered."""
    t0 = time.monotonic()
    res = d.api.post("/v1/images/build/debian-12", {})
    if "operation" in res:
        op = res["operation"]
        while op["status"] == "running":
            op = d.api.get(f"/v1/operations/{op['id']}?wait_s=1")
        if op["status"] != "success":
            raise RuntimeError(f"build failed: {op['error']}")
        return time.monotonic() - t0, op["result"]
    return time.monotonic() - t0, res["image"]


def vmkit_boot(d: Daemon, name: str, image: str) -> float:
    """A fresh VM from image, started: seconds from the start call until the daemon sees the agent."""
    d.api.post(
        "/v1/vms",
        {"name": name, "image": image, "memory_mib": MEMORY_MIB, "vcpus": VCPUS, "networks": [{"network": "user"}]},
    )
    t0 = time.monotonic()
    d.api.post(f"/v1/vms/{name}/start")
    d.api.get(f"/v1/vms/{name}/wait?state=agent&timeout_s={AGENT_TIMEOUT_S}")
    took = time.monotonic() - t0
    d.api.post(f"/v1/vms/{name}/destroy")
    d.api.request("DELETE", f"/v1/vms/{name}")
    return took


def agent_answers(path: Path, deadline: float) -> None:
    """Until the guest agent behind the socket at path answers guest-sync-delimited."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(str(path))
            sync_id = random.randrange(1, 1 << 31)
            s.sendall(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode() + b"\n")
            buf = b""
            while True:
                buf += s.recv(4096)  # a timeout (OSError) means no agent yet: connect again
                if b"\xff" in buf and f'"return": {sync_id}'.encode() in buf.rpartition(b"\xff")[2]:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"no guest agent on {path}")


def plain_boot(image: dict[str, Any], disk: str, work: Path, *, direct: bool) -> float:
    """QEMU started by hand on a fresh overlay of disk (the image's): seconds from spawn until the agent answers."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    overlay = work / "disk.qcow2"
    subprocess.run(  # noqa: S603
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(overlay)], check=True
    )
    boot = ["-kernel", image["kernel"], "-initrd", image["initrd"], "-append", image["cmdline"]] if direct else []
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(MEMORY_MIB), "-smp", str(VCPUS),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"file,id=ser,path={work}/serial.log", "-serial", "chardev:ser",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={work}/qga.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        *boot,
        "-blockdev", f"driver=file,filename={overlay},node-name=f0",
        "-blockdev", "driver=qcow2,file=f0,node-name=d0",
        "-device", "virtio-blk-pci,drive=d0,bootindex=1",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        agent_answers(work / "qga.sock", t0 + AGENT_TIMEOUT_S)
        return time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@dataclass
class Lab:
    """The seeded runs' setting: a daemon with NET, the ssh key its VMs get, a dir for plain QEMU's files."""

    d: Daemon
    key: Path  # the private key; key.pub is given to the VMs
    work: Path


def lease(d: Daemon, mac: str, deadline: float) -> str:
    """The address vmkit's dnsmasq on NET leased to mac (a vmkit VM's or not), once it has."""
    while time.monotonic() < deadline:
        for ls in d.api.get(f"/v1/networks/{NET}/leases"):
            if ls["mac"] == mac:
                return str(ls["ip"])
        time.sleep(0.1)
    raise TimeoutError(f"no lease for {mac}")


def ssh_banner(ip: str, deadline: float) -> float:
    """When sshd on ip:22 first sends its banner: a TCP connect every 0.05 s (refused, or no answer in 0.5 s,
    until sshd listens), then a read."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((ip, 22), timeout=0.5) as s:
            s.settimeout(10)
            buf = b""
            while chunk := s.recv(256):
                buf += chunk
                if b"SSH-2.0-" in buf:
                    return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"no SSH banner from {ip}")


def cloud_init_done(lab: Lab, ip: str, deadline: float) -> float:
    """When the guest at ip says cloud-init is done: WAIT_DONE over one ssh login as USER (logging in again while
    sshd refuses, e.g. before systemd-user-sessions removed /run/nologin); the time its first line arrives."""
    argv = ["ssh", *SSH_OPTS, "-i", str(lab.key), f"{USER}@{ip}", WAIT_DONE]
    err = ""
    while time.monotonic() < deadline:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: S603
        timer = threading.Timer(deadline - time.monotonic(), proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            at = time.monotonic()
            rest, err = proc.communicate()
        finally:
            timer.cancel()
        if first.strip() == "done":
            if "status: done" not in rest:
                raise RuntimeError(f"{ip}: result.json is there but cloud-init status says {rest!r}")
            return at
        time.sleep(0.2)
    raise TimeoutError(f"{ip}: cloud-init not done ({err.strip()})")


def daemon_cpu(lab: Lab) -> float:
    assert lab.d.proc is not None  # `ip netns exec` execs the daemon: the pid is the daemon's
    return _schedstat(lab.d.proc.pid)[0]


def first_boot(lab: Lab, mac: str, t0: float, pid: int, cpu0: float) -> dict[str, float]:
    """Seconds from t0 (the start) until the guest with NIC mac on NET answers SSH and has cloud-init done; with
    its QEMU's (pid) CPU time by then, how long its threads waited for a CPU (the machine's load), and the
    daemon's CPU time since it had cpu0 (daemon_cpu before the start)."""
    deadline = t0 + SEED_TIMEOUT_S
    ip = lease(lab.d, mac, deadline)
    out = {"ssh": ssh_banner(ip, deadline) - t0}
    out["ssh cpu"], out["ssh wait"] = _schedstat(pid)
    out["done"] = cloud_init_done(lab, ip, deadline) - t0
    out["done cpu"], out["done wait"] = _schedstat(pid)
    out["daemon cpu"] = daemon_cpu(lab) - cpu0
    return out


def hand_seed(lab: Lab, work: Path) -> Path:
    """The seed ISO made by hand: meta-data (a new instance-id) and HAND_USER_DATA, labelled cidata."""
    src = work / "seed"
    src.mkdir()
    (src / "meta-data").write_text(f"instance-id: {uuid.uuid4()}\nlocal-hostname: {HOST}\n")
    key = lab.key.with_suffix(".pub").read_text().strip()
    (src / "user-data").write_text(HAND_USER_DATA.format(host=HOST, user=USER, key=key))
    iso = work / "seed.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", "cidata", "-J", "-r", str(src)],  # noqa: S603
                   check=True, capture_output=True)  # fmt: skip
    return iso


def same_seed(lab: Lab, name: str) -> None:
    """Refuse to compare anything if the hand-made seed says other than vmkit's for VM name."""
    files = lab.d.api.get(f"/v1/vms/{name}/cloud-init")["files"]
    key = lab.key.with_suffix(".pub").read_text().strip()
    hand = yaml.safe_load(HAND_USER_DATA.format(host=HOST, user=USER, key=key))
    if yaml.safe_load(files["user_data"]) != hand or yaml.safe_load(files["meta_data"])["local-hostname"] != HOST:
        raise RuntimeError(f"the hand-made seed differs from vmkit's: {files}")


def vmkit_seeded(lab: Lab, name: str) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """A fresh VM with a seed on NET, started: (first_boot's figures and "running", start call -> running; the
    argv vmkit ran; the VM). The VM is left shut off (its disks are plain_seeded's)."""
    d = lab.d
    seed = ["--ssh-key", str(lab.key.with_suffix(".pub")), "--user", USER, "--hostname", HOST]
    d.cli("vm", "create", name, "--image", "debian-12", "--memory", str(MEMORY_MIB), "--vcpus", str(VCPUS),
          "--network", NET, *seed)  # fmt: skip
    vm = d.vm(name)
    cpu0 = daemon_cpu(lab)
    t0 = time.monotonic()
    d.api.post(f"/v1/vms/{name}/start")
    running = time.monotonic() - t0
    try:
        argv = json.loads((d.run_dir / "vms" / name / "argv.json").read_text())  # gone once it stops
        figures = first_boot(lab, vm["nics"][0]["mac"], t0, d.vm(name)["pid"], cpu0)
    finally:
        d.api.post(f"/v1/vms/{name}/destroy")
    return {"running": running, **figures}, argv, vm


def plain_seeded(lab: Lab, argv: list[str], vm: dict[str, Any], work: Path) -> dict[str, float]:
    """Plain QEMU with argv (vmkit's for vm), a fresh overlay of the same image, the hand-made seed, its NIC on
    TAP0 with a MAC of its own: first_boot's figures and "running", spawn -> running."""
    shutil.rmtree(work, ignore_errors=True)
    out, qmp = plain_argv(argv, vm, work)
    seed_disk = work / f"disk{next(i for i, x in enumerate(vm['disks']) if x['cloud_init'])}.qcow2"
    seed_disk.unlink()  # plain_argv's empty overlay for it: the hand-made ISO goes there instead
    iso, mac = str(hand_seed(lab, work)), ":".join(f"{b:02x}" for b in (0x52, 0x54, 0, *random.randbytes(3)))
    out = [re.sub(r"\bmac=[0-9a-f:]+", f"mac={mac}", a.replace(str(seed_disk), iso)) for a in tap_by_name(out, TAP)]
    cpu0 = daemon_cpu(lab)
    t0 = time.monotonic()
    proc = subprocess.Popen(out, pass_fds=[qmp.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    qmp.close()
    try:
        wait_running(work / "qmp.sock", proc)
        running = time.monotonic() - t0
        return {"running": running, **first_boot(lab, mac, t0, proc.pid, cpu0)}
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def seeded_runs(ns: Netns, cache: Path, runs: int) -> dict[str, list[dict[str, float]]]:
    """--runs first boots with a seed each way, alternated. Runs in a thread inside ns (setns is per thread, and
    what it spawns is there too): the TCP probes, ssh and plain QEMU see NET's bridge as vmkit's guests do."""
    res: dict[str, list[dict[str, float]]] = {"vmkit": [], "plain": []}
    with daemon_in(ns, "vmkit-bench-deb-", {"VMKIT_CACHE_DIR": str(cache)}, demo=False) as d:
        build(d)  # a hit in cache
        d.api.post("/v1/networks", {"name": NET, "mode": "nat", "subnet": SUBNET})
        bridge = d.api.get(f"/v1/networks/{NET}")["bridge"]
        ns.run(["ip", "tuntap", "add", "dev", f"{TAP}0", "mode", "tap"])
        ns.run(["ip", "link", "set", f"{TAP}0", "master", bridge, "up"])
        lab = Lab(d, d.root / "bench" / "id_ed25519", d.root / "bench")
        lab.work.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(lab.key)], check=True)
        for i in range(runs):
            name = f"seed{i}"
            figures, argv, vm = vmkit_seeded(lab, name)
            res["vmkit"].append(figures)
            if i == 0:
                same_seed(lab, name)
            res["plain"].append(plain_seeded(lab, argv, vm, lab.work / "plain"))
            d.api.request("DELETE", f"/v1/vms/{name}")
    return res


def build_and_agent(root: Path, runs: int) -> tuple[Path, dict[str, Any]]:
    """The build figures and the start -> agent boots (no seed), in root; (the build cache made, the figures)."""
    cache = root / "cache"
    d = Daemon(root / "a", {"VMKIT_CACHE_DIR": str(cache)})
    d2 = Daemon(root / "b", {"VMKIT_CACHE_DIR": str(cache)})
    (root / "a").mkdir()
    (root / "b").mkdir()
    boots: dict[str, list[float]] = {"vmkit direct": [], "plain direct": [], "vmkit disk": [], "plain disk": []}
    try:
        d.start()
        cold, image = build(d)
        pool, vol = image["disk_volume"].split("/")
        disk = d.api.get(f"/v1/pools/{pool}/volumes/{vol}")["path"]
        meta = json.loads(next(cache.glob("debian-12-*/image.json")).read_text())
        again = [build(d)[0] for _ in range(max(runs, 5))]
        d2.start()
        shared, _ = build(d2)
        d2.cleanup()
        for i in range(runs):
            boots["vmkit direct"].append(vmkit_boot(d, f"deb-k{i}", "debian-12"))
            boots["plain direct"].append(plain_boot(image, disk, root / "plain", direct=True))
            boots["vmkit disk"].append(vmkit_boot(d, f"deb-d{i}", image["disk_volume"]))
            boots["plain disk"].append(plain_boot(image, disk, root / "plain", direct=False))
    finally:
        d.cleanup()
        d2.cleanup()
    return cache, {"cold": cold, "image": image, "meta": meta, "again": again, "shared": shared, "boots": boots}


def print_build_and_agent(f: dict[str, Any]) -> None:
    image, meta, boots = f["image"], f["meta"], f["boots"]
    print(
        f"Debian 12 image: kernel {image['kernel_version']}, qcow2 {image['disk_file_bytes'] / 1e6:.1f} MB "
        f"(virtual {image['recipe']['size_bytes'] >> 30} GiB), mirror {image['recipe']['mirror']}"
    )
    table(
        "build",
        ("figure", "time"),
        [
            ("cold build (empty cache: downloads included), API call -> registered", f"{f['cold']:.1f} s"),
            ("… of which the build itself (image.json build_seconds)", f"{meta['build_seconds']:.1f} s"),
            *((f"    step {name}", f"{secs:.1f} s") for name, secs in meta.get("step_seconds", {}).items()),
            ("same recipe again, same daemon (its image record)", stats(f["again"])),
            ("same recipe, another daemon (build cache hit: files copied into its pool)", f"{f['shared']:.2f} s"),
        ],
    )
    table(
        f"start -> guest agent answering ({MEMORY_MIB} MiB, {VCPUS} vCPUs, TCG, no seed; first boot each run)",
        ("boot", "vmkit: start call -> agent", "plain QEMU by hand: spawn -> agent"),
        [
            ("direct kernel boot", stats(boots["vmkit direct"], digits=1), stats(boots["plain direct"], digits=1)),
            ("from the disk (syslinux)", stats(boots["vmkit disk"], digits=1), stats(boots["plain disk"], digits=1)),
        ],
    )


SEEDED_ROWS = {
    "running": "QEMU running (vCPUs go)",
    "ssh": "SSH banner on port 22",
    "ssh cpu": "… QEMU's CPU time by then",
    "ssh wait": "… its threads runnable, waiting for a CPU",
    "done": "cloud-init done (result.json)",
    "done cpu": "… QEMU's CPU time by then",
    "done wait": "… its threads runnable, waiting for a CPU",
    "daemon cpu": "vmkit daemon's CPU time, start -> done",
}


def print_seeded(res: dict[str, list[dict[str, float]]]) -> None:
    rows = []
    for key, what in SEEDED_ROWS.items():
        vm, pl = [r[key] for r in res["vmkit"]], [r[key] for r in res["plain"]]
        digits = 3 if key in ("running", "daemon cpu") else 1
        paired = [a - b for a, b in zip(vm, pl, strict=True)]
        rows.append((what, stats(vm, digits=digits), stats(pl, digits=digits), own(vm, pl), stats(paired, digits=2)))
    table(
        f"start -> first boot with a cloud-init seed ({MEMORY_MIB} MiB, {VCPUS} vCPUs, TCG, NAT network, "
        f"{len(res['vmkit'])} runs each, alternated; target: vmkit - plain <= +0.1 s)",
        ("until", "vmkit: start call ->", "plain QEMU: spawn ->", "vmkit - plain (medians)", "paired (run by run)"),
        rows,
    )
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    only = f"only the boots with a cloud-init seed, with the image from the tests' build cache ({CACHE_DIR})"
    ap.add_argument("--seed-only", action="store_true", help=only)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmkit-bench-debian-"))
    try:
        cache, first = (CACHE_DIR, None) if args.seed_only else build_and_agent(root, args.runs)
        with namespaces("deb") as (ns,), ThreadPoolExecutor(1, initializer=in_netns(ns)) as inside:
            seeded = inside.submit(seeded_runs, ns, cache, args.runs).result()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if first is not None:
        print_build_and_agent(first)
    print_seeded(seeded)


if __name__ == "__main__":
    main()
