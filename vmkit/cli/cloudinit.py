"""`vmkit vm cloud-init NAME [--show | --set …]`, and the cloud-init flags of `vm create`.

Files are read here, on the client, and their contents sent: the daemon never opens a path a client names.
`-` reads standard input (for one flag at most).
"""

from __future__ import annotations

import argparse
import sys

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import ApiError, Client
from vmkit.cli.output import print_json

# The daemon's bounds (vmkit/model/cloudinit.py, not imported: it needs pydantic and PyYAML); a file over them is
# refused before it is sent.
USER_DATA_MAX_BYTES = 64 * 1024
NETWORK_CONFIG_MAX_BYTES = 64 * 1024
KEY_FILE_MAX_BYTES = 1024 * 1024
FLAGS = ("ci_user_data", "ci_ssh_keys", "ci_user", "ci_hostname", "ci_network_config")


def add_flags(sp: Any) -> None:
    """The flags that make a VM's seed: on `vm create` and `vm cloud-init --set`."""
    sp.add_argument(
        "--cloud-init", dest="ci_user_data", metavar="FILE", help="a #cloud-config user-data file to start from"
    )
    sp.add_argument(
        "--ssh-key",
        dest="ci_ssh_keys",
        action="append",
        default=[],
        metavar="FILE|-",
        help="SSH public key(s) (a .pub or authorized_keys file; - reads stdin) for --user, else the image's "
        "default user (debian on Debian); repeatable",
    )
    sp.add_argument("--user", dest="ci_user", metavar="NAME", help="create this user, with sudo and the SSH keys")
    sp.add_argument("--hostname", dest="ci_hostname", metavar="NAME", help="the guest's host name (default: its name)")
    sp.add_argument(
        "--network-config", dest="ci_network_config", metavar="FILE", help="a cloud-init network-config (v1 or v2)"
    )


def given(a: argparse.Namespace) -> bool:
    return any(getattr(a, f, None) for f in FLAGS)


def _read(path: str, limit: int, what: str, stdin_used: list[bool]) -> str:
    from vmkit.cli.main import CliError

    if path == "-":
        if stdin_used:
            raise CliError("only one flag can read standard input (-)")
        stdin_used.append(True)
        data = sys.stdin.buffer.read(limit + 1)
        where = "standard input"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise CliError(f"cannot read {what} {path}: {e.strerror}") from None
        where = path
    if len(data) > limit:
        raise CliError(f"{what} {where} is over {limit // 1024} KiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CliError(f"{what} {where} is not UTF-8 text") from None


def _keys(path: str, stdin_used: list[bool]) -> list[str]:
    """The public keys in a .pub or authorized_keys file (blank lines and # comments skipped)."""
    from vmkit.cli.main import CliError

    text = _read(path, KEY_FILE_MAX_BYTES, "SSH key file", stdin_used)
    where = "standard input" if path == "-" else path
    if "PRIVATE KEY-----" in text:
        # Caught here so that a private key never leaves this machine.
        raise CliError(f"{where} is a private key: give its public key ({where}.pub)")
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise CliError(f"{where} holds no SSH public key")
    return keys


def request_body(a: argparse.Namespace) -> dict[str, Any]:
    """The cloud_init request of the flags given (only those given)."""
    stdin_used: list[bool] = []
    body: dict[str, Any] = {}
    if a.ci_user_data is not None:
        body["user_data"] = _read(a.ci_user_data, USER_DATA_MAX_BYTES, "user-data file", stdin_used)
    if a.ci_ssh_keys:
        body["ssh_keys"] = [k for path in a.ci_ssh_keys for k in _keys(path, stdin_used)]
    if a.ci_user is not None:
        body["user"] = a.ci_user
    if a.ci_hostname is not None:
        body["hostname"] = a.ci_hostname
    if a.ci_network_config is not None:
        body["network_config"] = _read(a.ci_network_config, NETWORK_CONFIG_MAX_BYTES, "network-config file", stdin_used)
    return body


def show_text(info: dict[str, Any]) -> str:
    """The seed's files one after the other, each under a `==> NAME <==` line (as `head` shows several files)."""
    files = info["files"]
    parts = [("meta-data", files["meta_data"]), ("user-data", files["user_data"])]
    if files.get("network_config") is not None:
        parts.append(("network-config", files["network_config"]))
    return "\n".join(f"==> {name} <==\n{text}" for name, text in parts)


def vm_cloud_init(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError, _vm_url

    url = _vm_url(a.name, "cloud-init")
    if a.set and a.show:
        raise CliError("--show prints the seed, --set changes it: choose one")
    if not a.set:
        if given(a) or a.clear:
            raise CliError("those flags change the seed: add --set (the VM must be shut off)")
        info = c.get(url)
        if a.json:
            print_json(info)
        else:
            sys.stdout.write(show_text(info))
        return 0
    body: dict[str, Any] = {}
    if not a.clear:
        # The recorded settings, with those given now in their place (PUT replaces them all).
        try:
            current = c.get(url)["settings"]
        except ApiError as e:
            if e.status != 404:
                raise
            current = {}
        body = {k: v for k, v in current.items() if v not in (None, [])}
    body.update(request_body(a))
    info = c.request("PUT", url, body)
    if a.json:
        print_json(info)
    else:
        print(
            f"cloud-init seed of {a.name} made ({info['seed']}, instance-id {info['instance_id']}): its next boot "
            "is a first boot for cloud-init"
        )
    return 0


def add_parsers(vm: Any, add: Any) -> None:
    """The verbs under `vmkit vm` (called from cli/main.py's build_parser)."""
    sp = add(vm, "cloud-init", vm_cloud_init, "show a VM's cloud-init seed (meta-data, user-data, network-config), or "
             "make it again with --set (the VM shut off)")  # fmt: skip
    sp.add_argument("name")
    sp.add_argument("--show", action="store_true", help="print what the guest reads (the default)")
    sp.add_argument(
        "--set", action="store_true", help="replace the flags' settings (the others are kept) and make the seed again"
    )
    sp.add_argument("--clear", action="store_true", help="with --set: forget the settings not given now")
    add_flags(sp)
