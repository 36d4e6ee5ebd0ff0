"""Cloud-init NoCloud seeds: the files a guest reads (pure builders, tested with golden files) and the ISO9660 image
labelled `cidata` that carries them (build_iso, the one function here with a side effect).

How user-data is made from a VM's settings (model/cloudinit.py checked them):
- the user-data file given (a #cloud-config mapping) is the start; its keys keep their order;
- hostname: the one given wins (the file's `hostname` is replaced, its `fqdn` dropped); meta-data's
  local-hostname is that, else the file's hostname (or fqdn), else the VM's name made a host name;
- user: appended to the file's `users` (or to `[default]` when it has none, so the image's default user stays)
  with sudo without password, bash, a locked password, and the SSH keys as its authorized keys;
- SSH keys without a user: added to the top-level `ssh_authorized_keys`, which cloud-init gives the image's
  default user (`debian` on Debian);
- locale C.UTF-8, manage_etc_hosts true, ssh_genkeytypes [ed25519] unless the file sets them: a minimal Debian
  has no other locale, sudo must resolve the host name, and RSA host keys cost seconds per first boot.

meta-data's instance-id is the VM's UUID (a clone has its own, so cloud-init runs again on its first boot), with
`-N` appended once the seed was made again N times: a new instance-id is what makes cloud-init apply a changed
seed at all (its per-instance modules run once per instance-id).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from vmkit.model.cloudinit import (
    SUDO_NOPASSWD,
    CloudInitFiles,
    CloudInitLogin,
    CloudInitSettings,
    parse_cloud_config,
)
from vmkit.util import proc

VOLUME_LABEL = "cidata"  # what cloud-init's NoCloud looks for
DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("locale", "C.UTF-8"),
    ("manage_etc_hosts", True),
    ("ssh_genkeytypes", ["ed25519"]),
)
DEFAULT_USER_SHELL = "/bin/bash"


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Safe YAML (emitted in C when PyYAML has libyaml), with text of several lines as literal blocks (write_files
    contents stay readable)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # The emitter falls back to a quoted style where a block cannot hold the text (trailing spaces, say).
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    return yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1_000_000
    )


def instance_id(uuid: str, generation: int) -> str:
    return uuid if generation == 0 else f"{uuid}-{generation}"


def default_hostname(vm_name: str) -> str:
    """The VM's name as an RFC 1123 host name: `_` becomes `-`, labels lose hyphens at their ends."""
    labels = [label.strip("-") for label in vm_name.replace("_", "-").split(".")]
    return ".".join(label for label in labels if label) or "vm"


def merged_user_data(settings: CloudInitSettings) -> dict[Any, Any]:
    """The user-data mapping: the file's, with the settings merged in (see the module's docstring)."""
    data = dict(parse_cloud_config(settings.user_data)) if settings.user_data is not None else {}
    if settings.hostname is not None:
        data.pop("fqdn", None)
        data["hostname"] = settings.hostname
    if settings.user is not None:
        entry: dict[str, Any] = {
            "name": settings.user,
            "sudo": SUDO_NOPASSWD,
            "shell": DEFAULT_USER_SHELL,
            "lock_passwd": True,
        }
        if settings.ssh_keys:
            entry["ssh_authorized_keys"] = list(settings.ssh_keys)
        data["users"] = [*data.get("users", ["default"]), entry]
    elif settings.ssh_keys:
        have = list(data.get("ssh_authorized_keys") or [])
        data["ssh_authorized_keys"] = have + [k for k in settings.ssh_keys if k not in have]
    for key, value in DEFAULTS:
        data.setdefault(key, value)
    return data


def hostname(settings: CloudInitSettings, vm_name: str) -> str:
    """The guest's host name: the one given, else the user-data file's, else the VM's name made one."""
    if settings.hostname is not None:
        return settings.hostname
    data = parse_cloud_config(settings.user_data) if settings.user_data is not None else {}
    for key in ("hostname", "fqdn"):
        if isinstance(data.get(key), str):
            return str(data[key])
    return default_hostname(vm_name)


def meta_data(*, instance: str, host: str) -> str:
    return dump_yaml({"instance-id": instance, "local-hostname": host})


def user_data(settings: CloudInitSettings) -> str:
    return "#cloud-config\n" + dump_yaml(merged_user_data(settings))


def network_config(settings: CloudInitSettings) -> str | None:
    """The network-config file as given (its comments kept), or None: the image's default (DHCP on the NIC)."""
    text = settings.network_config
    if text is None:
        return None
    return text if text.endswith("\n") else text + "\n"


def seed_files(settings: CloudInitSettings, *, vm_name: str, uuid: str, generation: int) -> CloudInitFiles:
    return CloudInitFiles(
        meta_data=meta_data(instance=instance_id(uuid, generation), host=hostname(settings, vm_name)),
        user_data=user_data(settings),
        network_config=network_config(settings),
    )


def logins(data: dict[Any, Any]) -> list[CloudInitLogin]:
    """Who a user-data mapping lets in over SSH, in its users' order: the image's default user (user None) with
    the top-level ssh_authorized_keys, and each user of `users` with its own keys."""
    users = data.get("users", ["default"])
    users = users if isinstance(users, list) else []
    out = []
    for u in users:
        if u == "default":
            keys = data.get("ssh_authorized_keys")
            out.append(CloudInitLogin(user=None, ssh_keys=_strings(keys)))
        elif isinstance(u, dict) and isinstance(u.get("name"), str):
            out.append(CloudInitLogin(user=u["name"], ssh_keys=_strings(u.get("ssh_authorized_keys"))))
    return [login for login in out if login.ssh_keys]


def _strings(items: Any) -> list[str]:
    return [str(k) for k in items if isinstance(k, str)] if isinstance(items, list) else []


# ----- the seed image ----------------------------------------------------------------------------------------
def build_iso(files: CloudInitFiles, out: Path) -> None:
    """Write the seed (ISO9660 with Rock Ridge and Joliet, volume id `cidata`) to the new file out."""
    with tempfile.TemporaryDirectory(prefix="vmkit-cidata-") as tmp:
        src = Path(tmp) / "files"
        src.mkdir()
        (src / "meta-data").write_text(files.meta_data)
        (src / "user-data").write_text(files.user_data)
        if files.network_config is not None:
            (src / "network-config").write_text(files.network_config)
        proc.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", out, "-V", VOLUME_LABEL, "-J", "-r", src], timeout_s=60)
