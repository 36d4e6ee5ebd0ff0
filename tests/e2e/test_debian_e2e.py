"""A real Debian 12 guest (systemd, cloud-init, qemu-guest-agent, OpenSSH: software no one here wrote) built by
`vmkit image build debian-12` (cached across the suite), configured at first boot from a NoCloud seed, on a NAT
network inside a namespace of the test's own, reached with `vmkit vm ssh`.

Few and slow (~30-60 s of TCG boot each): one VM, one linked clone."""

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
from tests.netns import Netns, daemon_in, namespaces

# The first module to need the Debian image builds it cold (~1.5-2.5 min, more on a loaded machine).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

USER_DATA = """#cloud-config
write_files:
  - path: /etc/vmkit-test
    content: written by cloud-init from user-data
runcmd:
  - [sh, -c, "echo ran > /run/vmkit-runcmd"]
"""


@dataclass
class Lab:
    d: Daemon
    ns: Netns
    home: Path  # HOME of the CLI user: ~/.ssh holds the key the VM was given


def j(d: Daemon, *args: str, timeout_s: float = 120) -> Any:
    return json.loads(d.cli(*args, "--json", timeout_s=timeout_s).stdout)


def guest(d: Daemon, name: str, *argv: str, timeout_s: float = 120) -> str:
    return d.cli("vm", "exec", name, "--", *argv, timeout_s=timeout_s).stdout


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with namespaces("deb") as (ns,), daemon_in(ns, "vmkit-deb-", demo=False) as d:
        d.cli("image", "build", "debian-12", timeout_s=1800)  # cached after the first build on this machine
        d.cli("network", "create", "lab", "--subnet", "192.168.231.0/24")
        home = Path(tempfile.mkdtemp(prefix="vmkit-deb-home-"))
        (home / ".ssh").mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")],
                       check=True)  # fmt: skip
        try:
            yield Lab(d, ns, home)
        finally:
            subprocess.run(["rm", "-rf", str(home)], check=False)


def vm_ssh(lab: Lab, name: str, *command: str) -> subprocess.CompletedProcess[str]:
    """`vmkit vm ssh NAME -- CMD` run where the guest's network is (the test's namespace), as a user whose
    ~/.ssh holds the key the VM was created with."""
    env = {**lab.d.env, "HOME": str(lab.home)}
    return lab.ns.run([sys.executable, "-m", "vmkit", "vm", "ssh", name, "--", *command], check=False, timeout=120,
                      env=env)  # fmt: skip


def cloud_init_done(d: Daemon, name: str) -> None:
    d.cli("vm", "wait", name, "--for", "agent", "--timeout", "300", timeout_s=330)
    out = guest(d, name, "cloud-init", "status", "--wait", timeout_s=300)
    assert "status: done" in out, out


