"""`vmkit snapshot …`: a VM's snapshot tree (virsh snapshot-create-as / -list / -info / -revert / -delete)."""

from __future__ import annotations

import argparse
import time

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit, kv, print_json, print_table


def _url(vm: str, snap: str = "", action: str = "") -> str:
    from vmkit.cli.main import quote

    url = f"/v1/vms/{quote(vm)}/snapshots"
    if snap:
        url += f"/{quote(snap)}"
    return url + (f"/{action}" if action else "")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _kind(s: dict[str, Any]) -> str:
    return "internal+memory" if s["memory"] else ("internal" if s["kind"] == "internal" else "disk-only")


def snapshot_create(c: Client, a: argparse.Namespace) -> int:
    body = {"name": a.snapshot, "description": a.description or "", "disk_only": a.disk_only,
            "quiesce": not a.no_quiesce}  # fmt: skip
    s = c.post(_url(a.vm), body)
    return emit(a, s, f"snapshot {s['name']} of {a.vm} created ({_kind(s)})")


def _tree_lines(snaps: list[dict[str, Any]]) -> list[list[str]]:
    """Rows in tree order, each name indented under its parent (virsh snapshot-list --tree)."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    for s in snaps:
        by_parent.setdefault(s.get("parent"), []).append(s)
    rows: list[list[str]] = []

    def walk(parent: str | None, prefix: str) -> None:
        kids = by_parent.get(parent, [])
        for i, s in enumerate(kids):
            last = i == len(kids) - 1
            branch = "" if parent is None else ("└─ " if last else "├─ ")
            mark = " *" if s["current"] else ""
            rows.append([prefix + branch + s["name"] + mark, _kind(s), s["state"], _when(s["created_at"])])
            walk(s["name"], prefix + ("" if parent is None else ("   " if last else "│  ")))

    walk(None, "")
    return rows


def snapshot_list(c: Client, a: argparse.Namespace) -> int:
    snaps = c.get(_url(a.vm))
    if a.json:
        print_json(snaps)
    elif a.tree:
        print_table(["snapshot (* current)", "kind", "state", "created"], _tree_lines(snaps))
    else:
        rows = [[s["name"] + (" *" if s["current"] else ""), _kind(s), s["state"], s.get("parent") or "-",
                 _when(s["created_at"]), s.get("description") or ""] for s in snaps]  # fmt: skip
        print_table(["snapshot (* current)", "kind", "state", "parent", "created", "description"], rows)
    return 0


def snapshot_info(c: Client, a: argparse.Namespace) -> int:
    s = c.get(_url(a.vm, a.snapshot))
    if a.json:
        print_json(s)
        return 0
    kv(
        [
            ("Name", s["name"]),
            ("VM", a.vm),
            ("Kind", _kind(s)),
            ("State", s["state"]),
            ("Created", _when(s["created_at"])),
            ("Parent", s.get("parent")),
            ("Children", ", ".join(s.get("children") or [])),
            ("Current", "yes" if s["current"] else "no"),
            ("Description", s.get("description")),
            ("Disks", ", ".join(f"{d['disk']}={d['volume']}" for d in s.get("disks") or [])),
        ]
    )
    return 0


def snapshot_revert(c: Client, a: argparse.Namespace) -> int:
    vm = c.post(_url(a.vm, a.snapshot, "revert"), {})
    return emit(a, vm, f"{a.vm} reverted to snapshot {a.snapshot}: {vm['state']}")


def snapshot_delete(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", _url(a.vm, a.snapshot))
    return emit(a, {"deleted": a.snapshot, "vm": a.vm}, f"snapshot {a.snapshot} of {a.vm} deleted")


def add_parsers(nouns: Any, add: Any) -> None:
    snap = nouns.add_parser("snapshot", help="snapshots of a VM (one tree per VM)").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    sp = add(snap, "create", snapshot_create, "take a snapshot: internal with RAM (running VM), or --disk-only")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("snapshot", metavar="NAME")
    sp.add_argument("--description", metavar="TEXT")
    sp.add_argument("--disk-only", action="store_true", help="external: a new qcow2 overlay on every disk")
    sp.add_argument("--atomic", action="store_true", help="accepted: a disk-only snapshot is always atomic")
    sp.add_argument("--no-quiesce", action="store_true", help="do not freeze the guest's filesystems (agent)")
    sp = add(snap, "list", snapshot_list, "list a VM's snapshots (* marks the current one)")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("--tree", action="store_true", help="show them as a tree")
    sp = add(snap, "info", snapshot_info, "show one snapshot")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("snapshot", metavar="NAME")
    sp = add(snap, "revert", snapshot_revert, "return the VM to a snapshot (running again if it has RAM state)")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("snapshot", metavar="NAME")
    sp = add(snap, "delete", snapshot_delete, "delete a snapshot, leaf or middle (the others stay revertable)")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("snapshot", metavar="NAME")
