"""Cloud-init seeds: the file builders (golden files), the merging rules, and every validation error.
Regenerate the golden files with: VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_cloudinit.py"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vmkit.images import cloudinit as ci
from vmkit.model.cloudinit import (
    USER_DATA_MAX_BYTES,
    CloudInitConfig,
    CloudInitRequest,
    CloudInitSettings,
    check_hostname,
    check_ssh_key,
    check_user,
)
from vmkit.model.vm import CreateVm, DiskSpec, VmSpec

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UUID = "3f2c8d1e-5b6a-4c7d-9e8f-0a1b2c3d4e5f"


def key(kind: str, comment: str = "", body: bytes = b"\x01" * 32) -> str:
    """A well-formed OpenSSH public key line: base64 of (length, type, key material)."""
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", len(body)) + body
    return f"{kind} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


ED = key("ssh-ed25519", "alice@laptop")
ED2 = key("ssh-ed25519", "alice@desktop", b"\x02" * 32)
ECDSA = key("ecdsa-sha2-nistp256", "ops key")

USER_DATA = """#cloud-config
# a comment, lost in the merge
packages: [htop, curl]
write_files:
  - path: /etc/motd
    content: |
      Welcome.
      Behave.
runcmd:
  - [touch, /run/made-by-runcmd]
"""
NETWORK_V2 = """# static address
version: 2
ethernets:
  id0:
    match: {name: "en*"}
    addresses: [192.0.2.10/24]
