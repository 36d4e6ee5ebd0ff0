"""`vmkit pool …`: storage pools."""

from __future__ import annotations

import argparse
import os

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit, human_size, kv, print_json, print_table


def _url(name: str = "", action: str = "") -> str:
    from vmkit.cli.main import quote

    return "/v1/pools" + (f"/{quote(name)}" if name else "") + (f"/{action}" if action else "")


def pool_list(c: Client, a: argparse.Namespace) -> int:
    pools = c.get(_url())
    if a.json:
        print_json(pools)
        return 0
    print_table(
        ["name", "kind", "state", "path", "capacity", "allocation", "available", "volumes"],
        [
            [p["name"], p["kind"], _state(p), p["path"], human_size(p.get("capacity_bytes")),
             human_size(p.get("allocation_bytes")), human_size(p.get("available_bytes")), p["volumes"]]
            for p in pools
        ],
    )  # fmt: skip
    return 0


def _state(p: dict[str, Any]) -> str:
    if p["active"]:
        return "active"
    return "unreachable" if p.get("shared") else "missing"


def _show(p: dict[str, Any]) -> None:
    kv(
        [
            ("Name", p["name"]),
            ("Kind", p["kind"]),
            ("Path", p["path"]),
            ("Shared", "yes (its volumes stay on the server when a VM migrates)" if p.get("shared") else "no"),
            ("State", _state(p) if p["active"] or p.get("shared") else "missing (its directory is gone)"),
            ("Capacity", human_size(p.get("capacity_bytes"))),
            ("Allocation", human_size(p.get("allocation_bytes"))),
            ("Available", human_size(p.get("available_bytes"))),
            ("Volumes", p["volumes"]),
        ]
    )


def pool_info(c: Client, a: argparse.Namespace) -> int:
    p = c.get(_url(a.name))
    if a.json:
        print_json(p)
    else:
        _show(p)
    return 0


def pool_create(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError

    body: dict[str, Any] = {"name": a.name, "kind": a.type}
    fields = {"dir": ("path",), "nfs": ("server", "export", "uid", "gid"), "iscsi": ("portal", "target")}[a.type]
    for key in ("path", "server", "export", "uid", "gid", "portal", "target"):
        value = getattr(a, key)
        if value is None:
            continue
        if key not in fields:
            raise CliError(f"--{key} is not for a {a.type} pool (it takes {', '.join('--' + f for f in fields)})")
        body[key] = os.path.abspath(value) if key == "path" else value
    p = c.post(_url(), body)
    where = "at" if a.type == "dir" else "on"
    return emit(a, p, f"pool {p['name']} created {where} {p['path']} ({p['volumes']} volume(s) there)")


def pool_refresh(c: Client, a: argparse.Namespace) -> int:
    res = c.post(_url(a.name, "refresh"))
    if a.json:
        print_json(res)
        return 0
    for name in res["adopted"]:
        print(f"adopted {a.name}/{name}")
    for name in res["forgotten"]:
        print(f"forgot {a.name}/{name} (its file is gone)")
    for s in res["skipped"]:
        print(f"skipped {s['name']}: {s['reason']}")
    if not any(res.values()):
        print(f"pool {a.name}: nothing new")
    return 0


def pool_delete(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", _url(a.name))
    return emit(a, {"deleted": a.name}, f"pool {a.name} deleted")


def add_parsers(nouns: Any, add: Any) -> None:
    pool = nouns.add_parser("pool", help="storage pools (directories of volumes)").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    add(pool, "list", pool_list, "list pools with capacity, allocation and free space")
    add(pool, "info", pool_info, "show one pool").add_argument("name")
    sp = add(
        pool, "create", pool_create,
        "define a pool: a directory (made if missing), an NFS export or an iSCSI target (reached by QEMU itself)",
    )  # fmt: skip
    sp.add_argument("name")
    sp.add_argument("--type", choices=("dir", "nfs", "iscsi"), default="dir", help="the pool's kind (default dir)")
    sp.add_argument("--path", metavar="DIR", help="dir: the directory")
    sp.add_argument("--server", metavar="HOST", help="nfs: the NFS server (NFSv3)")
    sp.add_argument("--export", metavar="PATH", help="nfs: the exported directory")
    sp.add_argument("--uid", type=int, metavar="UID", help="nfs: the uid vmkit and QEMU present (default 0)")
    sp.add_argument("--gid", type=int, metavar="GID", help="nfs: the gid vmkit and QEMU present (default 0)")
    sp.add_argument("--portal", metavar="HOST[:PORT]", help="iscsi: the target's portal (port 3260 by default)")
    sp.add_argument("--target", metavar="IQN", help="iscsi: the target's name")
    add(
        pool, "refresh", pool_refresh, "adopt image files dropped into the pool's directory (or made on its server)"
    ).add_argument("name")
    add(
        pool,
        "delete",
        pool_delete,
        "forget a pool: a dir pool when empty (its directory is removed when empty); a shared one's volumes stay "
        "on its server",
    ).add_argument("name")
