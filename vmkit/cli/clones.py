"""`vmkit vm clone`: a new VM like an existing one (virt-clone)."""

from __future__ import annotations

import argparse

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit


def vm_clone(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import quote, wait_operation

    body: dict[str, Any] = {"name": a.new, "linked": a.linked}
    if a.memory is not None:
        body["memory_mib"] = a.memory
    if a.vcpus is not None:
        body["vcpus"] = a.vcpus
    res = c.post(f"/v1/vms/{quote(a.source)}/clone", body)
    vm = wait_operation(c, res["operation"], f"cloning {a.source}", a.json)["result"]
    kind = "linked clone" if a.linked else "full clone"
    return emit(a, vm, f"VM {vm['name']} created: {kind} of {a.source} ({len(vm['disks'])} disk(s), new MACs)")


def add_parsers(vm: Any, add: Any) -> None:
    sp = add(vm, "clone", vm_clone, "make a new VM like SOURCE: new UUID, MACs and disks (copies, or --linked)")
    sp.add_argument("source", metavar="SOURCE")
    sp.add_argument("new", metavar="NEW")
    sp.add_argument("--linked", action="store_true", help="overlays on the source's images (instant, thin)")
    sp.add_argument("--memory", type=int, metavar="MIB", help="the clone's memory (default: the source's)")
    sp.add_argument("--vcpus", type=int, metavar="N", help="the clone's vCPUs (default: the source's)")
