"""The `vmkit` command: noun-verb subcommands talking to the daemon over HTTP.

Only the standard library is imported at start-up; the server stack (FastAPI, uvicorn, pydantic) is
imported by `vmkit daemon` alone, so `vmkit vm list` starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable

if False:  # typing costs ~2 ms at start-up; annotations are strings (PEP 563) and only mypy reads them
    from typing import Any

from vmkit.cli.client import ApiError, Client
from vmkit.cli.output import ProgressBar, emit, kv, print_json, print_table

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class CliError(Exception):
    pass


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5GiB', '1048576' → bytes (binary units, as qemu-img uses)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise CliError(f"invalid size {text!r} (examples: 512M, 10G)")
    unit = (m.group(2) or "").upper()[:1]
    size = int(float(m.group(1)) * _UNITS[unit if unit != "B" else "B"])
    if size <= 0:
        raise CliError(f"size must be positive: {text!r}")
    return size


def parse_disk_opts(text: str, *, first: str) -> dict[str, Any]:
    """'10G,iops=100,bps=20M' → {'size': 10 GiB, 'iops_total': 100, 'bps_total': 20 MiB}. The first item
    may be bare: it is then the `first` key (size or POOL/VOL for create, the disk's name for set)."""
    out: dict[str, Any] = {}
    for i, item in enumerate(text.split(",")):
        key, sep, value = item.partition("=")
        if not sep and i == 0:
            key, value = first, item
            if first == "size" and "/" in item:
                key = "volume"
        if key == "size":
            out["size"] = parse_size(value)
        elif key in ("name", "volume", "pool"):
            out[key] = value
        elif key == "format" and value in ("qcow2", "raw"):
            out["format"] = value
        elif key == "prealloc" and value in ("off", "metadata", "falloc", "full"):
            out["prealloc"] = value
        elif key in ("iops", "bps"):
            number = value.strip().lower()
            if number in ("none", "unlimited"):
                out[f"{key}_total"] = None
                continue
            try:
                out[f"{key}_total"] = parse_size(value) if key == "bps" else int(value)
            except ValueError:
                raise CliError(f"invalid {key} {value!r}: a whole number, or 'none'") from None
        elif key in ("format", "prealloc"):
            choices = "qcow2, raw" if key == "format" else "off, metadata, falloc, full"
            raise CliError(f"invalid {key} {value!r} (use {choices})")
        else:
            raise CliError(
                f"unknown disk option {item!r} (use SIZE or POOL/VOL, format=, prealloc=, pool=, iops=N, bps=N)"
            )
    return out


def parse_limit(text: str) -> int | None:
    """An integer limit, or 'none' to remove it."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    try:
        return int(text)
    except ValueError:
        raise CliError(f"invalid limit {text!r}: a whole number, or 'none'") from None


def quote(text: str) -> str:
    """Percent-encode everything but unreserved characters (urllib.parse would cost ~2 ms to import)."""
    safe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    return "".join(c if c in safe else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _vm_url(name: str, action: str = "") -> str:
    return f"/v1/vms/{quote(name)}" + (f"/{action}" if action else "")


# ----- vm ---------------------------------------------------------------------------------------
def _show_vm(vm: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(vm)
        return
    kv(
        [
            ("Name", vm["name"]),
            ("UUID", vm["uuid"]),
            ("State", vm["state"] + (f" ({vm['reason']})" if vm.get("reason") else "")),
            ("Memory", f"{vm['memory_mib']} MiB"),
            ("vCPUs", vm["vcpus"]),
            ("Image", vm.get("image")),
            ("Autostart", "on" if vm["autostart"] else "off"),
            ("PID", vm.get("pid")),
            ("Guest agent", "connected" if vm.get("agent") else "not connected"),
            ("Disks", ", ".join(f"{d['name']}: {d.get('volume') or d['path']} ({d['format']})" for d in vm["disks"])),
            ("CD-ROMs", ", ".join(f"{c['name']}: {c.get('volume') or c.get('path') or 'empty'}" for c in vm["cdroms"])),
            ("NICs", ", ".join(f"{n['kind']} {n['mac']}" for n in vm.get("nics", []))),
            ("Kernel", vm.get("kernel")),
            ("Cmdline", vm.get("cmdline")),
            ("Identity", f"uid {vm['uid']} gid {vm['gid']}" if vm.get("uid") is not None else None),
            ("Cgroup", vm.get("cgroup")),
            ("CPU time", f"{vm['cpu_time_ns'] / 1e9:.2f} s" if vm.get("cpu_time_ns") is not None else None),
            ("Memory used", f"{vm['memory_bytes'] / 2**20:.1f} MiB" if vm.get("memory_bytes") is not None else None),
            ("Limits", _limits_text(vm)),
            ("Cloud-init", _cloud_init_text(vm.get("cloud_init"))),
        ]
    )


def _cloud_init_text(ci: dict[str, Any] | None) -> str | None:
    if ci is None:
        return None
    keys = len(ci.get("ssh_keys") or [])
    return f"user {ci.get('user') or '(the image default)'}, {keys} SSH key{'' if keys == 1 else 's'}"


def _limits_text(vm: dict[str, Any]) -> str:
    parts = []
    if vm.get("cpu_weight") is not None:
        parts.append(f"cpu weight {vm['cpu_weight']}")
    if vm.get("cpu_max_percent") is not None:
        parts.append(f"cpu max {vm['cpu_max_percent']}%")
    if vm.get("memory_max_mib") is not None:
        parts.append(f"memory max {vm['memory_max_mib']} MiB")
    for i, d in enumerate(vm.get("disks", [])):
        io = [f"{k} {d[k + '_total']}" for k in ("iops", "bps") if d.get(k + "_total")]
        if io:
            parts.append(f"disk{i} " + " ".join(io))
    return ", ".join(parts) or "none"


def vm_list(c: Client, a: argparse.Namespace) -> int:
    vms = c.get("/v1/vms")
    if a.json:
        print_json(vms)
    else:
        print_table(
            ["name", "state", "vcpus", "memory", "image", "autostart"],
            [
                [v["name"], v["state"], v["vcpus"], f"{v['memory_mib']} MiB", v.get("image") or "-",
                 "on" if v["autostart"] else "off"]
                for v in vms
            ],
        )  # fmt: skip
    return 0


def vm_info(c: Client, a: argparse.Namespace) -> int:
    _show_vm(c.get(_vm_url(a.name)), a.json)
    return 0


def vm_create(c: Client, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": a.name, "autostart": a.autostart, "nic": not a.no_nic}
    if a.memory is not None:
        body["memory_mib"] = a.memory
    if a.vcpus is not None:
        body["vcpus"] = a.vcpus
    for key in ("image", "cmdline"):
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    for key in ("kernel", "initrd"):
        if getattr(a, key) is not None:
            body[key] = os.path.abspath(getattr(a, key))
    for key in ("cpu_weight", "cpu_max_percent", "memory_max_mib"):
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    if a.iso is not None:
        body["iso"] = _iso_source(c, a.iso)
    for text in a.network:
        body.setdefault("networks", []).append(_nic_opts(text))
    if a.copy:
        body["image_copy"] = True
    if a.pool is not None:
        body["pool"] = a.pool
    disks = [parse_disk_opts(d, first="size") for d in a.disk]
    for i, disk in enumerate(disks):
        if "size" not in disk and "volume" not in disk:
            # Options alone: limits of the image's own disk (the first), as `--image demo --disk iops=100`.
            if i or a.image is None or set(disk) - {"iops_total", "bps_total"}:
                raise CliError("each --disk needs a SIZE (a new volume) or POOL/VOL (an existing one), unless it "
                               "only sets iops/bps of the --image disk")  # fmt: skip
            for key in ("iops_total", "bps_total"):
                if disk.get(key) is not None:
                    body[f"disk_{key}"] = disk[key]
            continue
        new = {"size_bytes": disk["size"]} if "size" in disk else {"volume": disk["volume"]}
        new.update({k: v for k, v in disk.items() if k in ("pool", "format", "prealloc", "iops_total", "bps_total")})
        body.setdefault("disks", []).append(new)
    from vmkit.cli import cloudinit

    if cloudinit.given(a):
        body["cloud_init"] = cloudinit.request_body(a)
    vm = c.post("/v1/vms", body)
    if a.start:
        vm = c.post(_vm_url(a.name, "start"))
    return emit(a, vm, f"VM {vm['name']} created" + (" and started" if a.start else ""))


def vm_set(c: Client, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for key in ("cpu_weight", "cpu_max_percent", "memory_max_mib"):
        if getattr(a, key) is not None:
            body[key] = parse_limit(getattr(a, key))
    disks = [parse_disk_opts(d, first="name") for d in a.disk]
    if disks:
        body["disks"] = disks
    if not body:
        raise CliError("nothing to set: give --cpu-weight, --cpu-max, --memory-max or --disk")
    vm = c.request("PATCH", _vm_url(a.name), body)
    return emit(a, vm, f"VM {a.name}: limits {_limits_text(vm)}")


def _iso_source(c: Client, text: str) -> str:
    """--iso: a volume (POOL/NAME) or an install-media image's name as they are; a local file is first imported
    into pool `images` (once: a volume of the same name and size is reused), so that it has a home."""
    if not os.path.isfile(text):
        return text
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(text)).lstrip("._-")[:63] or "install.iso"
    size = os.path.getsize(text)
    try:
        have = c.get(f"/v1/pools/images/volumes/{quote(name)}")
    except ApiError as e:
        if e.status != 404:
            raise
        have = None
    if have is not None:
        if have["capacity_bytes"] != size:
            raise CliError(f"pool images already has a different {name}; import this file under another name "
                           "(vmkit volume import images/NAME FILE) and give --iso images/NAME")  # fmt: skip
        sys.stderr.write(f"using volume images/{name} (already imported)\n")
        return f"images/{name}"
    from vmkit.cli.volumes import import_file

    import_file(c, f"images/{name}", text, False)
    return f"images/{name}"


def vm_disks(c: Client, a: argparse.Namespace) -> int:
    disks = c.get(_vm_url(a.name, "disks"))
    if a.json:
        print_json(disks)
        return 0

    def live(d: dict[str, Any], key: str) -> str:
        value = (d.get("live") or {}).get(key)
        return "-" if d.get("live") is None else str(value or "unlimited")

    def limit(d: dict[str, Any], key: str) -> str:
        return "-" if d["device"] == "cdrom" else str(d.get(key) or "unlimited")

    print_table(
        ["target", "device", "source", "format", "provisioning", "backing", "iops", "bps", "live iops", "live bps"],
        [
            [d["name"], d["device"] + _disk_notes(d),
             d.get("volume") or d.get("path") or "(empty)", d.get("format") or "-", d.get("provisioning") or "-",
             d.get("backing") or "-", limit(d, "iops_total"), limit(d, "bps_total"), live(d, "iops"), live(d, "bps")]
            for d in disks
        ],
    )  # fmt: skip
    return 0


def _disk_notes(d: dict[str, Any]) -> str:
    notes = [n for n, on in (("ro", d.get("readonly")), ("cloud-init", d.get("cloud_init"))) if on]
    return f" ({', '.join(notes)})" if notes and d["device"] == "disk" else ""


def _nic_opts(text: str) -> dict[str, Any]:
    """'NET[,mac=M][,model=virtio|e1000]' → a NIC request."""
    nic: dict[str, Any] = {}
    for i, item in enumerate(text.split(",")):
        key, sep, value = item.partition("=")
        if not sep and i == 0:
            nic["network"] = item
        elif key in ("mac", "model"):
            nic[key] = value
        elif key in ("vlan", "trunk") and all(v.isdigit() for v in value.split(";")):
            if key == "vlan":
                nic["vlan"] = int(value)
            else:
                nic["trunks"] = [int(v) for v in value.split(";")]
        else:
            raise CliError(
                f"unknown NIC option {item!r} (use NET,mac=52:54:00:…,model=virtio|e1000,vlan=N or trunk=N;M)"
            )
    return nic


def vm_attach_nic(c: Client, a: argparse.Namespace) -> int:
    nics = c.post(_vm_url(a.name, "nics"), _nic_opts(a.network))
    new = nics[-1]
    return emit(a, nics, f"{new['name']} ({new['mac']}) on network {new.get('network') or 'user'} added to {a.name}")


def vm_detach_nic(c: Client, a: argparse.Namespace) -> int:
    target = a.nic
    if ":" in target:  # a MAC: find which NIC it is
        found = [n["name"] for n in c.get(_vm_url(a.name))["nics"] if n["mac"] == target.lower()]
        if not found:
            raise CliError(f"{a.name} has no NIC with MAC {target}")
        target = found[0]
    nics = c.request("DELETE", _vm_url(a.name, f"nics/{quote(target)}"))
    return emit(a, nics, f"{a.nic} removed from {a.name}")


def vm_ifaddr(c: Client, a: argparse.Namespace) -> int:
    addrs = c.get(_vm_url(a.name, "ifaddr") + f"?source={a.source}")
    if a.json:
        print_json(addrs)
        return 0
    print_table(
        ["interface", "mac", "address", "source"],
        [[x.get("interface") or "-", x.get("mac") or "-", x["address"], x["source"]] for x in addrs],
    )
    return 0


def vm_attach_disk(c: Client, a: argparse.Namespace) -> int:
    disks = c.post(_vm_url(a.name, "disks"), {"volume": a.volume, "readonly": a.readonly})
    new = next((d for d in disks if d.get("volume") == a.volume), {"name": "?"})
    return emit(a, disks, f"{a.volume} attached to {a.name} as {new['name']}")


def vm_detach_disk(c: Client, a: argparse.Namespace) -> int:
    target = a.disk
    if "/" in target:  # a volume: find which disk it is
        found = [d["name"] for d in c.get(_vm_url(a.name, "disks")) if d.get("volume") == target]
        if not found:
            raise CliError(f"{target} is not a disk of {a.name}")
        target = found[0]
    disks = c.request("DELETE", _vm_url(a.name, f"disks/{quote(target)}") + f"?timeout_s={a.timeout}")
    return emit(a, disks, f"{a.disk} detached from {a.name} (the volume is kept)")


def vm_media(c: Client, a: argparse.Namespace) -> int:
    if a.action == "insert" and not a.source:
        raise CliError("insert needs a medium: vmkit vm media insert NAME POOL/VOL|IMAGE|FILE")
    source = _iso_source(c, a.source) if a.action == "insert" else None
    disks = c.post(_vm_url(a.name, "media"), {"drive": a.drive, "source": source})
    done = f"{source} inserted into" if source else "ejected the medium of"
    return emit(a, disks, f"{done} {a.name}'s {a.drive}")


def _simple_action(action: str, done: str) -> Callable[[Client, argparse.Namespace], int]:
    def cmd(c: Client, a: argparse.Namespace) -> int:
        return emit(a, c.post(_vm_url(a.name, action)), f"VM {a.name} {done}")

    return cmd


def vm_shutdown(c: Client, a: argparse.Namespace) -> int:
    vm = c.post(_vm_url(a.name, "shutdown"), {"timeout_s": a.timeout, "force": a.force, "mode": a.mode})
    return emit(a, vm, f"VM {a.name} is {vm['state']}")


def vm_stop(c: Client, a: argparse.Namespace) -> int:
    if a.save and a.force:
        raise CliError("--save keeps the VM's state, --force discards it: choose one")
    if a.save:
        # A managed save (virsh managedsave): the next `vm start` resumes where it stopped.
        vm = c.post(_vm_url(a.name, "managed-save"))
        return emit(a, vm, f"VM {a.name} is {vm['state']}: the next start resumes it")
    if a.force:
        vm = c.post(_vm_url(a.name, "destroy"))
    else:
        vm = c.post(_vm_url(a.name, "shutdown"), {"timeout_s": a.timeout, "force": False})
    return emit(a, vm, f"VM {a.name} is {vm['state']}")


def vm_delete(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", _vm_url(a.name) + ("?keep_disks=true" if a.keep_disks else ""))
    return emit(a, {"deleted": a.name}, f"VM {a.name} deleted")


def vm_autostart(c: Client, a: argparse.Namespace) -> int:
    vm = c.request("PUT", _vm_url(a.name, "autostart"), {"enabled": a.value == "on"})
    return emit(a, vm, f"autostart of {a.name} is {a.value}")


def vm_wait(c: Client, a: argparse.Namespace) -> int:
    vm = c.get(_vm_url(a.name, "wait") + f"?state={quote(a.state)}&timeout_s={a.timeout}")
    return emit(a, vm, f"VM {a.name} is {vm['state']}" + (", guest agent connected" if vm.get("agent") else ""))


def vm_log(c: Client, a: argparse.Namespace) -> int:
    data = c.get(_vm_url(a.name, "log"), raw=True)
    if a.json:
        print_json({"name": a.name, "log": data.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def vm_exec(c: Client, a: argparse.Namespace) -> int:
    argv = a.command
    if not argv:
        raise CliError("no command given: vmkit vm exec NAME -- CMD [ARGS...]")
    body: dict[str, Any] = {"argv": argv, "timeout_s": a.timeout}
    if not sys.stdin.isatty() and a.stdin:
        body["input_b64"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    res = c.post(_vm_url(a.name, "exec"), body)
    out, err = base64.b64decode(res["stdout_b64"]), base64.b64decode(res["stderr_b64"])
    if a.json:
        print_json(
            {"exitcode": res["exitcode"], "signal": res["signal"], "stdout": out.decode(errors="replace"),
             "stderr": err.decode(errors="replace")}
        )  # fmt: skip
    else:
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        sys.stderr.buffer.write(err)
        sys.stderr.flush()
    if res["exitcode"] is None:
        return 128 + (res["signal"] or 0)
    return int(res["exitcode"])


def vm_console(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.console import attach

    return attach(c, a.name)


# ----- image, host, daemon ----------------------------------------------------------------------
def image_list(c: Client, a: argparse.Namespace) -> int:
    imgs = c.get("/v1/images")
    if a.json:
        print_json(imgs)
    else:
        print_table(
            ["name", "kind", "kernel version"],
            [[i["name"], i["kind"], i.get("kernel_version")] for i in imgs],
        )
    return 0


def wait_operation(c: Client, op: dict[str, Any], label: str, quiet: bool) -> dict[str, Any]:
    bar = None if quiet else ProgressBar(label)
    while op["status"] == "running":
        if bar:
            bar.update(op["progress"], op["message"])
        op = c.get(f"/v1/operations/{op['id']}?wait_s=0.5")
    if bar:
        bar.update(op["progress"], op["message"] if op["status"] == "success" else "failed")
        bar.done()
    if op["status"] != "success":
        raise CliError(f"{label} failed: {op['error']}")
    return op


def image_demo(c: Client, a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    res = c.post("/v1/images/demo")
    if "operation" in res and a.no_wait:
        op = res["operation"]
        return emit(a, op, f"building the demo guest: operation {op['id']} (GET /v1/operations/{op['id']})")
    if "operation" in res:
        image = wait_operation(c, res["operation"], "building demo guest", a.json)["result"]
    else:
        image = res["image"]
    took = time.monotonic() - t0
    return emit(a, image, f"image {image['name']} ready (kernel {image['kernel_version']}) in {took:.1f} s")


def events(c: Client, a: argparse.Namespace) -> int:
    """Follow the daemon's event stream (like `virsh event --all --loop`) until interrupted."""
    import json

    from websockets.exceptions import ConnectionClosed, InvalidStatus

    try:
        ws = c.websocket("/v1/events")
    except InvalidStatus as e:
        raise CliError(f"the daemon refused the event stream: {ws_refusal(e)}") from e
    except OSError as e:
        raise CliError(f"cannot reach the vmkit daemon at {c.where}: {e}") from e
    with ws, contextlib.suppress(ConnectionClosed):
        for msg in ws:
            ev = json.loads(msg)
            if a.json:
                sys.stdout.write(json.dumps(ev) + "\n")
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(ev.pop("timestamp")))
                kind = ev.pop("type")
                sys.stdout.write(f"{stamp} {kind} " + " ".join(f"{k}={v}" for k, v in ev.items()) + "\n")
            sys.stdout.flush()
    return 0


