"""Cloud-init NoCloud seeds: what a request may ask for, what a VM's spec records, what GET shows. No side effects.

A request (`CloudInitRequest`, in POST /v1/vms and PUT /v1/vms/{name}/cloud-init) is checked here in full, so a
bad one is a 400 before anything is made. What a spec records (`CloudInitConfig`) carries no checks beyond its
types: a rule made stricter later must never stop an existing VM's spec from loading.

YAML is read by PyYAML's safe loader only (what `yaml.safe_load` uses: plain data, never Python objects), in C
when PyYAML has libyaml: a 64 KiB document takes ~30 ms there instead of ~0.25 s, on the daemon's event loop.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

USER_DATA_MAX_BYTES = 64 * 1024  # NoCloud sets no limit; this bounds what a spec and a seed carry
NETWORK_CONFIG_MAX_BYTES = 64 * 1024
SSH_KEYS_MAX = 64
SSH_KEY_MAX_CHARS = 16 * 1024  # an RSA-16384 key is ~2.8 KB
YAML_DEPTH_MAX = 64

CLOUD_CONFIG_HEADER = "#cloud-config"
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
# The patterns document the validators below (whose messages are clearer) in the OpenAPI document.
SSH_KEY_PATTERN = (
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,2}( [^\x00-\x1f\x7f]*)?$"
)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_PATTERN = rf"^{_LABEL}(\.{_LABEL})*$"
_HOSTNAME_RE = re.compile(HOSTNAME_PATTERN)
USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
_USER_RE = re.compile(USER_PATTERN)
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# root, and the system accounts of Debian's base-passwd: cloud-init would hand them a shell and sudo.
RESERVED_USERS = frozenset(
    {"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
     "backup", "list", "irc", "gnats", "nobody", "_apt", "sshd", "messagebus", "default"}
)  # fmt: skip
SUDO_NOPASSWD = "ALL=(ALL) NOPASSWD:ALL"


# ----- validators (pure: each returns its input or raises ValueError with a message for people) ------------------
def check_hostname(v: str) -> str:
    """An RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, each ≤ 63, all ≤ 253."""
    if len(v) > 253 or not _HOSTNAME_RE.fullmatch(v):
        raise ValueError(
            f"invalid hostname {v[:80]!r}: use labels of letters, digits and hyphens (not at either end), each at "
            "most 63 characters, separated by dots, at most 253 in all (RFC 1123)"
        )
    return v


def check_user(v: str) -> str:
    if not _USER_RE.fullmatch(v):
        raise ValueError(f"invalid user name {v[:80]!r}: 1-32 characters from a-z 0-9 _ -, starting with a letter or _")
    if v in RESERVED_USERS:
        raise ValueError(f"user name {v!r} is taken by the system (root or a system account): choose another")
    return v


def check_ssh_key(v: str) -> str:
    """An OpenSSH public key line: TYPE BASE64 [COMMENT], whose decoded blob names the same TYPE."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise ValueError("an SSH public key is one line of printable characters")
    if v.startswith("-----BEGIN"):
        raise ValueError("this is a private key (or a PEM file): give the public key, the .pub file")
    kind, _, rest = v.strip().partition(" ")
    if kind not in SSH_KEY_TYPES:
        raise ValueError(
            f"not an SSH public key: it starts with {kind[:40]!r}, not a key type ({', '.join(SSH_KEY_TYPES)})"
        )
    blob_text = rest.strip().split(" ", 1)[0]
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {kind} key's data is not base64") from None
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if n != len(kind) or blob[4 : 4 + n] != kind.encode():
        raise ValueError(f"the {kind} key's data does not hold a {kind} key (a truncated or mangled key?)")
    return v.strip()


def _depth(node: Any, seen: dict[int, int], path: set[int]) -> int:
    """How deep node nests (YAML anchors may share nodes and even make cycles: each node is counted once)."""
    if not isinstance(node, (dict, list)):
        return 0
    key = id(node)
    if key in path:
        raise ValueError("it refers to itself (a YAML alias inside its own anchor)")
    if key not in seen:
        path.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        seen[key] = 1 + max((_depth(c, seen, path) for c in children), default=0)
        path.discard(key)
    return seen[key]


