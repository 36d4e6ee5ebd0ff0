"""`vmkit vm ssh NAME [-- CMD…]`: OpenSSH into a guest, as the user and with the key it was created with.

- The address: the guest's first IPv4 address from its networks' DHCP leases, else from its guest agent
  (`vm ifaddr`).
- The host key is pinned, never trusted on first use: the guest's own public host keys are read through its
  guest agent (a channel only the host has) into a known_hosts file of this call, and ssh checks them strictly.
  Without an agent, the call stops and says so rather than accepting whatever answers at that address.
- The user: `-l USER`, else the one cloud-init created (`--user` at create), else ssh's default.
- The key: `-i FILE`, else the private key in ~/.ssh whose .pub is one of the keys the VM was given
  (`--ssh-key` at create), else ssh's own defaults (its agent, ~/.ssh/id_*).

ssh runs as a child of this process (argv list, never a shell), its exit status ours.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client

HOST_KEYS = "cat /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub"
_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")


def pick_address(addrs: list[dict[str, Any]]) -> str | None:
    """The first IPv4 address that is neither loopback nor link-local (a guest's leases first, as listed)."""
    for a in addrs:
        try:
            ip = ipaddress.ip_address(str(a.get("address", "")).split("/", 1)[0])
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback and not ip.is_link_local:
            return str(ip)
    return None


def known_hosts(address: str, text: str) -> list[str]:
    """known_hosts lines for address from the guest's *.pub host key files (one key per line, comments dropped);
    anything that is not a public key of a known type is left out."""
    lines = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in _KEY_TYPES:
            try:
                blob = base64.b64decode(parts[1], validate=True)
            except ValueError:
                continue
            if blob[4 : 4 + len(parts[0])] == parts[0].encode():
                lines.append(f"{address} {parts[0]} {parts[1]}")
    return lines


def matching_identity(authorized: list[str], ssh_dir: Path) -> Path | None:
    """The private key in ssh_dir whose public half is one of the authorized keys (compared by type and blob)."""
    wanted = {tuple(k.split()[:2]) for k in authorized if len(k.split()) >= 2}
    if not wanted or not ssh_dir.is_dir():
        return None
    for pub in sorted(ssh_dir.glob("*.pub")):
        try:
            key = tuple(pub.read_text().split()[:2])
        except OSError:
            continue
        private = pub.with_suffix("")
        if key in wanted and private.is_file():
            return private
    return None


def ssh_argv(
    address: str, known_hosts_file: Path, *, user: str | None, identity: Path | None, command: list[str]
) -> list[str]:
    argv = ["ssh", "-o", f"UserKnownHostsFile={known_hosts_file}", "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null"]  # fmt: skip
    if identity is not None:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if user:
        argv += ["-l", user]
    argv.append(address)
    if command:
        argv += ["--", *command]
    return argv


def _guest_host_keys(c: Client, name: str) -> str:
    from vmkit.cli.main import CliError, _vm_url

    try:
        res = c.post(_vm_url(name, "exec"), {"argv": ["sh", "-c", HOST_KEYS + " 2>/dev/null; true"], "timeout_s": 20})
    except Exception as e:  # noqa: BLE001 - the API's own error, said plainly
        raise CliError(
            f"cannot read {name}'s SSH host keys through its guest agent ({getattr(e, 'message', e)}): "
            f"wait until it answers (vmkit vm wait {name} --for agent)"
        ) from None
    return base64.b64decode(res["stdout_b64"]).decode(errors="replace")


def pick_login(logins: list[dict[str, Any]], ssh_dir: Path, user: str | None) -> tuple[str | None, Path | None, bool]:
    """(user, private key, whether that user is the image's default one) among the logins the VM's seed
    authorizes: the first whose key has its private half in ssh_dir (of `user` only, when given)."""
    candidates = [x for x in logins if user is None or x.get("user") == user]
    for login in candidates:
        identity = matching_identity(list(login.get("ssh_keys") or []), ssh_dir)
        if identity is not None:
            return login.get("user") or user, identity, login.get("user") is None and user is None
    first = candidates[0] if candidates else {}
    return user or first.get("user"), None, bool(first) and first.get("user") is None and user is None


def _login(c: Client, a: argparse.Namespace) -> tuple[str | None, Path | None]:
    """Who to log in as, with which key: -l/-i, else what the VM's cloud-init seed authorizes (its `--user`, or the
    image's default user, whose name only the guest knows: the first regular account, uid 1000)."""
    from vmkit.cli.client import ApiError
    from vmkit.cli.main import _vm_url

    try:
        logins = c.get(_vm_url(a.name, "cloud-init")).get("logins") or []
    except ApiError:
        logins = []  # no seed: ssh's own defaults
    user, identity, default_user = pick_login(logins, Path.home() / ".ssh", a.login)
    if a.identity:
        identity = Path(a.identity)
    if default_user or (user is None and logins):
        res = c.post(_vm_url(a.name, "exec"), {"argv": ["getent", "passwd", "1000"], "timeout_s": 20})
        name = base64.b64decode(res["stdout_b64"]).decode(errors="replace").split(":", 1)[0].strip()
        user = name or user
    return user, identity


def vm_ssh(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError, _vm_url

    addrs: list[dict[str, Any]] = []
    for source in ("lease", "agent"):
        try:
            addrs = c.get(_vm_url(a.name, "ifaddr") + f"?source={source}")
        except Exception:  # noqa: BLE001 - no lease (user networking) or no agent: try the other
            continue
        if pick_address(addrs):
            break
    address = pick_address(addrs)
    if address is None:
        raise CliError(f"{a.name} has no IPv4 address yet (vmkit vm ifaddr {a.name}); is it up, on a network?")
    lines = known_hosts(address, _guest_host_keys(c, a.name))
    if not lines:
        raise CliError(f"{a.name} shows no SSH host key (/etc/ssh/ssh_host_*_key.pub): is OpenSSH installed there?")
    user, identity = _login(c, a)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    with tempfile.TemporaryDirectory(prefix="vmkit-ssh-") as tmp:
        kh = Path(tmp) / "known_hosts"
        kh.write_text("\n".join(lines) + "\n")
        os.chmod(kh, 0o600)
        argv = ssh_argv(address, kh, user=user, identity=identity, command=command)
        try:
            return subprocess.call(argv, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
        except FileNotFoundError:
            raise CliError("ssh is not installed here (Debian: apt-get install openssh-client)") from None


def add_parsers(vm: Any, add: Any) -> None:
    sp = add(
        vm, "ssh", vm_ssh, "OpenSSH into the guest as its cloud-init user, its host key pinned through its agent",
        json_flag=False,
    )  # fmt: skip
    sp.add_argument("name")
    sp.add_argument("-l", "--login", metavar="USER", help="the user (default: the one it was created with)")
    sp.add_argument("-i", "--identity", metavar="FILE", help="the private key (default: the one matching its key)")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS…] to run instead of a shell")
