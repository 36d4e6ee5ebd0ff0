"""`vmkit volume …`: volumes (image files in pools)."""

from __future__ import annotations

import argparse
import os

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import ProgressBar, emit, human_size, kv, print_json, print_table

FORMATS = ("qcow2", "raw")
PREALLOC = ("off", "metadata", "falloc", "full")


def _key(text: str) -> tuple[str, str]:
    from vmkit.cli.main import CliError

    pool, sep, name = text.partition("/")
    if not sep or not pool or not name or "/" in name:
        raise CliError(f"invalid volume {text!r}: write it POOL/NAME (e.g. default/data.qcow2)")
    return pool, name


def _url(key: str, action: str = "") -> str:
    from vmkit.cli.main import quote

    pool, name = _key(key)
    return f"/v1/pools/{quote(pool)}/volumes/{quote(name)}" + (f"/{action}" if action else "")


def _run(c: Client, a: argparse.Namespace, res: dict[str, Any], label: str) -> dict[str, Any]:
    """Wait for the operation a volume request started (progress bar), and return the volume."""
    from vmkit.cli.main import wait_operation

    if "operation" not in res:
        return res
    return dict(wait_operation(c, res["operation"], label, a.json)["result"])


def _row(v: dict[str, Any]) -> list[Any]:
    return [
        v["key"], v["format"], v["provisioning"], human_size(v["capacity_bytes"]), human_size(v["allocation_bytes"]),
        v.get("backing") or "-", ",".join(v.get("used_by") or []) or "-",
    ]  # fmt: skip