def load_yaml(text: str, what: str) -> Any:
    """text parsed by the safe loader; ValueError naming `what` when it is not YAML vmkit can carry."""
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)  # the safe loader, as yaml.safe_load
        if _depth(data, {}, set()) > YAML_DEPTH_MAX:
            raise ValueError(f"it nests deeper than {YAML_DEPTH_MAX} levels")
    except yaml.MarkedYAMLError as e:
        mark = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        raise ValueError(f"{what} is not valid YAML: {e.problem or e.context}{mark}") from None
    except (yaml.YAMLError, ValueError, RecursionError, TypeError, OverflowError) as e:
        raise ValueError(f"{what} is not valid YAML: {str(e) or type(e).__name__}") from None
    return data


def parse_cloud_config(text: str) -> dict[Any, Any]:
    """The mapping a #cloud-config document holds (empty for a header alone); ValueError for anything else."""
    first = text.split("\n", 1)[0].rstrip("\r \t")
    if first != CLOUD_CONFIG_HEADER:
        raise ValueError(
            "user-data must be a cloud-config: its first line is exactly '#cloud-config' (scripts, #include and "
            "MIME multi-part user-data are not supported)"
        )
    data = load_yaml(text, "user-data")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"user-data must be a YAML mapping (key: value lines), not a {_kind(data)}")
    return data


def parse_network_config(text: str) -> dict[Any, Any]:
    """A NoCloud network-config: a mapping with `version: 1` or `2` (possibly under a `network:` key)."""
    data = load_yaml(text, "network-config")
    if not isinstance(data, dict):
        raise ValueError(f"network-config must be a YAML mapping, not a {_kind(data)}")
    wrapped = data.get("network")
    inner: dict[Any, Any] = wrapped if isinstance(wrapped, dict) else data
    if inner.get("version") not in (1, 2):
        raise ValueError("network-config must say `version: 1` or `version: 2` (cloud-init's two formats)")
    return data


def _kind(data: Any) -> str:
    return {list: "list", str: "string", type(None): "empty document"}.get(type(data), type(data).__name__)


def _size(v: str | None, limit: int, what: str) -> str | None:
    if v is not None and len(v.encode()) > limit:
        raise ValueError(f"{what} is {len(v.encode())} bytes; at most {limit} are accepted")
    return v


def user_names(users: list[Any]) -> list[str]:
    """The names a cloud-config `users` list gives (entries are "default", a name, or a mapping with `name`)."""
    out = []
    for u in users:
        name = u.get("name") if isinstance(u, dict) else u
        if isinstance(name, str):
            out.append(name)
    return out


# ----- models ------------------------------------------------------------------------------------------------
SshKey = Annotated[
    str,
    Field(
        max_length=SSH_KEY_MAX_CHARS,
        description="an OpenSSH public key line: TYPE BASE64 [COMMENT]",
        json_schema_extra={"pattern": SSH_KEY_PATTERN},
    ),
]


