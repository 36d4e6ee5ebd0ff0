"""Pool definitions: dir, nfs and iscsi pools take exactly their own fields, each checked, and a shared pool's
location is one URL built from those checked parts (the same string on every host that defines it)."""

from __future__ import annotations

import struct

import pytest
from pydantic import ValidationError

from vmkit.model.storage import CreatePool, PoolSpec, check_export, check_iqn, parse_portal
from vmkit.services.sharedpools import _header_format, iscsi_target, lun_number, nfs_share


def test_locations() -> None:
    nfs = CreatePool(name="nas", kind="nfs", server="10.0.0.5", export="/srv/vmkit/", uid=1000, gid=100)
    assert nfs.location() == "nfs://10.0.0.5/srv/vmkit?uid=1000&gid=100"
    share = nfs_share(PoolSpec(name="nas", kind="nfs", path=nfs.location()))
    assert (share.server, share.export, share.uid, share.gid) == ("10.0.0.5", "/srv/vmkit", 1000, 100)
    san = CreatePool(name="san", kind="iscsi", portal="[fd00::5]", target="iqn.2026-11.org.example:t1")
    assert san.location() == "iscsi://[fd00::5]:3260/iqn.2026-11.org.example:t1"
    target = iscsi_target(PoolSpec(name="san", kind="iscsi", path=san.location()))
    assert (target.host, target.port, target.iqn) == ("fd00::5", 3260, "iqn.2026-11.org.example:t1")
    assert CreatePool(name="d", path="/srv/d").location() == "/srv/d"


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "nfs", "server": "10.0.0.5"},  # no export
        {"kind": "nfs", "export": "/x"},  # no server
        {"kind": "nfs", "server": "10.0.0.5", "export": "/x", "path": "/y"},  # a dir pool's field
        {"kind": "dir", "path": "/x", "uid": 5},
        {"kind": "iscsi", "portal": "h", "target": "iqn.2026-11.org.x", "export": "/x"},
        {"kind": "nfs", "server": "a b", "export": "/x"},
        {"kind": "nfs", "server": "h", "export": "relative"},
        {"kind": "nfs", "server": "h", "export": "/a/../etc"},
        {"kind": "nfs", "server": "h", "export": "/a,b"},  # a comma would end a QEMU option
        {"kind": "nfs", "server": "h", "export": "/x", "uid": -1},
        {"kind": "iscsi", "portal": "h:0", "target": "iqn.2026-11.org.x"},
        {"kind": "iscsi", "portal": "h:70000", "target": "iqn.2026-11.org.x"},
        {"kind": "iscsi", "portal": "h", "target": "not-an-iqn"},
        {"kind": "iscsi", "portal": "h", "target": "iqn.2026-11.org.x:a,b"},
        {"kind": "smb", "path": "/x"},
    ],
)
def test_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CreatePool.model_validate({"name": "p", **body})


def test_checks() -> None:
    assert check_export("/") == "/"
    assert check_iqn("eui.0123456789ABCDEF") == "eui.0123456789ABCDEF"
    assert parse_portal("san.example:3261") == ("san.example", 3261)
    with pytest.raises(ValueError, match="portal"):
        parse_portal("[10.0.0.1]:3260")  # brackets are for IPv6
    assert lun_number("lun12") == 12
    for bad in ("lun", "lunx", "disk1", "lun-1"):
        with pytest.raises(Exception, match="LUN"):
            lun_number(bad)


def _qcow2_header(size: int, backing_offset: int = 0, incompatible: int = 0) -> bytes:
    head = bytearray(104)
    head[:4] = b"QFI\xfb"
    head[4:8] = struct.pack(">I", 3)
    head[8:16] = struct.pack(">Q", backing_offset)
    head[24:32] = struct.pack(">Q", size)
    head[72:80] = struct.pack(">Q", incompatible)
    return bytes(head)


def test_header_format_decides_adoption() -> None:
    assert _header_format(b"\0" * 104) == ("raw", None, None)
    assert _header_format(_qcow2_header(1 << 30)) == ("qcow2", 1 << 30, None)
    fmt, _, why = _header_format(_qcow2_header(1 << 30, backing_offset=512))
    assert fmt == "qcow2" and why is not None and "backing" in why
    _, _, why = _header_format(_qcow2_header(1 << 30, incompatible=4))
    assert why is not None and "external data" in why
