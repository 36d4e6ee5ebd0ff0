"""`vm ssh`'s pure parts: which address, which host keys are pinned, which private key, the ssh argv."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from vmkit.cli.ssh import known_hosts, matching_identity, pick_address, pick_login, ssh_argv


def test_pick_address() -> None:
    addrs = [
        {"address": "fe80::1"},
        {"address": "127.0.0.1"},
        {"address": "169.254.3.3"},
        {"address": "10.0.0.7/24"},
        {"address": "10.0.0.8"},
    ]
    assert pick_address(addrs) == "10.0.0.7"
    assert pick_address([{"address": "garbage"}, {"address": "fd00::2"}]) is None


def test_known_hosts_keeps_real_keys_only(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    pub = (tmp_path / "k.pub").read_text()
    fake = "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x07ssh-rsa" + b"x" * 32).decode()  # the blob says rsa
    text = "\n".join([pub.strip(), "cat: /etc/ssh/ssh_host_rsa_key.pub: No such file", fake, "ssh-ed25519 !!"])
    lines = known_hosts("10.0.0.7", text)
    assert lines == ["10.0.0.7 " + " ".join(pub.split()[:2])]


def test_matching_identity(tmp_path: Path) -> None:
    for name in ("a", "b"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    b_pub = (tmp_path / "b.pub").read_text().strip()
    assert matching_identity([b_pub], tmp_path) == tmp_path / "b"
    assert matching_identity(["ssh-ed25519 AAAAnothere"], tmp_path) is None
    assert matching_identity([b_pub], tmp_path / "none") is None


def test_ssh_argv_pins_the_host_key(tmp_path: Path) -> None:
    argv = ssh_argv("10.0.0.7", tmp_path / "kh", user="ada", identity=tmp_path / "id", command=["id", "-u"])
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv and f"UserKnownHostsFile={tmp_path}/kh" in argv
    assert argv[-5:] == ["ada", "10.0.0.7", "--", "id", "-u"]
    assert ["-i", str(tmp_path / "id")] == argv[argv.index("-i") : argv.index("-i") + 2]
    assert "-l" not in ssh_argv("10.0.0.7", tmp_path / "kh", user=None, identity=None, command=[])


def test_pick_login(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "mine")], check=True)
    mine = (tmp_path / "mine.pub").read_text().strip()
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther"
    logins = [{"user": None, "ssh_keys": [other]}, {"user": "ada", "ssh_keys": [mine]}]
    assert pick_login(logins, tmp_path, None) == ("ada", tmp_path / "mine", False)
    # Only the image's default user holds my key: its name is the guest's to say.
    assert pick_login([{"user": None, "ssh_keys": [mine]}], tmp_path, None) == (None, tmp_path / "mine", True)
    # -l names someone the seed does not know: that user, no key of ours.
    assert pick_login(logins, tmp_path, "bob") == ("bob", None, False)
    assert pick_login([], tmp_path, None) == (None, None, False)
