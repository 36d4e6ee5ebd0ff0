"""Cloud-init seeds through the real daemon and CLI (a fake QEMU): made with the VM, shown, made again, cloned,
deleted with it; bad input refused with nothing made."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from vmkit.cli.client import ApiError


def key(kind: str, comment: str, fill: int = 1) -> str:
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + bytes([fill]) * 32
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


ED = key("ssh-ed25519", "alice@laptop")
ED2 = key("ssh-ed25519", "alice@desktop", 2)


def j(d: Daemon, *args: str, stdin: str | None = None) -> Any:
    return json.loads(d.cli(*args, "--json", stdin=stdin).stdout)


def fails(d: Daemon, *args: str, stdin: str | None = None) -> str:
    res = d.cli(*args, check=False, stdin=stdin)
    assert res.returncode != 0, f"vmkit {' '.join(args)} should have failed"
    return res.stderr


def volumes(d: Daemon) -> set[str]:
    return {v["key"] for v in j(d, "volume", "list")}


def extract(iso: str | Path, out: Path) -> dict[str, str]:
    """The files on a seed image, read back with xorriso; and its volume id under the key 'volume-id'."""
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    got = {p.name: p.read_text() for p in out.iterdir()}
    pvd = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], check=True, capture_output=True, text=True)
    got["volume-id"] = next(line.split(":", 1)[1].strip() for line in pvd.stdout.splitlines() if "Volume Id" in line)
    return got


def test_create_show_regenerate_clone_delete(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    (tmp_path / "user-data.yaml").write_text("#cloud-config\npackages: [htop]\nhostname: fromfile\n")
    (tmp_path / "net.yaml").write_text("version: 2\nethernets:\n  id0:\n    match: {name: 'en*'}\n    dhcp4: true\n")
    (tmp_path / "keys").write_text(f"# my keys\n{ED}\n\n{ED2}\n")
    vm = j(d, "vm", "create", "web", "--no-nic", "--disk", "16M", "--cloud-init", str(tmp_path / "user-data.yaml"),
           "--ssh-key", str(tmp_path / "keys"), "--user", "alice", "--hostname", "web1",
           "--network-config", str(tmp_path / "net.yaml"))  # fmt: skip
    # The seed: a raw volume of pool default, the VM's last disk, read-only, owned by it.
    seed = vm["disks"][-1]
    assert seed == {**seed, "name": "disk1", "volume": "default/web-cidata.iso", "format": "raw", "readonly": True,
                    "owned": True, "cloud_init": True}  # fmt: skip
    # What `vm ssh` logs in with, in the VM's own record.
    assert vm["cloud_init"] == {"user": "alice", "ssh_keys": [ED, ED2], "generation": 0}
    assert "Cloud-init:  user alice, 2 SSH keys" in d.cli("vm", "info", "web").stdout
    disks = {dk["name"]: dk for dk in j(d, "vm", "disks", "web")}
    assert disks["disk1"]["cloud_init"] is True and disks["disk0"]["cloud_init"] is False
    table = d.cli("vm", "disks", "web").stdout
    assert "disk (ro, cloud-init)" in table and "default/web-cidata.iso" in table
    assert j(d, "volume", "info", "default/web-cidata.iso")["format"] == "raw"

    info = j(d, "vm", "cloud-init", "web")
    assert (info["seed"], info["disk"], info["instance_id"]) == ("default/web-cidata.iso", "disk1", vm["uuid"])
    assert (info["hostname"], info["user"]) == ("web1", "alice")
    assert info["logins"] == [{"user": "alice", "ssh_keys": [ED, ED2]}]
    assert info["settings"]["ssh_keys"] == [ED, ED2] and info["settings"]["user"] == "alice"
    text = d.cli("vm", "cloud-init", "web", "--show").stdout
    assert text.startswith("==> meta-data <==\ninstance-id: " + vm["uuid"] + "\nlocal-hostname: web1\n")
    assert "==> user-data <==\n#cloud-config\npackages:\n- htop\nhostname: web1\n" in text
    assert "==> network-config <==\nversion: 2\n" in text
    # The image holds exactly those files, under the label NoCloud looks for.
    got = extract(seed["path"], tmp_path / "x1")
    assert got == {"meta-data": info["files"]["meta_data"], "user-data": info["files"]["user_data"],
                   "network-config": info["files"]["network_config"], "volume-id": "cidata"}  # fmt: skip

    # It reaches QEMU read-only, as a raw virtio disk.
    d.cli("vm", "start", "web")
    argv = json.loads((d.run_dir / "vms" / "web" / "argv.json").read_text())
    assert "driver=raw,file=disk1-file,node-name=disk1,read-only=on" in argv
    assert "virtio-blk-pci,drive=disk1,id=disk1-dev,bus=disk1-port" in argv
    # Not while it runs: 409, the seed unchanged.
    res = d.cli("vm", "cloud-init", "web", "--set", "--hostname", "other", check=False)
    assert res.returncode == 1 and "shut off" in res.stderr
    with pytest.raises(ApiError) as e:
        d.api.request("PUT", "/v1/vms/web/cloud-init", {"hostname": "other"})
    assert e.value.status == 409
    d.cli("vm", "stop", "web", "--force")

    # Made again: the flags given replace theirs, the rest is kept; a new instance-id.
    new = j(d, "vm", "cloud-init", "web", "--set", "--ssh-key", "-", "--hostname", "web2", stdin=ED2 + "\n")
    assert new["instance_id"] == f"{vm['uuid']}-1" and new["hostname"] == "web2"
    assert new["settings"]["ssh_keys"] == [ED2] and new["settings"]["user"] == "alice"
    assert new["settings"]["network_config"] == info["settings"]["network_config"]
    got = extract(seed["path"], tmp_path / "x2")
    assert got["meta-data"] == f"instance-id: {vm['uuid']}-1\nlocal-hostname: web2\n"
    assert "hostname: web2" in got["user-data"] and ED2 in got["user-data"] and ED not in got["user-data"]
    assert [dk["volume"] for dk in j(d, "vm", "info", "web")["disks"]] == ["default/web-disk0.qcow2", seed["volume"]]
    # --clear: only what is given now.
    new = j(d, "vm", "cloud-init", "web", "--set", "--clear", "--ssh-key", "-", stdin=ED + "\n")
    assert new["settings"] == {"user_data": None, "ssh_keys": [ED], "user": None, "hostname": None,
                               "network_config": None}  # fmt: skip
    assert new["logins"] == [{"user": None, "ssh_keys": [ED]}] and new["hostname"] == "web"
    assert "network-config" not in extract(seed["path"], tmp_path / "x3")

    # A clone gets a seed of its own, with its own UUID as instance-id.
    clone = j(d, "vm", "clone", "web", "web-copy")
    cseed = next(dk for dk in clone["disks"] if dk["readonly"])
    assert cseed["volume"] == "default/web-copy-cidata.iso" and cseed["name"] == "disk1" and cseed["owned"]
    cinfo = j(d, "vm", "cloud-init", "web-copy")
    assert cinfo["instance_id"] == clone["uuid"] != vm["uuid"]
    assert cinfo["hostname"] == "web-copy"  # the default: its own name
    got = extract(cseed["path"], tmp_path / "x4")
    assert got["meta-data"] == f"instance-id: {clone['uuid']}\nlocal-hostname: web-copy\n"
    assert j(d, "vm", "cloud-init", "web")["instance_id"] == f"{vm['uuid']}-2"  # the source's is untouched

    # Deleting a VM deletes its seed, and only its own.
    d.cli("vm", "delete", "web")
    left = volumes(d)
    assert "default/web-cidata.iso" not in left and "default/web-copy-cidata.iso" in left
    assert not Path(seed["path"]).exists()
    d.cli("vm", "delete", "web-copy")
    assert not any("cidata" in k for k in volumes(d))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"user_data": "packages: [htop]\n"}, "#cloud-config"),
        ({"user_data": "#cloud-config\n- a\n"}, "mapping"),
        ({"user_data": "#cloud-config\na: [1\n"}, "not valid YAML"),
        ({"user_data": "#cloud-config\n#" + "x" * 70000}, "65536"),
        ({"ssh_keys": ["ssh-ed25519 AAAA not-a-key"]}, "does not hold"),
        ({"ssh_keys": ["ssh-dss AAAAB3NzaC1kc3M="]}, "not a key type"),
        ({"user": "root"}, "taken by the system"),
        ({"user": "Bad"}, "invalid user name"),
        ({"hostname": "bad_host"}, "invalid hostname"),
        ({"hostname": "a" * 64}, "invalid hostname"),
        ({"network_config": "[1, 2]"}, "mapping"),
    ],
)
def test_bad_input_is_400_and_leaves_nothing(fake_daemon: Daemon, body: dict, message: str) -> None:
    d = fake_daemon
    before = volumes(d)
    with pytest.raises(ApiError) as e:
        d.api.post("/v1/vms", {"name": "bad", "memory_mib": 64, "nic": False, "disk_size_bytes": 2**24,
                               "cloud_init": body})  # fmt: skip
    assert e.value.status == 400 and message in e.value.message, e.value.message
    assert d.api.get("/v1/vms") == [] and volumes(d) == before
    # The same through PUT, on a shut-off VM without a seed: refused, still none.
    d.api.post("/v1/vms", {"name": "ok", "memory_mib": 64, "nic": False})
    with pytest.raises(ApiError) as e:
        d.api.request("PUT", "/v1/vms/ok/cloud-init", body)
    assert e.value.status == 400 and message in e.value.message
    assert d.vm("ok")["disks"] == [] and volumes(d) == before
    d.api.request("DELETE", "/v1/vms/ok")


def test_cli_refuses_bad_files_before_sending(fake_daemon: Daemon, tmp_path: Path) -> None:
    d = fake_daemon
    (tmp_path / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    (tmp_path / "empty.pub").write_text("# nothing\n")
    (tmp_path / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (tmp_path / "big.yaml").write_text("#cloud-config\n#" + "x" * 70000)
    assert "private key" in fails(d, "vm", "create", "v", "--ssh-key", str(tmp_path / "id_ed25519"))
    assert "no SSH public key" in fails(d, "vm", "create", "v", "--ssh-key", str(tmp_path / "empty.pub"))
    assert "cannot read" in fails(d, "vm", "create", "v", "--ssh-key", str(tmp_path / "missing.pub"))
    assert "over 64 KiB" in fails(d, "vm", "create", "v", "--cloud-init", str(tmp_path / "big.yaml"))
    assert "one flag" in fails(d, "vm", "create", "v", "--ssh-key", "-", "--cloud-init", "-", stdin=ED)
    err = fails(d, "vm", "create", "v", "--cloud-init", str(tmp_path / "script.sh"))
    assert "#cloud-config" in err
    err = fails(d, "vm", "create", "v", "--user", "root")
    assert "taken by the system" in err
    assert d.api.get("/v1/vms") == [] and not any("cidata" in k for k in volumes(d))
    # Without any flag, no seed; GET says so (404), and --set makes one as the VM's last disk.
    d.cli("vm", "create", "v", "--no-nic", "--memory", "64")
    assert "no cloud-init seed" in fails(d, "vm", "cloud-init", "v")
    assert "add --set" in fails(d, "vm", "cloud-init", "v", "--user", "bob")
    info = j(d, "vm", "cloud-init", "v", "--set", "--ssh-key", "-", stdin=ED)
    assert (info["disk"], info["instance_id"]) == ("disk0", d.vm("v")["uuid"])
    assert d.vm("v")["disks"][0]["readonly"] is True


def test_daemon_killed_while_the_seed_is_made_again(fake_daemon: Daemon, tmp_path: Path) -> None:
    """Killed after the new settings were recorded but before the new image took the old one's place: the next
    start makes the seed from what was recorded."""
    d = fake_daemon
    d.cli("vm", "create", "c", "--no-nic", "--memory", "64", "--hostname", "before")
    path = d.vm("c")["disks"][0]["path"]
    with d.dying_at("cloud-init-recorded"):
        assert d.cli("vm", "cloud-init", "c", "--set", "--hostname", "after", check=False).returncode != 0
    assert "finishing an interrupted cloud-init" in (d.root / "daemon.log").read_text()
    info = j(d, "vm", "cloud-init", "c")
    assert info["hostname"] == "after"
    assert extract(path, tmp_path / "x")["meta-data"] == info["files"]["meta_data"]
    assert not [p for p in Path(path).parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_detached_seed_is_made_anew(fake_daemon: Daemon) -> None:
    """The seed is a disk like any: detached, its volume stays (no longer the VM's seed); --set makes a new one."""
    d = fake_daemon
    d.cli("vm", "create", "s", "--no-nic", "--memory", "64", "--disk", "8M", "--ssh-key", "-", stdin=ED)
    assert [dk["cloud_init"] for dk in d.vm("s")["disks"]] == [False, True]
    d.cli("vm", "detach-disk", "s", "disk1")
    info = j(d, "vm", "cloud-init", "s")
    assert (info["seed"], info["disk"]) == (None, None) and info["settings"]["ssh_keys"] == [ED]
    info = j(d, "vm", "cloud-init", "s", "--set")
    assert (info["seed"], info["disk"]) == ("default/s-cidata-1.iso", "disk1")
    assert info["instance_id"].endswith("-1") and info["logins"] == [{"user": None, "ssh_keys": [ED]}]
    d.cli("vm", "delete", "s")
    assert "default/s-cidata.iso" in volumes(d) and "default/s-cidata-1.iso" not in volumes(d)