class CloudInitRequest(BaseModel):
    """A VM's NoCloud seed, as asked for (CreateVm.cloud_init, PUT /v1/vms/{name}/cloud-init). Files are sent as
    their contents: the daemon never opens a path a client names."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    user_data: Annotated[
        str | None,
        Field(
            max_length=USER_DATA_MAX_BYTES,
            description="a #cloud-config YAML document; vmkit adds the settings below (and a few defaults) to it",
            json_schema_extra={"pattern": r"^#cloud-config[ \t\r]*(\n|$)"},
        ),
    ] = None
    ssh_keys: Annotated[
        list[SshKey],
        Field(
            max_length=SSH_KEYS_MAX,
            description="public keys for `user`, or for the image's default user when no user is given",
        ),
    ] = Field(default_factory=list)
    user: Annotated[
        str | None,
        Field(
            max_length=32,
            description="a user to create, with sudo without password and ssh_keys as its authorized keys",
            json_schema_extra={"pattern": USER_PATTERN},
        ),
    ] = None
    hostname: Annotated[
        str | None,
        Field(
            max_length=253,
            description="the guest's host name (RFC 1123); default: the VM's name made one",
            json_schema_extra={"pattern": HOSTNAME_PATTERN},
        ),
    ] = None
    network_config: Annotated[
        str | None,
        Field(
            max_length=NETWORK_CONFIG_MAX_BYTES,
            description="a NoCloud network-config YAML document (version 1 or 2); none: the image's default (DHCP)",
        ),
    ] = None

    @field_validator("user_data")
    @classmethod
    def _user_data(cls, v: str | None) -> str | None:
        if v is not None:
            _size(v, USER_DATA_MAX_BYTES, "user-data")
            parse_cloud_config(v)
        return v

    @field_validator("network_config")
    @classmethod
    def _network_config(cls, v: str | None) -> str | None:
        if v is not None:
            _size(v, NETWORK_CONFIG_MAX_BYTES, "network-config")
            parse_network_config(v)
        return v

    @field_validator("ssh_keys")
    @classmethod
    def _ssh_keys(cls, v: list[str]) -> list[str]:
        keys: list[str] = []
        for i, key in enumerate(v):
            try:
                key = check_ssh_key(key)
            except ValueError as e:
                raise ValueError(f"SSH key {i + 1}: {e}") from None
            if key not in keys:
                keys.append(key)
        return keys

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return v if v is None else check_user(v)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        return v if v is None else check_hostname(v)

    @model_validator(mode="after")
    def _merge(self) -> CloudInitRequest:
        """Refuse what cannot be merged into the user-data (see images/cloudinit.py for the rules)."""
        data = parse_cloud_config(self.user_data) if self.user_data is not None else {}
        if self.hostname is None:
            for key in ("hostname", "fqdn"):
                if key in data:
                    if not isinstance(data[key], str):
                        raise ValueError(f"user-data: {key} must be a string")
                    check_hostname(data[key])
        users = data.get("users")
        if self.user is not None:
            if users is not None and not isinstance(users, list):
                raise ValueError("user-data: `users` must be a list for the user of `user` to be added to it")
            if self.user in user_names(users or []):
                raise ValueError(f"user {self.user!r} is given twice: by `user` and in the user-data's users")
        elif self.ssh_keys:
            if "ssh_authorized_keys" in data and not isinstance(data["ssh_authorized_keys"], list):
                raise ValueError("user-data: `ssh_authorized_keys` must be a list for the SSH keys to be added to it")
            if isinstance(users, list) and "default" not in users:
                raise ValueError(
                    "the SSH keys go to the image's default user, but the user-data's users list has no 'default' "
                    "entry: give a user for them (--user NAME), or add 'default' to users"
                )
        return self


class CloudInitSettings(BaseModel):
    """The settings of a seed as accepted (a CloudInitRequest's fields), without its checks: what a spec records
    and GET shows must load whatever later versions make of the rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_data: str | None = None
    ssh_keys: list[str] = Field(default_factory=list)
    user: str | None = None
    hostname: str | None = None
    network_config: str | None = None

    @classmethod
    def of(cls, req: CloudInitRequest) -> CloudInitSettings:
        return cls(**{f: getattr(req, f) for f in cls.model_fields})


class CloudInitConfig(CloudInitSettings):
    """What a VM's spec records of its seed (VmSpec.cloud_init): its settings, and how many times it was made again
    (each time with a new instance-id, so that cloud-init treats the next boot as a first boot). The seed itself is
    the disk marked cloud_init (DiskSpec.cloud_init): it moves with the disks wherever they go."""

    generation: int = 0

    def settings(self) -> CloudInitSettings:
        return CloudInitSettings(**{f: getattr(self, f) for f in CloudInitSettings.model_fields})


class CloudInitSummary(BaseModel):
    """What VmInfo shows of a VM's seed (no YAML read): the user it was given and the SSH keys given for it (or
    for the image's default user when user is None). GET /v1/vms/{name}/cloud-init has every login, the
    user-data file's too."""

    user: str | None = None
    ssh_keys: list[str] = Field(default_factory=list)
    generation: int = 0

    @classmethod
    def of(cls, cfg: CloudInitConfig) -> CloudInitSummary:
        return cls(user=cfg.user, ssh_keys=list(cfg.ssh_keys), generation=cfg.generation)


class CloudInitLogin(BaseModel):
    """Who the seed lets in over SSH: a user (None: the image's default user, `debian` on Debian) and its keys."""

    user: str | None = None
    ssh_keys: list[str] = Field(default_factory=list)


class CloudInitFiles(BaseModel):
    """The files on the seed, as the guest reads them."""

    meta_data: str
    user_data: str
    network_config: str | None = None


class CloudInitInfo(BaseModel):
    """What GET /v1/vms/{name}/cloud-init returns."""

    vm: str
    seed: str | None = None  # POOL/NAME of the seed volume; None when its disk was detached
    disk: str | None = None  # the seed's disk (disk1, …)
    instance_id: str
    hostname: str  # the guest's host name (local-hostname)
    user: str | None = None  # the user `user` created; None: logins go to the image's default user
    logins: list[CloudInitLogin] = Field(default_factory=list)
    settings: CloudInitSettings  # as given (user-data file, keys, user, hostname, network-config)
    files: CloudInitFiles