def test_debian_with_cloud_init_and_ssh(lab: Lab) -> None:
    d = lab.d
    ud = lab.home / "user-data.yaml"
    ud.write_text(USER_DATA)
    t0 = time.monotonic()
    d.cli("vm", "create", "deb", "--image", "debian-12", "--memory", "1024", "--vcpus", "2", "--network", "lab",
          "--cloud-init", str(ud), "--ssh-key", str(lab.home / ".ssh" / "id_ed25519.pub"), "--user", "ada",
          "--hostname", "deb-one")  # fmt: skip
    disks = j(d, "vm", "disks", "deb")
    seed = [x for x in disks if x.get("cloud_init")]
    assert len(seed) == 1 and seed[0]["readonly"] and seed[0]["volume"] == "default/deb-cidata.iso", disks
    d.cli("vm", "start", "deb")
    cloud_init_done(d, "deb")
    print(f"start → cloud-init done: {time.monotonic() - t0:.1f} s")
    assert guest(d, "deb", "hostname").strip() == "deb-one"
    assert "uid=" in guest(d, "deb", "id", "ada")
    assert guest(d, "deb", "cat", "/etc/vmkit-test").strip() == "written by cloud-init from user-data"
    uuid = d.vm("deb")["uuid"]
    assert guest(d, "deb", "cat", "/var/lib/cloud/data/instance-id").strip() == uuid
    # ssh with the key it was created with, the host key pinned through the agent.
    res = vm_ssh(lab, "deb", "id", "-un")
    assert res.returncode == 0 and res.stdout.strip() == "ada", res.stderr
    # The agent's addresses match the lease.
    lease = {x["address"] for x in j(d, "vm", "ifaddr", "deb", "--source", "lease")}
    agent = {x["address"].split("/")[0] for x in j(d, "vm", "ifaddr", "deb", "--source", "agent")}
    assert lease and lease <= agent, (lease, agent)
    # A disk-only snapshot freezes the guest's filesystems through its agent.
    snap = j(d, "snapshot", "create", "deb", "s1", "--disk-only")
    assert snap["quiesced"], snap
    d.cli("snapshot", "delete", "deb", "s1")
    # A guest that ignores its power button: ACPI goes unanswered, the agent powers it off cleanly.
    guest(d, "deb", "sh", "-c", "mkdir -p /etc/systemd/logind.conf.d && printf '[Login]\\nHandlePowerKey=ignore\\n'"
          " > /etc/systemd/logind.conf.d/ignore.conf && systemctl restart systemd-logind")  # fmt: skip
    t1 = time.monotonic()
    vm = j(d, "vm", "shutdown", "deb", "--timeout", "120", timeout_s=150)
    assert vm["state"] == "shut off" and vm.get("reason") in (None, "guest-shutdown", "shutdown"), vm
    assert time.monotonic() - t1 >= 10  # ACPI got its 10 s first


def test_a_linked_clone_boots_cloud_init_again(lab: Lab) -> None:
    d = lab.d
    d.cli("vm", "clone", "deb", "deb2", "--linked", timeout_s=300)
    d.cli("vm", "start", "deb2")
    cloud_init_done(d, "deb2")
    uuid2 = d.vm("deb2")["uuid"]
    assert uuid2 != d.vm("deb")["uuid"]
    assert guest(d, "deb2", "cat", "/var/lib/cloud/data/instance-id").strip() == uuid2  # a first boot again
    assert guest(d, "deb2", "cat", "/etc/vmkit-test").strip() == "written by cloud-init from user-data"
    assert vm_ssh(lab, "deb2", "true").returncode == 0
    for name in ("deb2", "deb"):
        d.cli("vm", "stop", name, "--force", check=False)
        d.cli("vm", "delete", name)
    assert not [v for v in j(d, "volume", "list", "default")], "a seed or disk was left behind"


def test_bad_cloud_init_input_is_refused(lab: Lab) -> None:
    d = lab.d
    bad = lab.home / "bad.yaml"
    for text, words in (("#cloud-config\nusers: [\n", "YAML"), ("runcmd: [ls]\n", "#cloud-config")):
        bad.write_text(text)
        res = d.cli("vm", "create", "bad", "--image", "debian-12", "--cloud-init", str(bad), check=False)
        assert res.returncode != 0 and words in res.stderr, res.stderr
    notkey = lab.home / "notkey.pub"
    notkey.write_text("hello world\n")
    res = d.cli("vm", "create", "bad", "--image", "debian-12", "--ssh-key", str(notkey), check=False)
    assert res.returncode != 0 and "key" in res.stderr.lower(), res.stderr
    res = d.cli("vm", "create", "bad", "--image", "debian-12", "--hostname", "no_underscores!", check=False)
    assert res.returncode != 0 and "host" in res.stderr.lower(), res.stderr
    assert "bad" not in [v["name"] for v in j(d, "vm", "list")]
    assert not [v for v in j(d, "volume", "list", "default") if v["name"].startswith("bad")]