"""

CASES: dict[str, tuple[dict, str, int]] = {
    # name: (settings, VM name, generation)
    "minimal": ({}, "web1", 0),
    "keys-default-user": ({"ssh_keys": [ED, ECDSA]}, "db_2.example", 0),
    "user-file-hostname": (
        {"user_data": USER_DATA, "ssh_keys": [ED], "user": "alice", "hostname": "web.example.org"},
        "web1",
        0,
    ),
    "file-wins-defaults": (
        {
            "user_data": "#cloud-config\nlocale: de_DE.UTF-8\nmanage_etc_hosts: localhost\nhostname: fromfile\n"
            "ssh_authorized_keys: [" + ED + "]\n",
            "ssh_keys": [ED, ED2],
            "network_config": NETWORK_V2,
        },
        "web1",
        3,
    ),
}


def _text(case: str) -> str:
    settings, vm, generation = CASES[case]
    files = ci.seed_files(CloudInitSettings.of(CloudInitRequest(**settings)), vm_name=vm, uuid=UUID,
                          generation=generation)  # fmt: skip
    out = f"==> meta-data <==\n{files.meta_data}\n==> user-data <==\n{files.user_data}"
    if files.network_config is not None:
        out += f"\n==> network-config <==\n{files.network_config}"
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = _text(case)
    golden = GOLDEN / f"cloudinit-{case}.txt"
    if os.environ.get("VMKIT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"seed changed; regenerate with VMKIT_REGEN_GOLDEN=1 and review {golden}"


def _merged(**settings: object) -> dict:
    return ci.merged_user_data(CloudInitSettings.of(CloudInitRequest(**settings)))


def test_user_data_is_a_cloud_config_that_yaml_reads_back() -> None:
    settings = CloudInitSettings.of(CloudInitRequest(user_data=USER_DATA, user="alice", ssh_keys=[ED]))
    text = ci.user_data(settings)
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data == ci.merged_user_data(settings)
    assert data["write_files"][0]["content"] == "Welcome.\nBehave.\n"


def test_defaults_always_added_unless_the_file_sets_them() -> None:
    assert _merged() == {"locale": "C.UTF-8", "manage_etc_hosts": True, "ssh_genkeytypes": ["ed25519"]}
    data = _merged(user_data="#cloud-config\nlocale: fr_FR.UTF-8\nssh_genkeytypes: [rsa, ed25519]\n")
    assert data["locale"] == "fr_FR.UTF-8"
    assert data["ssh_genkeytypes"] == ["rsa", "ed25519"]
    assert data["manage_etc_hosts"] is True


def test_keys_without_user_go_to_the_default_user() -> None:
    data = _merged(ssh_keys=[ED, ECDSA])
    assert data["ssh_authorized_keys"] == [ED, ECDSA]
    assert "users" not in data  # cloud-init's own default: [default]
    # Added to the file's own list, without repeats.
    data = _merged(user_data=f"#cloud-config\nssh_authorized_keys: ['{ED}']\n", ssh_keys=[ED, ED2])
    assert data["ssh_authorized_keys"] == [ED, ED2]
    assert ci.logins(data)[0].model_dump() == {"user": None, "ssh_keys": [ED, ED2]}


def test_user_gets_sudo_and_the_keys_and_the_default_user_stays() -> None:
    data = _merged(user="alice", ssh_keys=[ED])
    assert data["users"] == [
        "default",
        {"name": "alice", "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash", "lock_passwd": True,
         "ssh_authorized_keys": [ED]},
    ]  # fmt: skip
    assert "ssh_authorized_keys" not in data
    assert [(x.user, x.ssh_keys) for x in ci.logins(data)] == [("alice", [ED])]
    # Appended to the file's users, whatever they are.
    data = _merged(user_data="#cloud-config\nusers: [{name: bob, ssh_authorized_keys: ['" + ED2 + "']}]\n",
                   user="alice", ssh_keys=[ED])  # fmt: skip
    assert [u["name"] for u in data["users"]] == ["bob", "alice"]
    assert [(x.user, x.ssh_keys) for x in ci.logins(data)] == [("bob", [ED2]), ("alice", [ED])]


def test_hostname_flag_wins_over_the_file() -> None:
    settings = CloudInitSettings.of(
        CloudInitRequest(user_data="#cloud-config\nhostname: a\nfqdn: a.example.com\n", hostname="b")
    )
    data = ci.merged_user_data(settings)
    assert data["hostname"] == "b" and "fqdn" not in data
    assert ci.hostname(settings, "vm") == "b"
    assert ci.hostname(CloudInitSettings(user_data="#cloud-config\nhostname: a\n"), "vm") == "a"
    assert ci.hostname(CloudInitSettings(user_data="#cloud-config\nfqdn: a.example.com\n"), "vm") == "a.example.com"
    assert ci.hostname(CloudInitSettings(), "vm") == "vm"


@pytest.mark.parametrize(
    ("vm", "host"),
    [("web1", "web1"), ("db_2", "db-2"), ("a.b", "a.b"), ("x-.y", "x.y"), ("_-_", "vm"), ("A" * 63, "A" * 63)],
)
def test_default_hostname_from_vm_name(vm: str, host: str) -> None:
    assert ci.default_hostname(vm) == host
    check_hostname(host)


def test_instance_id_changes_with_each_generation() -> None:
    assert ci.instance_id(UUID, 0) == UUID
    assert ci.instance_id(UUID, 2) == f"{UUID}-2"


def test_network_config_is_kept_as_given() -> None:
    settings = CloudInitSettings.of(CloudInitRequest(network_config=NETWORK_V2.rstrip("\n")))
    assert ci.network_config(settings) == NETWORK_V2
    assert ci.network_config(CloudInitSettings()) is None
    CloudInitRequest(network_config="network:\n  version: 1\n  config: []\n")  # wrapped in `network:` is fine


def test_iso_holds_the_files_with_label_cidata(tmp_path: Path) -> None:
    files = ci.seed_files(CloudInitSettings(network_config=NETWORK_V2), vm_name="v", uuid=UUID, generation=0)
    iso = tmp_path / "seed.iso"
    ci.build_iso(files, iso)
    out = tmp_path / "out"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    assert (out / "meta-data").read_text() == files.meta_data
    assert (out / "user-data").read_text() == files.user_data
    assert (out / "network-config").read_text() == NETWORK_V2
    pvd = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], check=True, capture_output=True, text=True)
    assert "Volume Id    : cidata" in pvd.stdout


# ----- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user_data": "packages: [htop]\n"}, "first line is exactly '#cloud-config'"),
        ({"user_data": "#!/bin/sh\necho hi\n"}, "first line is exactly '#cloud-config'"),
        ({"user_data": "#cloud-config\n- a\n- b\n"}, "must be a YAML mapping"),
        ({"user_data": "#cloud-config\njust text\n"}, "must be a YAML mapping"),
        ({"user_data": "#cloud-config\na: [1, 2\n"}, "user-data is not valid YAML"),
        ({"user_data": "#cloud-config\na: !!python/object:os.system x\n"}, "user-data is not valid YAML"),
        ({"user_data": "#cloud-config\na: " + "[" * 100 + "]" * 100 + "\n"}, "nests deeper than 64"),
        ({"user_data": "#cloud-config\na: " + "[" * 3000 + "]" * 3000 + "\n"}, "not valid YAML"),
        ({"user_data": "#cloud-config\na: &x [*x]\n"}, "refers to itself"),
        ({"user_data": "#cloud-config\na: " + "9" * 5000 + "\n"}, "not valid YAML"),
        ({"user_data": "#cloud-config\n#" + "x" * USER_DATA_MAX_BYTES}, "at most 65536"),
        ({"user_data": "#cloud-config\nhostname: bad_name\n"}, "invalid hostname"),
        ({"user_data": "#cloud-config\nhostname: 7\n"}, "hostname must be a string"),
        ({"ssh_keys": ["ssh-dss AAAAB3NzaC1kc3MAAACBAP"]}, "not a key type"),
        ({"ssh_keys": ["AAAAC3NzaC1lZDI1NTE5AAAAI"]}, "not an SSH public key"),
        ({"ssh_keys": ["ssh-ed25519 not!base64"]}, "not base64"),
        ({"ssh_keys": ["ssh-ed25519 " + key("ssh-rsa").split()[1]]}, "does not hold a ssh-ed25519 key"),
        ({"ssh_keys": ["ssh-ed25519 AAAA"]}, "does not hold"),
        ({"ssh_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]}, "private key"),
        ({"ssh_keys": [ED + "\n" + ED2]}, "one line"),
        ({"ssh_keys": [ED] * 65}, "at most 64"),
        ({"user": "Alice"}, "invalid user name"),
        ({"user": "9lives"}, "invalid user name"),
        ({"user": "a" * 33}, "at most 32"),
        ({"user": "root"}, "taken by the system"),
        ({"user": "nobody"}, "taken by the system"),
        ({"hostname": "-web"}, "invalid hostname"),
        ({"hostname": "web_1"}, "invalid hostname"),
        ({"hostname": "a" * 64}, "invalid hostname"),
        ({"hostname": ".".join(["a" * 63] * 4) + ".ab"}, "at most 253"),
        ({"hostname": "web."}, "invalid hostname"),
        ({"network_config": "- a\n"}, "network-config must be a YAML mapping"),
        ({"network_config": "ethernets: {}\n"}, "version: 1"),
        ({"network_config": "version: 3\n"}, "version: 1"),
        ({"network_config": "version: [2\n"}, "network-config is not valid YAML"),
        ({"user_data": "#cloud-config\nusers: alice\n", "user": "bob"}, "`users` must be a list"),
        ({"user_data": "#cloud-config\nusers: [default, alice]\n", "user": "alice"}, "given twice"),
        ({"user_data": "#cloud-config\nusers: [{name: alice}]\n", "user": "alice"}, "given twice"),
        ({"user_data": "#cloud-config\nssh_authorized_keys: k\n", "ssh_keys": [ED]}, "must be a list"),
        ({"user_data": "#cloud-config\nusers: [{name: bob}]\n", "ssh_keys": [ED]}, "no 'default'"),
        ({"user_data": 7}, "valid string"),
        ({"ssh_keys": ED}, "valid list"),
        ({"colour": "blue"}, "Extra inputs"),
    ],
)
def test_bad_requests(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        CloudInitRequest(**fields)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("kind", ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp384", "sk-ssh-ed25519@openssh.com"])
def test_good_keys(kind: str) -> None:
    line = key(kind, "a comment with spaces")
    assert check_ssh_key("  " + line + "  ") == line


def test_keys_are_deduplicated_in_order() -> None:
    assert CloudInitRequest(ssh_keys=[ED2, ED, ED2]).ssh_keys == [ED2, ED]


@pytest.mark.parametrize("name", ["alice", "_svc", "a-b_c9", "a" * 32])
def test_good_users(name: str) -> None:
    assert check_user(name) == name


def test_errors_in_a_create_request_are_400_material() -> None:
    """CreateVm carries the request: a bad one fails to parse (the API answers 400), before anything is made."""
    with pytest.raises(ValidationError, match="cloud_init.user"):
        CreateVm.model_validate({"name": "v", "cloud_init": {"user": "root"}})
    req = CreateVm.model_validate({"name": "v", "cloud_init": {"ssh_keys": [ED], "hostname": "h"}})
    assert req.cloud_init is not None and req.cloud_init.hostname == "h"


def test_specs_without_cloud_init_still_load() -> None:
    """A spec stored before seeds existed (and before disks had names) loads; one with a seed round-trips."""
    old = {"name": "a", "uuid": UUID, "memory_mib": 64, "vcpus": 1, "disks": [{"path": "/p", "format": "qcow2"}]}
    spec = VmSpec.model_validate_json(json.dumps(old))
    assert spec.cloud_init is None and spec.disks[0].name == "disk0"
    cfg = CloudInitConfig(user_data="#cloud-config\n", ssh_keys=[ED], generation=2)
    again = VmSpec.model_validate_json(spec.model_copy(update={"cloud_init": cfg}).model_dump_json())
    assert again.cloud_init == cfg
    assert DiskSpec(path="/p", format="raw").cloud_init is False  # the seed's disk is marked; others, old ones not
    assert again.cloud_init.settings() == CloudInitSettings(user_data="#cloud-config\n", ssh_keys=[ED])


def test_recorded_settings_are_not_checked_again() -> None:
    """A rule made stricter later must not stop a VM's spec from loading: what was accepted is only typed."""
    cfg = CloudInitConfig(user="root", hostname="not_valid", ssh_keys=["whatever"])
    assert VmSpec(name="a", uuid=UUID, memory_mib=64, vcpus=1, cloud_init=cfg).cloud_init == cfg
