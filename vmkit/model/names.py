"""The one naming rule for VMs, pools, volumes, images and tokens."""

from __future__ import annotations

import ipaddress
import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)


def valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None  # fullmatch: "$" alone would accept a trailing newline


def check_name(name: str, what: str = "VM") -> str:
    """Return name if it is a valid resource name, else raise ValueError with a message for people."""
    if not valid_name(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use 1-63 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


ABS_PATH_PATTERN = r"^/[^\x00]*$"


def check_abs_path(v: str) -> str:
    """Return v if it is an absolute path (no NUL), else raise ValueError for people."""
    if not v.startswith("/") or "\0" in v:
        raise ValueError("must be an absolute path")
    return v


# A DNS name or an IP address (IPv6 possibly bracketed); valid_host is the rule.
HOST_PATTERN = r"^([A-Za-z0-9.-]+|\[?[0-9A-Fa-f:.]+\]?)$"
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def valid_host(host: str) -> bool:
    """An IP address, or a DNS name of letters, digits and hyphens (what the resolver is given as it is)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253 or host.replace(".", "").isdigit():
        return False  # all digits: a mistyped IPv4 address, not a name
    return all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))
