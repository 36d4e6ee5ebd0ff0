"""Shared pools and live migration on them, between two vmkit hosts.

Hosts a and b are network namespaces with a daemon each, on a LAN bridge in a third namespace; a storage host
`st` on the same LAN runs a userspace NFSv3 server (nfs-ganesha, with rpcbind) and a userspace iSCSI target
(tgt), plus the LAN's DHCP server, and plays the LAN client that talks to the guest. Both daemons define the
same pools `nas` (nfs) and `san` (iscsi). All traffic stays inside these namespaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.e2e.test_snapshots_e2e import counter, marker, running_with_agent, sh, start_counter, wait_for, write_marker
from tests.netns import Netns, daemon_in, switched_lan
from tests.storage_servers import iscsi_target, nfs_server

pytestmark = pytest.mark.e2e

IQN = "iqn.2026-11.org.vmkit.test:san"
LUN_BYTES = 64 * 1024 * 1024


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


@dataclass
class Cluster:
    a: Daemon
    b: Daemon
    st: Netns
    st_addr: str
    export_dir: Path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with switched_lan("ha", "hb", "st") as (_, [(ha, a_addr), (hb, b_addr), (st, st_addr)]):
        work = Path(tempfile.mkdtemp(prefix="vmkit-shared-"))
        export_dir = work / "export"
        export_dir.mkdir()
        lun = work / "lun1.img"
        with open(lun, "wb") as f:
            f.truncate(LUN_BYTES)
        net = st_addr.rsplit(".", 1)[0]
        dhcp = st.popen(
            ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--interface=eth0", "--bind-interfaces",
             "--except-interface=lo", f"--dhcp-range={net}.100,{net}.150,1h", "--no-resolv", "--no-hosts",
             "--port=0", f"--dhcp-leasefile={work / 'leases'}", "--dhcp-authoritative"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with (
                nfs_server(st, export_dir),
                iscsi_target(st, IQN, [lun]),
                daemon_in(ha, "shda", {"VMKIT_LISTEN": f"{a_addr}:8443"}) as a,
                daemon_in(hb, "shdb", {"VMKIT_LISTEN": f"{b_addr}:8443", "VMKIT_INCOMING_STALL_S": "5"}) as b,
            ):
                secret = j(b, "token", "create", "from-a")["secret"]
                a.cli("remote", "add", "b", f"https://{b_addr}:8443", "--token", secret)
                for d in (a, b):
                    d.cli("pool", "create", "nas", "--type", "nfs", "--server", st_addr, "--export", "/vmkit")
                    d.cli("pool", "create", "san", "--type", "iscsi", "--portal", st_addr, "--target", IQN)
                yield Cluster(a, b, st, st_addr, export_dir)
        finally:
            dhcp.kill()
            dhcp.wait()
            subprocess.run(["rm", "-rf", str(work)], check=False)


def vols(d: Daemon, pool: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in j(d, "volume", "list", pool)}


def test_both_hosts_see_the_same_volumes(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    pools = {p["name"]: p for p in j(a, "pool", "list")}
    assert pools["nas"]["shared"] and pools["nas"]["active"] and pools["nas"]["kind"] == "nfs"
    assert pools["nas"]["path"] == f"nfs://{cluster.st_addr}/vmkit?uid=0&gid=0"
    assert pools["nas"]["available_bytes"] and pools["nas"]["available_bytes"] > 0
    assert pools["san"]["shared"] and pools["san"]["active"]

    # Made on a, through QEMU's NFS client: b lists it (same size and format), and it is a file on the server.
    a.cli("volume", "create", "nas/v1.qcow2", "--size", "64M")
    there = vols(b, "nas")["v1.qcow2"]
    assert there["format"] == "qcow2" and there["capacity_bytes"] == 64 * 1024 * 1024
    assert there["path"].startswith(f"nfs://{cluster.st_addr}/vmkit/v1.qcow2")
    assert (cluster.export_dir / "v1.qcow2").is_file()
    assert not [p.name for p in cluster.export_dir.iterdir() if p.name.startswith(".")]  # no temporary left
    # A full clone made on b shows on a; one into a local pool is a local file; a delete on a is seen on b.
    b.cli("volume", "clone", "nas/v1.qcow2", "nas/v2.qcow2")
    assert vols(a, "nas")["v2.qcow2"]["capacity_bytes"] == 64 * 1024 * 1024
    a.cli("volume", "clone", "nas/v2.qcow2", "default/local.qcow2")
    assert vols(a, "default")["local.qcow2"]["path"].startswith("/")
    a.cli("volume", "delete", "nas/v2.qcow2")
    assert "v2.qcow2" not in vols(b, "nas") and not (cluster.export_dir / "v2.qcow2").exists()
    a.cli("volume", "delete", "default/local.qcow2")
    # The iSCSI target's LUN: listed by both, raw, thick, its exact size.
    for d in (a, b):
        lun = vols(d, "san")["lun1"]
        assert (lun["format"], lun["capacity_bytes"], lun["provisioning"]) == ("raw", LUN_BYTES, "thick")
        assert lun["path"] == f"iscsi://{cluster.st_addr}:3260/{IQN}/1"


def test_what_shared_pools_refuse(cluster: Cluster) -> None:
    a = cluster.a

    def refused(*args: str, words: str) -> None:
        res = a.cli(*args, check=False)
        assert res.returncode != 0 and words in res.stderr, res.stderr

    refused("volume", "create", "nas/thick.raw", "--size", "8M", "--format", "raw", "--prealloc", "full",
            words="cannot preallocate")  # fmt: skip
    refused("volume", "create", "san/lun9", "--size", "8M", words="made on the target")
    refused("volume", "clone", "nas/v1.qcow2", "nas/linked.qcow2", "--linked", words="standalone images only")
    refused("volume", "delete", "san/lun1", words="removed on the target")
    # A server that does not answer, an export it does not have, a target it does not have: nothing recorded.
    refused("pool", "create", "gone", "--type", "nfs", "--server", "10.255.255.1", "--export", "/x", words="NFS")
    refused("pool", "create", "wrong", "--type", "nfs", "--server", cluster.st_addr, "--export", "/nope", words="nope")
    refused("pool", "create", "wrongt", "--type", "iscsi", "--portal", cluster.st_addr,
            "--target", "iqn.2026-11.org.vmkit.test:nosuch", words="nosuch")  # fmt: skip
    refused("pool", "create", "bad", "--type", "nfs", "--server", "h", "--export", "/a,b", words="export")
    refused("pool", "create", "dup", "--type", "nfs", "--server", cluster.st_addr, "--export", "/vmkit",
            words="already")  # fmt: skip
    assert {p["name"] for p in j(a, "pool", "list")} == {"default", "images", "nas", "san"}
    assert "linked.qcow2" not in vols(a, "nas") and "thick.raw" not in vols(a, "nas")


def guest_ip(d: Daemon, name: str) -> str:
    def ip() -> str:
        out = sh(d, name, "ip -4 -o addr show dev eth0")
        return out.split("inet ", 1)[1].split("/", 1)[0] if "inet " in out else ""

    wait_for(lambda: bool(ip()), f"{name}: no address on the LAN", timeout_s=60)
    return ip()


# A LAN client: one TCP connection to the guest's echo service, a line every 50 ms, each echo checked; it prints
# how many round trips it made and exits non-zero at the first error (a reset, a lost or wrong echo).
CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7777), timeout=10)
s.settimeout(10)
end, n = time.monotonic() + float(sys.argv[2]), 0
f = s.makefile("rwb")
while time.monotonic() < end:
    line = f"{n}\\n".encode()
    f.write(line); f.flush()
    if f.readline() != line:
        print(n, flush=True); sys.exit(1)
    n += 1
    time.sleep(0.05)
print(n, flush=True)
"""


