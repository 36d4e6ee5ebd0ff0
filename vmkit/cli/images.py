"""`vmkit image build`: a Debian image from Debian packages (the daemon checks the recipe and builds it)."""

from __future__ import annotations

import argparse
import time

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit


def image_build(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import parse_size, quote, wait_operation

    body: dict[str, Any] = {}
    if a.size is not None:
        body["size_bytes"] = parse_size(a.size)
    if a.packages:
        body["packages"] = [p.strip() for p in a.packages.split(",") if p.strip()]
    t0 = time.monotonic()
    res = c.post(f"/v1/images/build/{quote(a.release)}", body)
    if "operation" in res and a.no_wait:
        op = res["operation"]
        return emit(a, op, f"building {a.release}: operation {op['id']} (GET /v1/operations/{op['id']})")
    image = (
        wait_operation(c, res["operation"], f"building {a.release}", a.json)["result"]
        if "operation" in res
        else res["image"]
    )
    took = time.monotonic() - t0
    mib = image.get("disk_file_bytes", 0) / (1 << 20)
    return emit(
        a,
        image,
        f"image {image['name']} ready in {took:.1f} s: disk {image['disk_volume']} ({mib:.0f} MiB, sha256 "
        f"{image['sha256'][:16]}…), kernel {image['kernel_version']}",
    )


def add_parsers(image: Any, add: Any) -> None:
    sp = add(image, "build", image_build, "build (or reuse) a Debian image from Debian packages, with cloud-init")
    sp.add_argument("release", metavar="RELEASE", help="debian-12")
    sp.add_argument("--size", metavar="SIZE", help="the disk's virtual size (default 4G; at least 1G)")
    sp.add_argument("--packages", metavar="A,B", help="more Debian packages to install")
    sp.add_argument("--no-wait", action="store_true", help="return the operation at once instead of waiting")