def ws_refusal(e: Any) -> str:
    """The reason in a refused websocket handshake (websockets' InvalidStatus): the daemon's {"error"}."""
    import json

    try:
        return f"{json.loads(e.response.body)['error']} (HTTP {e.response.status_code})"
    except (ValueError, KeyError, TypeError):
        return str(e)


# ----- token ------------------------------------------------------------------------------------
def token_create(c: Client, a: argparse.Namespace) -> int:
    tok = c.post("/v1/tokens", {"name": a.name, "read_only": a.read_only})
    if a.json:
        print_json(tok)
        return 0
    kind = "read-only token" if a.read_only else "token"
    sys.stderr.write(f"{kind} {a.name} created; its secret, shown this once (send as VMKIT_TOKEN):\n")
    print(tok["secret"])
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "never"


def token_list(c: Client, a: argparse.Namespace) -> int:
    toks = c.get("/v1/tokens")
    if a.json:
        print_json(toks)
    else:
        print_table(
            ["name", "read-only", "created", "last used"],
            [[t["name"], "yes" if t["read_only"] else "no", _when(t["created_at"]), _when(t["last_used_at"])]
             for t in toks],
        )  # fmt: skip
    return 0


def token_revoke(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", f"/v1/tokens/{quote(a.name)}")
    return emit(a, {"revoked": a.name}, f"token {a.name} revoked")


def host_check(c: Client, a: argparse.Namespace) -> int:
    from vmkit.host.check import host_check as check

    report = check().to_dict()
    if a.json:
        print_json(report)
        return 0
    print(f"QEMU:        {report['qemu_path'] or 'not found'} {report['qemu_version'] or ''}")
    for name, acc in report["accelerators"].items():
        word = "usable" if acc["usable"] else "present, NOT usable" if acc["present"] else "not available"
        print(f"{name + ':':<12} {word} — {acc['detail']}")
    print(f"accelerator: {report['accelerator'] or 'none'}")
    for chk in report["checks"]:
        print(f"{chk['name'] + ':':<12} {'ok' if chk['ok'] else 'MISSING'} — {chk['detail']}")
    iso = report["isolation"]
    print(f"isolation:   {'in force' if iso['in_force'] else 'NOT in force — ' + '; '.join(iso['missing'])}")
    return 0 if report["accelerator"] else 1


def daemon(c: Client, a: argparse.Namespace) -> int:
    from vmkit.daemon import main as daemon_main

    daemon_main(
        a.state_dir,
        a.run_dir,
        a.socket_path,
        a.verbose,
        a.id_range,
        listen=a.listen,
        tls=a.tls,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
    )
    return 0


# ----- ui ---------------------------------------------------------------------------------------
def ui(c: Client, a: argparse.Namespace) -> int:
    """A ready-to-use link to the web UI: the daemon's TCP listener and a one-time login code (a browser that
    opens it gets a session; the code is spent then, or after five minutes). Later logins take an API token."""
    root = c.get("/v1")
    listen = root.get("listen")
    if not listen:
        raise CliError(
            "the daemon has no TCP listener, so no browser can reach it; start it with "
            "`vmkit daemon --listen 127.0.0.1:8006` (or VMKIT_LISTEN; TLS is used off loopback)"
        )
    host = str(listen["host"])
    wildcard = host in ("0.0.0.0", "::")
    if wildcard:  # every address: this host reaches it on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    shown = f"[{host}]" if ":" in host else host
    base = f"{listen['scheme']}://{shown}:{listen['port']}/ui/"
    link = c.post("/v1/session/links")
    url = f"{base}#/login?code={link['code']}"
    fp = root.get("tls_fingerprint")
    fp_colons = ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper() if fp else None
    if a.json:
        print_json({"url": url, "base_url": base, "expires_at": link["expires_at"], "tls_fingerprint": fp_colons})
        return 0
    print(url)
    sys.stderr.write("open it within 5 minutes, once; later logins: " + base + " with an API token\n")
    if wildcard:
        import socket

        sys.stderr.write(f"from another machine: {listen['scheme']}://{socket.gethostname()}:{listen['port']}/ui/\n")
    if fp_colons:
        sys.stderr.write(f"TLS certificate SHA-256 (compare with what the browser shows): {fp_colons}\n")
    return 0


# ----- parser -----------------------------------------------------------------------------------
class _Skipped:
    """Stands in for the parser of a verb not being run: building all ~20 parsers costs ~7 ms."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_subparsers(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self

    def add_parser(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self

    def set_defaults(self, **kwargs: Any) -> None:
        pass


VERBS = {
    "vm": {"create", "set", "disks", "attach-disk", "detach-disk", "media", "ifaddr", "attach-nic", "detach-nic",
           "list", "info", "start", "reboot", "pause", "resume", "destroy", "shutdown", "stop", "delete",
           "autostart", "wait", "log", "console", "exec", "clone", "migrate", "migrate-cancel", "save", "restore",
           "saves", "managedsave-remove", "cloud-init", "ssh"},
    "image": {"list", "demo", "build"},
    "pool": {"list", "info", "create", "refresh", "delete"},
    "network": {"list", "info", "create", "start", "stop", "delete", "autostart", "leases", "forward"},
    "volume": {"list", "info", "create", "resize", "convert", "clone", "import", "export", "delete"},
    "snapshot": {"create", "list", "info", "revert", "delete"},
    "host": {"check"},
    "token": {"create", "list", "revoke"},
    "remote": {"add", "list", "info", "remove"},
    "daemon": set(),
    "events": set(),
    "ui": set(),
}  # fmt: skip


_GLOBAL_OPTS = ("--socket", "--url", "--token", "--fingerprint")  # each takes a value


def _wanted(argv: list[str]) -> tuple[str, str] | None:
    """(noun, verb) when argv names an existing command, so only its parser needs building."""
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in _GLOBAL_OPTS:
        i += 1 if "=" in argv[i] else 2
    words = [a for a in argv[i:] if not a.startswith("-")]
    if words and words[0] in VERBS and (not VERBS[words[0]] or (len(words) > 1 and words[1] in VERBS[words[0]])):
        return words[0], words[1] if VERBS[words[0]] else ""
    return None


def _limit_flags(sp: Any, kind: type) -> None:
    sp.add_argument("--cpu-weight", dest="cpu_weight", type=kind, metavar="N", help="CPU weight 1-10000 (default 100)")
    sp.add_argument(
        "--cpu-max", dest="cpu_max_percent", type=kind, metavar="PERCENT", help="CPU cap, %% of one CPU (200 = 2 CPUs)"
    )
    sp.add_argument(
        "--memory-max", dest="memory_max_mib", type=kind, metavar="MIB", help="memory cap of the whole QEMU (MiB)"
    )


def build_parser(only: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmkit", description="Manage QEMU/KVM virtual machines.")
    p.add_argument("--socket", dest="api_socket", metavar="PATH", help="daemon socket (env VMKIT_SOCKET)")
    p.add_argument("--url", metavar="URL", help="a remote daemon, https://HOST:PORT (env VMKIT_URL)")
    p.add_argument("--token", metavar="SECRET", help="API token for --url (env VMKIT_TOKEN)")
    p.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="pin the daemon's certificate instead of CA checks (env VMKIT_FINGERPRINT)",
    )
    real_nouns = p.add_subparsers(dest="noun", required=True, metavar="COMMAND")

    class _Nouns:
        def add_parser(self, name: str, **kw: Any) -> Any:
            return real_nouns.add_parser(name, **kw) if only is None or only[0] == name else _Skipped()

    nouns = _Nouns()

    def add(sub: Any, name: str, fn: Callable[..., int], help_: str, json_flag: bool = True) -> Any:
        if only is not None and only[1] != name:
            return _Skipped()
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    vm = nouns.add_parser("vm", help="virtual machines").add_subparsers(dest="verb", required=True, metavar="VERB")
    sp = add(vm, "create", vm_create, "define a new VM")
    sp.add_argument("name")
    sp.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (default 512)")
    sp.add_argument("--vcpus", type=int, metavar="N", help="virtual CPUs (default 1)")
    sp.add_argument("--image", metavar="IMAGE|POOL/VOL", help="boot from an image (demo, demo-disk) or a disk volume")
    sp.add_argument("--linked", action="store_true", help="the image's disk as a thin overlay on it (the default)")
    sp.add_argument("--copy", action="store_true", help="the image's disk as a full copy instead of an overlay")
    sp.add_argument(
        "--pool", metavar="POOL", help="where new disks go (the image's disk, --disk SIZE): default `default`"
    )
    sp.add_argument(
        "--iso", metavar="POOL/VOL|IMAGE|FILE", help="install media as a CD-ROM, booted first (a FILE is uploaded)"
    )
    sp.add_argument("--kernel", metavar="FILE", help="direct kernel boot")
    sp.add_argument("--initrd", metavar="FILE")
    sp.add_argument("--cmdline", metavar="STRING", help="kernel command line")
    sp.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="SIZE|POOL/VOL[,format=F][,prealloc=P][,pool=P][,iops=N][,bps=N]",
        help="a new disk (e.g. 10G: qcow2, thin) or an existing volume; repeatable; iops/bps limit its I/O",
    )
    sp.add_argument(
        "--network",
        action="append",
        default=[],
        metavar="NET[,mac=M][,model=virtio|e1000][,vlan=N|trunk=N;M]",
        help="a NIC on network NET (repeatable; 'user': QEMU's restricted user networking); default: 'default'",
    )
    sp.add_argument("--no-nic", action="store_true", help="no network card")
    _limit_flags(sp, int)
    sp.add_argument("--autostart", action="store_true", help="start when the host boots")
    sp.add_argument("--start", action="store_true", help="start it right away")
    from vmkit.cli import cloudinit

    cloudinit.add_flags(sp)
    sp = add(vm, "set", vm_set, "change resource limits (live when running; 'none' removes one)")
    sp.add_argument("name")
    _limit_flags(sp, str)
    sp.add_argument(
        "--disk", action="append", default=[], metavar="DISK,iops=N,bps=N", help="I/O limits of one disk (disk0, …)"
    )
    sp = add(vm, "disks", vm_disks, "list a VM's drives with their volumes and I/O limits (like domblklist)")
    sp.add_argument("name")
    sp = add(vm, "attach-nic", vm_attach_nic, "add a NIC on a network (hot-plugged while running)")
    sp.add_argument("name")
    sp.add_argument("network", metavar="NET[,mac=M][,model=virtio|e1000]")
    sp = add(vm, "detach-nic", vm_detach_nic, "remove a NIC (hot-unplugged while running)")
    sp.add_argument("name")
    sp.add_argument("nic", metavar="NIC|MAC")
    sp = add(vm, "ifaddr", vm_ifaddr, "the guest's addresses, from DHCP leases or its agent (like domifaddr)")
    sp.add_argument("name")
    sp.add_argument("--source", choices=["lease", "agent"], default="lease")
    sp = add(vm, "attach-disk", vm_attach_disk, "attach a volume (hot-plugged while running)")
    sp.add_argument("name")
    sp.add_argument("volume", metavar="POOL/VOL")
    sp.add_argument("--readonly", action="store_true")
    sp = add(vm, "detach-disk", vm_detach_disk, "detach a disk (hot-unplugged while running); the volume stays")
    sp.add_argument("name")
    sp.add_argument("disk", metavar="DISK|POOL/VOL")
    sp.add_argument("--timeout", type=float, default=30.0, metavar="S", help="how long the guest may take to let go")
    sp = add(vm, "media", vm_media, "eject or insert a CD-ROM medium (also while running)")
    sp.add_argument("action", choices=["eject", "insert"])
    sp.add_argument("name")
    sp.add_argument("source", nargs="?", metavar="POOL/VOL|IMAGE|FILE")
    sp.add_argument("--drive", default="cd0", metavar="CD", help="the CD-ROM drive (default cd0)")
    sp = add(vm, "list", vm_list, "list VMs")
    for verb, fn, help_ in (
        ("info", vm_info, "show one VM"),
        ("start", _simple_action("start", "started"), "start a VM"),
        ("reboot", _simple_action("reboot", "is rebooting"), "reboot a VM (ACPI)"),
        ("pause", _simple_action("pause", "paused"), "pause a VM's vCPUs"),
        ("resume", _simple_action("resume", "resumed"), "resume a paused VM"),
        ("destroy", _simple_action("destroy", "destroyed"), "hard stop (same as stop --force)"),
    ):
        add(vm, verb, fn, help_).add_argument("name")
    sp = add(vm, "shutdown", vm_shutdown, "power off through ACPI (then the guest agent if ACPI is ignored) and wait")
    sp.add_argument("name")
    sp.add_argument(
        "--mode", choices=("auto", "acpi", "agent"), default="auto",
        help="acpi, agent, or auto: ACPI, then the guest agent after 10 s (default)",
    )  # fmt: skip
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)")
    sp.add_argument("--force", action="store_true", help="stop hard if the guest does not power off in time")
    sp = add(vm, "stop", vm_stop, "stop a VM: clean ACPI shutdown, or hard stop with --force")
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true", help="hard stop at once (pull the plug)")
    sp.add_argument("--save", action="store_true", help="keep its RAM state (managed save): the next start resumes")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S")
    sp = add(vm, "delete", vm_delete, "delete a stopped VM and its disks")
    sp.add_argument("name")
    sp.add_argument("--keep-disks", action="store_true", help="keep disk files (moved to STATE/kept-disks)")
    sp = add(vm, "autostart", vm_autostart, "start the VM when the host boots")
    sp.add_argument("name")
    sp.add_argument("value", choices=["on", "off"])
    sp = add(vm, "wait", vm_wait, "wait for a state word, or 'agent' for the guest agent")
    sp.add_argument("name")
    sp.add_argument("--for", dest="state", default="running", metavar="STATE")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S")
    sp = add(vm, "log", vm_log, "print the serial console output so far")
    sp.add_argument("name")
    sp = add(vm, "console", vm_console, "attach to the serial console (Ctrl-] leaves)", json_flag=False)
    sp.add_argument("name")
    sp = add(vm, "exec", vm_exec, "run a command in the guest through its agent")
    sp.add_argument("name")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S")
    sp.add_argument("--stdin", action="store_true", help="send standard input to the command")
    sp.add_argument("command", nargs="*", metavar="-- CMD [ARGS...]")
    from vmkit.cli import vmsave

    vmsave.add_parsers(vm, add)

    image = nouns.add_parser("image", help="images VMs boot from").add_subparsers(dest="verb", required=True)
    add(image, "list", image_list, "list images")
    sp = add(image, "demo", image_demo, "build (or reuse) the demo guest from Debian packages")
    sp.add_argument("--no-wait", action="store_true", help="return the operation at once instead of waiting")
    from vmkit.cli import images

    images.add_parsers(image, add)

    from vmkit.cli import clones, migrations, networks, pools, remotes, snapshots, ssh, volumes

    clones.add_parsers(vm, add)
    cloudinit.add_parsers(vm, add)
    migrations.add_parsers(vm, add)
    ssh.add_parsers(vm, add)

    pools.add_parsers(nouns, add)
    volumes.add_parsers(nouns, add)
    networks.add_parsers(nouns, add)
    snapshots.add_parsers(nouns, add)
    remotes.add_parsers(nouns, add)

    sp = nouns.add_parser("events", help="follow VM state changes and operations as they happen")
    sp.set_defaults(fn=events)
    sp.add_argument("--json", action="store_true", help="one JSON object per line")

    token = nouns.add_parser("token", help="API tokens for remote access").add_subparsers(dest="verb", required=True)
    sp = add(token, "create", token_create, "create a token and print its secret (once)")
    sp.add_argument("name")
    sp.add_argument("--read-only", action="store_true", help="GET requests and the event stream only")
    add(token, "list", token_list, "list tokens (never their secrets)")
    add(token, "revoke", token_revoke, "revoke a token at once").add_argument("name")

    host = nouns.add_parser("host", help="this host").add_subparsers(dest="verb", required=True)
    add(host, "check", host_check, "check virtualization support (like virt-host-validate)")

    sp = nouns.add_parser("ui", help="print a one-time login link to the web UI")
    sp.set_defaults(fn=ui)
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = nouns.add_parser("daemon", help="run the vmkit daemon in the foreground")
    sp.set_defaults(fn=daemon)
    sp.add_argument("--state-dir", help="default /var/lib/vmkit (env VMKIT_STATE_DIR)")
    sp.add_argument("--run-dir", help="default /run/vmkit (env VMKIT_RUN_DIR)")
    sp.add_argument("--socket", dest="socket_path", help="default RUN_DIR/vmkit.sock (env VMKIT_SOCKET)")
    sp.add_argument(
        "--id-range",
        metavar="FIRST-LAST",
        help="uids/gids for VMs' QEMUs, one per VM (default 1900000000-1900065535; env VMKIT_ID_RANGE)",
    )
    sp.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also serve the API on TCP, a token required (env VMKIT_LISTEN); TLS unless on loopback",
    )
    sp.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TLS on the TCP listener (always on off loopback; env VMKIT_TLS=1)",
    )
    sp.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (env VMKIT_TLS_CERT); default: self-signed")
    sp.add_argument("--tls-key", metavar="FILE", help="PEM key (env VMKIT_TLS_KEY)")
    sp.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after the first "--" is the guest command of `vm exec`, options included.
    rest: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    args = build_parser(_wanted(argv)).parse_args(argv)
    if rest is not None:
        if getattr(args, "command", None) is None:
            sys.stderr.write("vmkit: error: '--' is only used by `vm exec`\n")
            return 2
        args.command = [*args.command, *rest]
    # --url, else --socket, else VMKIT_URL, else the local socket.
    url = args.url or (None if args.api_socket else os.environ.get("VMKIT_URL") or None)
    client = Client(
        args.api_socket,
        url=url,
        token=args.token or os.environ.get("VMKIT_TOKEN") or None,
        fingerprint=args.fingerprint or os.environ.get("VMKIT_FINGERPRINT") or None,
    )
    try:
        return int(args.fn(client, args))
    except ApiError as e:
        sys.stderr.write(f"vmkit: error: {e.message}\n")
        return 1
    except CliError as e:
        sys.stderr.write(f"vmkit: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