def volume_list(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import quote

    vols = c.get("/v1/volumes" + (f"?pool={quote(a.pool)}" if a.pool else ""))
    if a.json:
        print_json(vols)
    else:
        headers = ["volume", "format", "provisioning", "size", "allocated", "backing", "used by"]
        print_table(headers, [_row(v) for v in vols])
    return 0


def volume_info(c: Client, a: argparse.Namespace) -> int:
    v = c.get(_url(a.volume) + "?chain=true")
    if a.json:
        print_json(v)
        return 0
    kv(
        [
            ("Volume", v["key"]),
            ("Path", v["path"]),
            ("Format", v["format"]),
            ("Provisioning", f"{v['provisioning']} (preallocation {v['prealloc']})"),
            ("Virtual size", f"{human_size(v['capacity_bytes'])} ({v['capacity_bytes']} bytes)"),
            ("Allocated", human_size(v["allocation_bytes"])),
            ("Backing", v.get("backing")),
            ("Used by", ", ".join(v.get("used_by") or [])),
        ]
    )
    for depth, img in enumerate(v.get("chain") or [], start=1):
        sizes = f"{human_size(img.get('capacity_bytes'))}, {human_size(img.get('allocation_bytes'))} allocated"
        print(f"{'  ' * depth}└ {img.get('volume') or img['path']} ({img['format']}, {sizes})")
    return 0


def volume_create(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import parse_size, quote

    pool, name = _key(a.volume)
    body = {"name": name, "size_bytes": parse_size(a.size), "format": a.format, "prealloc": a.prealloc}
    vol = _run(c, a, c.post(f"/v1/pools/{quote(pool)}/volumes", body), f"creating {a.volume}")
    return emit(a, vol, f"volume {vol['key']} created ({vol['format']}, {vol['provisioning']}, "
                         f"{human_size(vol['capacity_bytes'])})")  # fmt: skip


def volume_resize(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import parse_size

    if a.size.startswith("+"):
        size = c.get(_url(a.volume))["capacity_bytes"] + parse_size(a.size[1:])
    else:
        size = parse_size(a.size)
    body = {"size_bytes": size, "allow_shrink": a.allow_shrink}
    vol = _run(c, a, c.post(_url(a.volume, "resize"), body), f"resizing {a.volume}")
    return emit(a, vol, f"volume {vol['key']} is now {human_size(vol['capacity_bytes'])}")


def volume_convert(c: Client, a: argparse.Namespace) -> int:
    body = {"format": a.format, "prealloc": a.prealloc}
    vol = _run(c, a, c.post(_url(a.volume, "convert"), body), f"converting {a.volume}")
    return emit(a, vol, f"volume {vol['key']} is now {vol['format']}, {vol['provisioning']}")


def volume_clone(c: Client, a: argparse.Namespace) -> int:
    pool, _ = _key(a.source)
    target = a.target if "/" in a.target else f"{pool}/{a.target}"
    _key(target)
    res = c.post(_url(a.source, "clone"), {"target": target, "linked": a.linked})
    vol = _run(c, a, res, f"cloning {a.source}")
    kind = f"linked clone (overlay on {a.source})" if a.linked else "full copy"
    return emit(a, vol, f"volume {vol['key']} created: {kind}")


def import_file(c: Client, key: str, path: str, quiet: bool) -> dict[str, Any]:
    """Make volume POOL/NAME from a local file: a daemon on this host copies it itself (sparse, at cp's speed);
    a remote one is sent the file, streamed."""
    from vmkit.cli.main import CliError, wait_operation

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    label = f"importing {os.path.basename(path)}"
    with f:
        if c.url is None:
            res = c.post(_url(key, "import"), {"path": os.path.abspath(path)})
            return dict(wait_operation(c, res["operation"], label, quiet)["result"])
        size = os.fstat(f.fileno()).st_size
        bar = None if quiet else ProgressBar(label)
        vol = c.upload(_url(key, "upload"), f, size, (lambda x: bar.update(x, "")) if bar else None)
        if bar:
            bar.done()
        return dict(vol)


def volume_import(c: Client, a: argparse.Namespace) -> int:
    vol = import_file(c, a.volume, a.file, a.json)
    return emit(a, vol, f"volume {vol['key']} imported ({vol['format']}, {human_size(vol['capacity_bytes'])})")


def volume_export(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError

    if os.path.exists(a.file) and not a.force:
        raise CliError(f"{a.file} exists (--force to overwrite)")
    part = a.file + ".part"
    bar = None if a.json else ProgressBar(f"exporting {a.volume}")
    try:
        with open(part, "wb") as out:
            size = c.download(_url(a.volume, "download"), out, (lambda x: bar.update(x, "")) if bar else None)
        os.replace(part, a.file)
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise
    finally:
        if bar:
            bar.done()
    return emit(a, {"volume": a.volume, "file": a.file, "bytes": size}, f"{a.volume} written to {a.file}")


def volume_delete(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", _url(a.volume))
    return emit(a, {"deleted": a.volume}, f"volume {a.volume} deleted")


def add_parsers(nouns: Any, add: Any) -> None:
    vol = nouns.add_parser("volume", help="volumes: disk images and install media in pools").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    sp = add(vol, "list", volume_list, "list volumes (all pools, or one)")
    sp.add_argument("pool", nargs="?")
    sp = add(vol, "info", volume_info, "show a volume and its whole backing chain")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp = add(vol, "create", volume_create, "create an empty volume")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp.add_argument("--size", required=True, metavar="SIZE", help="e.g. 10G")
    sp.add_argument("--format", choices=FORMATS, default="qcow2")
    sp.add_argument(
        "--prealloc", choices=PREALLOC, default="off", help="off/metadata: thin; falloc/full: thick (default off)"
    )
    sp = add(vol, "resize", volume_resize, "grow a volume (shrink only with --allow-shrink)")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp.add_argument("--size", required=True, metavar="[+]SIZE", help="new size, or +SIZE to grow by")
    sp.add_argument("--allow-shrink", action="store_true", help="allow losing the data past the new end")
    sp = add(vol, "convert", volume_convert, "rewrite a volume as raw or qcow2, thin or thick")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp.add_argument("--format", choices=FORMATS, required=True)
    sp.add_argument("--prealloc", choices=PREALLOC, default="off")
    sp = add(vol, "clone", volume_clone, "copy a volume, or make a qcow2 overlay on it (--linked)")
    sp.add_argument("source", metavar="POOL/NAME")
    sp.add_argument("target", metavar="[POOL/]NEW")
    sp.add_argument("--linked", action="store_true", help="a thin overlay backed by the source (instant)")
    sp = add(vol, "import", volume_import, "copy a local image file (raw, qcow2 or ISO) into a new volume")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp.add_argument("file", metavar="FILE")
    sp = add(vol, "export", volume_export, "download a volume into a local file (sparse)")
    sp.add_argument("volume", metavar="POOL/NAME")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--force", action="store_true", help="overwrite FILE")
    sp = add(vol, "delete", volume_delete, "delete a volume (refused while a VM or another volume uses it)")
    sp.add_argument("volume", metavar="POOL/NAME")
