#!/usr/bin/env python3
"""The Debian image (issue 11): build times, and start -> guest agent answering, vmkit next to plain QEMU.

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
Prints a table; never fails on timing. Run as root: `make bench` (or .venv/bin/python bench/debian.py).
Everything it made (QEMUs, daemons, state dirs, cache) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import stats, table  # noqa: E402
from tests.conftest import Daemon  # noqa: E402 - the same daemon harness the tests use

MEMORY_MIB = 1024
VCPUS = 2
AGENT_TIMEOUT_S = 300


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmkit-bench-debian-"))
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
        again = [build(d)[0] for _ in range(max(args.runs, 5))]
        d2.start()
        shared, _ = build(d2)
        d2.cleanup()
        for i in range(args.runs):
            boots["vmkit direct"].append(vmkit_boot(d, f"deb-k{i}", "debian-12"))
            boots["plain direct"].append(plain_boot(image, disk, root / "plain", direct=True))
            boots["vmkit disk"].append(vmkit_boot(d, f"deb-d{i}", image["disk_volume"]))
            boots["plain disk"].append(plain_boot(image, disk, root / "plain", direct=False))
    finally:
        d.cleanup()
        d2.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"Debian 12 image: kernel {image['kernel_version']}, qcow2 {image['disk_file_bytes'] / 1e6:.1f} MB "
        f"(virtual {image['recipe']['size_bytes'] >> 30} GiB), mirror {image['recipe']['mirror']}"
    )
    table(
        "build",
        ("figure", "time"),
        [
            ("cold build (empty cache: downloads included), API call -> registered", f"{cold:.1f} s"),
            ("… of which the build itself (image.json build_seconds)", f"{meta['build_seconds']:.1f} s"),
            *((f"    step {name}", f"{secs:.1f} s") for name, secs in meta.get("step_seconds", {}).items()),
            ("same recipe again, same daemon (its image record)", stats(again)),
            ("same recipe, another daemon (build cache hit: files copied into its pool)", f"{shared:.2f} s"),
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


if __name__ == "__main__":
    main()
