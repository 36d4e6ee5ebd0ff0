"""`vmkit vm save|restore|saves|managedsave-remove` (virsh save / restore / managedsave-remove); `vm stop --save`
(virsh managedsave) lives with `vm stop` in cli/main.py."""

from __future__ import annotations

import argparse
import time

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit, human_size, print_json, print_table


def _volume_url(key: str, action: str = "") -> str:
    from vmkit.cli.main import CliError, quote

    pool, sep, name = key.partition("/")
    if not sep or not pool or not name:
        raise CliError(f"invalid save volume {key!r}: write it POOL/NAME (vmkit vm saves lists them)")
    return f"/v1/saves/{quote(pool)}/{quote(name)}" + (f"/{action}" if action else "")


def vm_save(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import _vm_url

    body = {"volume": a.volume} if a.volume else {}
    s = c.post(_vm_url(a.name, "save"), body)
    return emit(a, s, f"VM {a.name} saved to {s['volume']} ({human_size(s['size_bytes'])}); it is shut off")


def vm_restore(c: Client, a: argparse.Namespace) -> int:
    vm = c.post(_volume_url(a.volume, "restore"))
    return emit(a, vm, f"VM {vm['name']} restored from {a.volume}: {vm['state']}")


def vm_saves(c: Client, a: argparse.Namespace) -> int:
    saves: list[dict[str, Any]] = c.get("/v1/saves")
    if a.name:
        saves = [s for s in saves if s["vm"] == a.name]
    if a.json:
        print_json(saves)
        return 0
    print_table(
        ["volume", "vm", "state", "managed", "size", "saved"],
        [[s["volume"], s["vm"], s["state"], "yes" if s["managed"] else "no", human_size(s["size_bytes"]),
          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["saved_at"]))] for s in saves],
    )  # fmt: skip
    return 0


def vm_managedsave_remove(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import _vm_url

    vm = c.request("DELETE", _vm_url(a.name, "managed-save"))
    return emit(a, vm, f"managed save of {a.name} removed; its next start boots afresh")


def add_parsers(vm: Any, add: Any) -> None:
    """The verbs under `vmkit vm` (called from cli/main.py's build_parser)."""
    sp = add(vm, "save", vm_save, "stop a VM keeping its RAM and device state in a volume (virsh save)")
    sp.add_argument("name")
    sp.add_argument("volume", nargs="?", metavar="POOL/NAME", help="the new save volume (default default/NAME.save)")
    sp = add(vm, "restore", vm_restore, "run the VM of a save volume again from where it was (virsh restore)")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp = add(vm, "saves", vm_saves, "list save volumes: whose, running or paused, managed or not")
    sp.add_argument("name", nargs="?", help="only this VM's")
    sp = add(vm, "managedsave-remove", vm_managedsave_remove, "discard a VM's managed save (vm stop --save)")
    sp.add_argument("name")
