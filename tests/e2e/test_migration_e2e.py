"""Live migration between two vmkit hosts, each a network namespace with its own daemon (own state dir, socket
and TLS listener), joined by veth pairs to a LAN bridge in a third namespace. The demo guest moves with its
disk copied live (--copy-storage): a counter in its RAM keeps counting, data written before is there after,
and a failure leaves it running where it was with nothing left on the other side."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.e2e.guest import boot
from tests.e2e.test_snapshots_e2e import counter, marker, running_with_agent, start_counter, wait_for, write_marker
from tests.netns import Netns, daemon_in, lan


def j(d: Daemon, *args: str) -> Any:
    return json.loads(d.cli(*args, "--json").stdout)


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Daemon, Daemon, Netns]]:
    """Hosts a and b on a LAN; a knows b as remote `b`."""
    with (
        lan("ha", "hb") as [(ha, a_addr), (hb, b_addr)],
        daemon_in(ha, "miga", {"VMKIT_LISTEN": f"{a_addr}:8443"}) as a,
        daemon_in(hb, "migb", {"VMKIT_LISTEN": f"{b_addr}:8443", "VMKIT_INCOMING_STALL_S": "5"}) as b,
    ):
        secret = j(b, "token", "create", "from-a")["secret"]
        a.cli("remote", "add", "b", f"https://{b_addr}:8443", "--token", secret)
        yield a, b, ha


def test_live_migration_with_its_disk_copied(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    a, b, _ = hosts
    boot(a, "mig", "--network", "user")
    running_with_agent(a, "mig")
    write_marker(a, "mig", "BEFORE")
    start_counter(a, "mig")
    before = counter(a, "mig")
    a.cli("vm", "autostart", "mig", "on")
    j(a, "snapshot", "create", "mig", "s1", "--disk-only")
    res = a.cli("vm", "migrate", "mig", "b", "--copy-storage", check=False)
    assert res.returncode != 0 and "snapshots" in res.stderr  # they cannot follow yet
    a.cli("snapshot", "delete", "mig", "s1")
    # A read-only disk too (as a cloud-init seed is): no mirror for it, it is sent whole and stays read-only.
    a.cli("volume", "create", "default/ro.raw", "--size", "4M", "--format", "raw")
    a.cli("vm", "attach-disk", "mig", "default/ro.raw", "--readonly")
    uuid, macs = a.vm("mig")["uuid"], [n["mac"] for n in a.vm("mig")["nics"]]
    out = j(a, "vm", "migrate", "mig", "b", "--copy-storage")
    assert out["remote"] == "b" and out["downtime_ms"] is not None
    assert "mig" not in [v["name"] for v in j(a, "vm", "list")]
    assert not [v for v in j(a, "volume", "list", "default") if v["key"].startswith("default/mig-")]
    there = b.vm("mig")
    assert there["state"] == "running" and there["uuid"] == uuid and [n["mac"] for n in there["nics"]] == macs
    assert there["autostart"]
    ro = [x for x in j(b, "vm", "disks", "mig") if x.get("readonly")]
    assert len(ro) == 1 and ro[0]["volume"].startswith("default/mig-"), ro
    running_with_agent(b, "mig")
    after = counter(b, "mig")
    assert after >= before  # no reset: the same process, still counting
    wait_for(lambda: counter(b, "mig") > after, "the counter stopped after the migration")
    assert marker(b, "mig") == "BEFORE"
    b.cli("vm", "stop", "mig", "--force")
    b.cli("vm", "delete", "mig")
    a.cli("volume", "delete", "default/ro.raw")  # it was only lent to the VM: the source keeps it


def test_refusals_leave_it_running_here(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    a, b, _ = hosts
    boot(a, "stay", "--network", "user")
    # A name taken on the destination: refused before anything moves.
    b.api.post("/v1/vms", {"name": "stay", "memory_mib": 64, "nic": False})
    res = a.cli("vm", "migrate", "stay", "b", "--copy-storage", check=False)
    assert res.returncode != 0 and "already exists" in res.stderr, res.stderr
    b.cli("vm", "delete", "stay")
    # Without --copy-storage on local pools; to an unknown remote.
    assert a.cli("vm", "migrate", "stay", "b", check=False).returncode != 0
    assert a.cli("vm", "migrate", "stay", "nosuch", "--copy-storage", check=False).returncode != 0
    assert a.vm("stay")["state"] == "running"
    assert [v["name"] for v in j(b, "vm", "list")] == []
    assert not [v for v in j(b, "volume", "list", "default")]
    a.cli("vm", "stop", "stay", "--force")
    a.cli("vm", "delete", "stay")


def nothing_there(b: Daemon) -> None:
    wait_for(lambda: j(b, "vm", "list") == [], "the destination kept the VM that was coming", timeout_s=30)
    assert not j(b, "volume", "list", "default")
    assert not [p for p in b.qemu_pids() if p != (b.proc.pid if b.proc else None)]


def test_cancel_link_cut_and_a_dying_destination(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    import subprocess
    import sys
    import time

    a, b, ha = hosts
    boot(a, "slow", "--network", "user")
    running_with_agent(a, "slow")
    start_counter(a, "slow")

    def migrating(*extra: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "vmkit", "vm", "migrate", "slow", "b", "--copy-storage", "--bandwidth", "1"]
        proc = subprocess.Popen([*argv, *extra], env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: j(b, "vm", "list") != [], "the migration did not start", timeout_s=30)
        time.sleep(1)
        return proc

    # migrate-cancel: the VM keeps running here, the destination drops what it made.
    proc = migrating()
    a.cli("vm", "migrate-cancel", "slow")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "cancelled" in err, err
    nothing_there(b)
    assert a.vm("slow")["state"] == "running"
    before = counter(a, "slow")
    wait_for(lambda: counter(a, "slow") > before, "the counter stopped after the cancel")

    # The link cut half-way: cancelled here, and the destination gives up on its own (no byte for 5 s).
    proc = migrating()
    ha.run(["ip", "link", "set", "eth0", "down"])
    try:
        a.cli("vm", "migrate-cancel", "slow")
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert a.vm("slow")["state"] == "running"
    finally:
        ha.run(["ip", "link", "set", "eth0", "up"])
    nothing_there(b)

    # The destination daemon killed as it has made room: the source keeps the VM, the destination's next start
    # removes the half-made one.
    with b.dying_at("incoming-ready"):
        res = a.cli("vm", "migrate", "slow", "b", "--copy-storage", check=False)
        assert res.returncode != 0
    nothing_there(b)
    assert a.vm("slow")["state"] == "running"
    marker_before = counter(a, "slow")
    assert marker_before > 0
    # The destination killed once it runs the guest, before it could say so: never running on both hosts. The
    # source keeps it paused and says why; the destination, restarted, still runs it.
    before = counter(a, "slow")
    with b.dying_at("incoming-finished"):
        res = a.cli("vm", "migrate", "slow", "b", "--copy-storage", check=False)
        assert res.returncode != 0 and "did not say whether it took" in res.stderr, res.stderr
    assert a.vm("slow")["state"] == "paused" and b.vm("slow")["state"] == "running"
    running_with_agent(b, "slow")
    assert counter(b, "slow") >= before
    b.cli("vm", "stop", "slow", "--force")
    b.cli("vm", "delete", "slow")
    a.cli("vm", "resume", "slow")  # as the message says, once it no longer runs there (here: removed)
    running_with_agent(a, "slow")
    assert counter(a, "slow") >= before
    # And after all that, it still moves.
    j(a, "vm", "migrate", "slow", "b", "--copy-storage")
    running_with_agent(b, "slow")
    assert counter(b, "slow") >= marker_before
    b.cli("vm", "stop", "slow", "--force")
    b.cli("vm", "delete", "slow")


def test_offline_migration_of_a_shut_off_vm(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    a, b, _ = hosts
    boot(a, "cold", "--network", "user", "--disk", "16M")
    running_with_agent(a, "cold")
    write_marker(a, "cold", "COLD")
    res = a.cli("vm", "migrate", "cold", "b", "--offline", check=False)
    assert res.returncode != 0 and "shut off" in res.stderr  # it runs
    a.cli("vm", "shutdown", "cold", "--timeout", "60", "--force")
    out = j(a, "vm", "migrate", "cold", "b", "--offline")
    assert out["offline"] and "cold" not in [v["name"] for v in j(a, "vm", "list")]
    assert not [v for v in j(a, "volume", "list", "default") if v["key"].startswith("default/cold-")]
    there = b.vm("cold")
    assert there["state"] == "shut off" and len(there["disks"]) == 2
    assert all(j(b, "volume", "info", d["volume"])["backing"] is None for d in there["disks"])  # flattened
    b.cli("vm", "start", "cold")
    running_with_agent(b, "cold")
    assert marker(b, "cold") == "COLD"
    b.cli("vm", "stop", "cold", "--force")
    b.cli("vm", "delete", "cold")


def test_the_autopilot_gives_up_cleanly_on_a_guest_outrunning_the_link(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    a, b, _ = hosts
    boot(a, "busy", "--network", "user")
    running_with_agent(a, "busy")
    # Rewrites 32 MiB of its RAM (a tmpfs) over and over with random bytes (zero pages would cost QEMU nothing to
    # send): far more than 8 MiB/s gets across.
    a.cli("vm", "exec", "busy", "--", "sh", "-c", "head -c 33554432 /dev/urandom > /run/src", timeout_s=120)
    dirty = "while true; do cp /run/src /run/dirty; done"
    a.cli("vm", "exec", "busy", "--", "sh", "-c", f"({dirty}) </dev/null >/dev/null 2>&1 &")
    args = ("vm", "migrate", "busy", "b", "--copy-storage", "--bandwidth", "8", "--max-downtime-ms", "100")
    res = a.cli(*args, check=False, timeout_s=300)
    assert res.returncode != 0 and "did not converge" in res.stderr, res.stderr
    assert a.vm("busy")["state"] == "running"
    nothing_there(b)
    running_with_agent(a, "busy")
    a.cli("vm", "stop", "busy", "--force")
    a.cli("vm", "delete", "busy")


def test_a_wrong_token_certificate_or_too_little_memory_there(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    """Each refused with a clear error; the VM keeps running here and nothing is left there."""
    a, b, _ = hosts
    boot(a, "pick", "--network", "user")
    url = j(a, "remote", "info", "b")["url"]

    def refused(words: str, *extra: str) -> None:
        res = a.cli("vm", "migrate", "pick", "b", "--copy-storage", *extra, check=False)
        assert res.returncode != 0 and words in res.stderr, res.stderr
        assert a.vm("pick")["state"] == "running"
        nothing_there(b)

    def readd(secret: str) -> None:
        a.cli("remote", "remove", "b")
        a.cli("remote", "add", "b", url, "--token", secret)

    # Post-copy needs every disk on shared storage (a copied disk cannot switch mid-way).
    refused("post-copy needs every disk on a shared pool", "--postcopy")
    # The token a holds was revoked on b.
    b.cli("token", "revoke", "from-a")
    refused("token was refused")
    readd(j(b, "token", "create", "from-a-again")["secret"])
    # b keeps more for itself than the host has free (MemAvailable moves by hundreds of MiB as VMs come and go).
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemAvailable:"))
    b.stop()
    b.env["VMKIT_HOST_RESERVED_MIB"] = str(available + 4096)
    b.start()
    try:
        refused("not enough memory")
    finally:
        b.stop()
        del b.env["VMKIT_HOST_RESERVED_MIB"]
        b.start()
    # b's certificate is not the one a pinned any more (a new key pair, as after a reinstall).
    b.stop()
    for f in (b.state_dir / "tls").iterdir():
        f.unlink()
    b.start()
    refused("fingerprint mismatch")
    readd(j(b, "token", "create", "from-a-third")["secret"])  # trusting the new certificate, knowingly
    j(a, "vm", "migrate", "pick", "b", "--copy-storage")  # and then it moves
    b.cli("vm", "stop", "pick", "--force")
    b.cli("vm", "delete", "pick")


def test_offline_migration_carries_the_snapshot_tree(hosts: tuple[Daemon, Daemon, Netns]) -> None:
    """Every image the disks and snapshots stand on goes whole (internal snapshots, RAM included, inside them), each
    overlay re-pointed there; the tree and the current snapshot come along, and every branch reverts there."""
    a, b, _ = hosts
    boot(a, "tree", "--network", "user")
    running_with_agent(a, "tree")
    write_marker(a, "tree", "ONE")
    a.cli("snapshot", "create", "tree", "s1")  # internal, with RAM
    write_marker(a, "tree", "TWO")
    a.cli("snapshot", "create", "tree", "s2", "--disk-only")  # external: the image above is frozen
    write_marker(a, "tree", "THREE")
    res = a.cli("vm", "migrate", "tree", "b", "--copy-storage", check=False)
    assert res.returncode != 0 and "--offline" in res.stderr  # a live copy cannot carry them
    a.cli("vm", "stop", "tree", "--force")
    j(a, "vm", "migrate", "tree", "b", "--offline")
    assert "tree" not in [v["name"] for v in j(a, "vm", "list")]
    assert not [v for v in j(a, "volume", "list", "default") if v["key"].startswith("default/tree-")]
    there = {s["name"]: s for s in j(b, "snapshot", "list", "tree")}
    assert set(there) == {"s1", "s2"} and there["s2"]["current"] and there["s1"]["kind"] == "internal"
    b.cli("vm", "start", "tree")
    running_with_agent(b, "tree")
    assert marker(b, "tree") == "THREE"
    b.cli("snapshot", "revert", "tree", "s1")  # RAM and disk as they were at s1, on the other host
    running_with_agent(b, "tree")
    assert marker(b, "tree") == "ONE"
    b.cli("snapshot", "revert", "tree", "s2")
    b.cli("vm", "start", "tree")
    running_with_agent(b, "tree")
    assert marker(b, "tree") == "TWO"
    b.cli("vm", "stop", "tree", "--force")
    b.cli("vm", "delete", "tree")
    assert not j(b, "volume", "list", "default")  # the images it brought (the base's copy too) went with it
