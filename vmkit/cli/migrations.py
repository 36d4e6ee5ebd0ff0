"""`vmkit vm migrate`: move a running VM to another vmkit host (virsh migrate --live [--copy-storage-all]
[--postcopy])."""

from __future__ import annotations

import argparse

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit


def vm_migrate(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import quote, wait_operation

    body: dict[str, Any] = {"remote": a.remote, "offline": a.offline, "copy_storage": a.copy_storage,
                            "postcopy": a.postcopy, "max_downtime_ms": a.max_downtime_ms}  # fmt: skip
    if a.bandwidth is not None:
        body["bandwidth_mib_s"] = a.bandwidth
    res = c.post(f"/v1/vms/{quote(a.vm)}/migrate", body)
    out = wait_operation(c, res["operation"], f"migrating {a.vm} to {a.remote}", a.json)["result"]
    how = ", switched to post-copy" if out.get("postcopy") else ""
    if out.get("offline"):
        return emit(a, out, f"VM {a.vm} is defined on {a.remote} now ({out['total_s']} s)")
    return emit(a, out, f"VM {a.vm} runs on {a.remote} now ({out['total_s']} s, downtime {out['downtime_ms']} ms{how})")


def vm_migrate_cancel(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import quote

    c.post(f"/v1/vms/{quote(a.vm)}/migrate-cancel", {})
    return emit(a, {"vm": a.vm, "cancelled": True}, f"migration of {a.vm} cancelled; it stays here")


def add_parsers(vm: Any, add: Any) -> None:
    sp = add(vm, "migrate", vm_migrate, "move VM to a remote vmkit host while it runs")
    sp.add_argument("vm", metavar="VM")
    sp.add_argument("remote", metavar="REMOTE")
    sp.add_argument("--offline", action="store_true", help="a shut-off VM: move its definition and disks")
    sp.add_argument("--copy-storage", action="store_true", help="copy disks on local pools to new volumes there, live")
    sp.add_argument(
        "--postcopy", action="store_true",
        help="switch to post-copy when it does not converge, instead of cancelling (disks on shared pools only)",
    )  # fmt: skip
    sp.add_argument("--max-downtime-ms", type=int, default=300, metavar="N", help="longest pause allowed (300)")
    sp.add_argument("--bandwidth", type=int, metavar="MiB/s", help="cap the streams (default: none)")
    sp = add(vm, "migrate-cancel", vm_migrate_cancel, "stop a migration under way (the VM stays here)")
    sp.add_argument("vm", metavar="VM")