def test_live_migration_on_nfs_and_iscsi_keeps_a_tcp_connection(cluster: Cluster) -> None:
    a, b, st = cluster.a, cluster.b, cluster.st
    for d in (a, b):
        d.cli("network", "create", "lan", "--mode", "bridge", "--bridge", "vk-lan", "--uplink", "eth0")
    # Its system disk a full copy of the demo image on the NFS export, a second disk the iSCSI LUN.
    a.cli("vm", "create", "sm", "--image", "demo", "--copy", "--pool", "nas", "--disk", "san/lun1",
          "--memory", "256", "--network", "lan")  # fmt: skip
    disks = {x["name"]: x for x in j(a, "vm", "disks", "sm") if x["device"] == "disk"}
    assert disks["disk0"]["volume"].startswith("nas/") and disks["disk1"]["volume"] == "san/lun1"
    a.cli("vm", "start", "sm")
    running_with_agent(a, "sm")
    write_marker(a, "sm", "ONNFS")
    sh(a, "sm", "printf '%-16s' ONISCSI | dd of=/dev/vdb bs=512 seek=2048 conv=fsync 2>/dev/null")
    start_counter(a, "sm")
    ip = guest_ip(a, "sm")
    sh(a, "sm", "(nc -ll -p 7777 -e cat </dev/null >/dev/null 2>&1 &)")
    client = st.popen([sys.executable, "-c", CLIENT, ip, "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)  # the conversation is under way
    before = counter(a, "sm")
    uuid = a.vm("sm")["uuid"]

    out = j(a, "vm", "migrate", "sm", "b")  # no --copy-storage: only RAM and device state move
    assert out["remote"] == "b" and out["downtime_ms"] is not None and not out["postcopy"]
    assert "sm" not in [v["name"] for v in j(a, "vm", "list")]
    there = b.vm("sm")
    assert there["state"] == "running" and there["uuid"] == uuid
    assert {x["volume"] for x in j(b, "vm", "disks", "sm") if x["device"] == "disk"} == {
        disks["disk0"]["volume"],
        "san/lun1",
    }
    # The shared volumes stayed where they were: the source did not delete them with its copy of the VM.
    name0 = disks["disk0"]["volume"].split("/", 1)[1]
    assert (cluster.export_dir / name0).is_file() and name0 in vols(a, "nas")

    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, f"the TCP connection broke after {stdout.decode().strip()} echoes: {stderr[-600:]}"
    assert int(stdout) > 100  # it kept talking through the move
    running_with_agent(b, "sm")
    after = counter(b, "sm")
    assert after >= before  # no reset
    wait_for(lambda: counter(b, "sm") > after, "the counter stopped after the migration")
    assert marker(b, "sm") == "ONNFS"
    assert sh(b, "sm", "dd if=/dev/vdb bs=512 skip=2048 count=1 2>/dev/null | head -c 16").strip() == "ONISCSI"

    # Deleted on b, its own NFS disk goes from the server; the LUN it was only given stays.
    b.cli("vm", "stop", "sm", "--force")
    b.cli("vm", "delete", "sm")
    assert not (cluster.export_dir / name0).exists()
    assert "lun1" in vols(b, "san")
    for d in (a, b):
        d.cli("network", "delete", "lan")


def test_postcopy_where_qemu_cannot_use_userfaultfd(cluster: Cluster) -> None:
    """QEMU runs unprivileged: with vm.unprivileged_userfaultfd 0 (these machines) the destination's QEMU refuses
    post-copy up front, and the migration is refused before anything moves: the VM runs here as before, its
    shared disk is still on the server (the destination dropped what it made but not that), nothing is there."""
    a, b = cluster.a, cluster.b
    a.cli("vm", "create", "pc", "--image", "demo", "--copy", "--pool", "nas", "--memory", "256", "--network", "user")
    a.cli("vm", "start", "pc")
    running_with_agent(a, "pc")
    disk = next(x["volume"] for x in j(a, "vm", "disks", "pc") if x["device"] == "disk").split("/", 1)[1]
    allowed = Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1"
    res = a.cli("vm", "migrate", "pc", "b", "--postcopy", check=False)
    if allowed:  # a host whose administrator allows it: an idle guest converges without switching
        assert res.returncode == 0, res.stderr
        b.cli("vm", "stop", "pc", "--force")
        b.cli("vm", "delete", "pc")
        return
    assert res.returncode != 0 and "post-copy is not possible" in res.stderr, res.stderr
    assert "vm.unprivileged_userfaultfd is 0" in res.stderr
    assert a.vm("pc")["state"] == "running"
    wait_for(lambda: j(b, "vm", "list") == [], "the destination kept the VM that was coming")
    assert (cluster.export_dir / disk).is_file() and disk in vols(a, "nas") and disk in vols(b, "nas")
    # Without --postcopy it moves.
    j(a, "vm", "migrate", "pc", "b")
    running_with_agent(b, "pc")
    b.cli("vm", "stop", "pc", "--force")
    b.cli("vm", "delete", "pc")
