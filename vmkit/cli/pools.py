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
        ["name", "state", "path", "capacity", "allocation", "available", "volumes"],
        [
            [p["name"], "active" if p["active"] else "missing", p["path"], human_size(p.get("capacity_bytes")),
             human_size(p.get("allocation_bytes")), human_size(p.get("available_bytes")), p["volumes"]]
            for p in pools
        ],
    )  # fmt: skip
    return 0


def _show(p: dict[str, Any]) -> None:
    kv(
        [
            ("Name", p["name"]),
            ("Kind", p["kind"]),
            ("Path", p["path"]),
            ("State", "active" if p["active"] else "missing (its directory is gone)"),
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
    p = c.post(_url(), {"name": a.name, "kind": "dir", "path": os.path.abspath(a.path)})
    return emit(a, p, f"pool {p['name']} created at {p['path']}")


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
    sp = add(pool, "create", pool_create, "define a directory pool (the directory is made if missing)")
    sp.add_argument("name")
    sp.add_argument("--path", required=True, metavar="DIR")
    add(pool, "refresh", pool_refresh, "adopt image files dropped into the pool's directory").add_argument("name")
    add(pool, "delete", pool_delete, "forget an empty pool (its directory is removed when empty)").add_argument("name")
