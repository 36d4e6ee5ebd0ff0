"""Snapshots of a running VM's disks over QMP: internal snapshots (snapshot-save/-delete jobs), external ones
(new overlays put on every disk in one transaction), and merging an image into the one above it (block-stream).

Like the hotplug code, this module is handed descriptors the daemon opened: QEMU opens no path of vmkit's.
Node names follow argv.py and hotplug.py: a disk's nodes all start with its name (disk0, disk0-b1, …); an
overlay a live snapshot adds is `{disk}-oN` (N one more than any before it), and becomes the disk's top.

Which image a node reads is asked of QEMU, not remembered: a format node's file is /dev/fdset/N, and the
descriptors of fdset N are QEMU's own (/proc/PID/fd/M names the real file). So the mapping survives a daemon
restart, and after a merge the nodes of the image merged away are found and dropped by its path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.qemu.argv import device_id, overlay_blockdevs
from vmkit.qemu.hotplug import _delete_nodes, _undo
from vmkit.qemu.monitor import JobFailed, Monitor

log = logging.getLogger(__name__)

SNAPSHOT_JOB_TIMEOUT_S = 3600.0  # saving RAM runs at disk speed; a big guest on a slow disk takes long
STREAM_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class Node:
    name: str  # the format node
    path: str  # the real file it reads
    fdset: int | None  # the fdset its file node opened
    read_only: bool
    pid: int  # the QEMU's


async def nodes(mon: Monitor, pid: int) -> list[Node]:
    """Every format node of the VM with the real path of its image (CD-ROM media included)."""
    fdsets = {int(s["fdset-id"]): s.get("fds") or [] for s in await mon.query_fdsets()}
    named = await mon.query_named_block_nodes()
    # A format node's own `file` reads json:{…} once its backing is not the header's: its file node (always
    # `{name}-file`, see argv.py) names the fdset plainly.
    files = {str(n["node-name"]): str(n.get("file", "")) for n in named if n.get("drv") == "file"}
    out = []
    for n in named:
        if n.get("drv") == "file":
            continue
        m = re.fullmatch(r"/dev/fdset/(\d+)", files.get(f"{n['node-name']}-file", ""))
        fdset = int(m.group(1)) if m else None
        fds = fdsets.get(fdset, []) if fdset is not None else []
        path = ""
        for f in fds:
            with contextlib.suppress(OSError):
                path = os.readlink(f"/proc/{pid}/fd/{int(f['fd'])}").removesuffix(" (deleted)")
                break
        out.append(Node(str(n["node-name"]), path, fdset, bool(n.get("ro")), pid))
    return out


def node_of(all_nodes: Iterable[Node], path: str | os.PathLike[str]) -> Node | None:
    real = os.path.realpath(path)
    return next((n for n in all_nodes if n.path == real), None)


async def top_nodes(mon: Monitor, disks: Iterable[str]) -> dict[str, str]:
    """The node each disk's device writes to now (its name, or its newest snapshot overlay)."""
    want = {device_id(d): d for d in disks}
    out = {}
    for b in await mon.query_block():
        # A virtio disk's backend is a child of its device: /machine/peripheral/disk0-dev/virtio-backend.
        qdev = str(b.get("qdev", ""))
        dev = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev
        if dev in want and b.get("inserted"):
            out[want[dev]] = str(b["inserted"]["node-name"])
    missing = [d for d in want.values() if d not in out]
    if missing:
        raise LookupError(f"QEMU has no disk {', '.join(missing)}")
    return out


async def top_node(mon: Monitor, disk: str) -> str:
    return (await top_nodes(mon, [disk]))[disk]


def _next_overlay(disk: str, names: Iterable[str]) -> str:
    """The name of a disk's next overlay: one more than the newest, which is its top (an older one that was
    merged away or dropped left no node behind)."""
    gens = [int(m.group(1)) for n in names if (m := re.fullmatch(re.escape(disk) + r"-o(\d+)", n))]
    return f"{disk}-o{max(gens, default=0) + 1}"


async def save_internal(mon: Monitor, tag: str, tops: Sequence[str], *, job_id: str) -> None:
    """Internal snapshot `tag` of the nodes `tops` with the RAM and device state in the first (QEMU stops the
    guest's CPUs while it saves and resumes them after, if they ran)."""
    args = {"job-id": job_id, "tag": tag, "vmstate": tops[0], "devices": list(tops)}
    await mon.run_job("snapshot-save", args, timeout_s=SNAPSHOT_JOB_TIMEOUT_S)


async def delete_internal(mon: Monitor, tag: str, tops: Sequence[str], *, job_id: str) -> None:
    args = {"job-id": job_id, "tag": tag, "devices": list(tops)}
    await mon.run_job("snapshot-delete", args, timeout_s=SNAPSHOT_JOB_TIMEOUT_S)


async def reopen(mon: Monitor, node: Node, backing: str | None, *, read_only: bool) -> None:
    """Reopen a qcow2 node (and its file node) read-write or read-only again. QEMU's jobs never make writable a
    node that was opened read-only (the images below a disk at start): it takes an explicit blockdev-reopen,
    which must name the node's backing node.

    QEMU reopens the file through its fdset, picking a descriptor of the new access mode: one is added first.
    The descriptors of the old mode are removed after: image locks belong to the open file, and one kept open
    in the fdset would keep the locks QEMU took through it, refusing the permissions the node needs next."""
    if node.fdset is None:
        raise LookupError(f"node {node.name} reads no fdset")
    want = os.O_RDONLY if read_only else os.O_RDWR
    held = await _fdset_modes(mon, node)
    if want not in held.values():
        fd = os.open(node.path, want | os.O_CLOEXEC)
        try:
            await mon.add_fd(fd, opaque=node.name, fdset_id=node.fdset)
        finally:
            os.close(fd)
    file = {"driver": "file", "node-name": f"{node.name}-file", "filename": f"/dev/fdset/{node.fdset}",
            "read-only": read_only, "cache": {"direct": False}}  # fmt: skip
    fmt = {"driver": "qcow2", "node-name": node.name, "file": f"{node.name}-file", "read-only": read_only,
           "backing": backing}  # fmt: skip
    # A file node goes read-write before its format node, and read-only after it.
    await mon.execute("blockdev-reopen", {"options": [fmt, file] if read_only else [file, fmt]})
    for fd, mode in held.items():
        if mode != want:
            await mon.execute("remove-fd", {"fdset-id": node.fdset, "fd": fd})


async def _fdset_modes(mon: Monitor, node: Node) -> dict[int, int]:
    """QEMU's descriptors in node's fdset and their access modes (O_RDONLY, O_RDWR), from /proc."""
    out = {}
    for s in await mon.query_fdsets():
        if int(s["fdset-id"]) != node.fdset:
            continue
        for f in s.get("fds") or []:
            fd = int(f["fd"])
            with contextlib.suppress(OSError, ValueError):
                info = Path(f"/proc/{node.pid}/fdinfo/{fd}").read_text()
                flags = next(line.split()[1] for line in info.splitlines() if line.startswith("flags:"))
                out[fd] = int(flags, 8) & os.O_ACCMODE
    return out


async def delete_internal_below(mon: Monitor, node: Node, backing: str | None, tag: str, *, job_id: str) -> None:
    """Delete internal snapshot `tag` of an image QEMU reads as a backing file (read-only): reopened read-write
    for the deletion and read-only again after. `backing` is its backing node's name."""
    await reopen(mon, node, backing, read_only=False)
    try:
        await delete_internal(mon, tag, [node.name], job_id=job_id)
    finally:
        await reopen(mon, node, backing, read_only=True)


async def take_external(mon: Monitor, overlays: Sequence[tuple[str, int]]) -> list[str]:
    """Put a new overlay on each disk, all in one transaction: (disk, read-write descriptor of its new, empty
    qcow2 whose header names the disk's current image as backing). Returns the new top nodes. On any failure
    QEMU is left as it was (the nodes and fdsets added are removed)."""
    # Two queries whatever the number of disks: the answers grow with every image of every chain.
    tops = await top_nodes(mon, [disk for disk, _ in overlays])
    fdsets: list[int] = []
    added: list[str] = []
    actions: list[dict[str, Any]] = []
    try:
        for disk, fd in overlays:
            top = tops[disk]
            node = _next_overlay(disk, [top])
            fdsets.append(await mon.add_fd(fd, opaque=node))
            for args in overlay_blockdevs(node, f"/dev/fdset/{fdsets[-1]}"):
                await mon.blockdev_add(args)
                added.append(args["node-name"])
            actions.append({"type": "blockdev-snapshot", "data": {"node": top, "overlay": node}})
        await mon.transaction(actions)
    except BaseException:
        await _undo(mon, added, fdsets)
        raise
    return [a["data"]["overlay"] for a in actions]


async def stream(
    mon: Monitor, child_node: Node, below: str, base: str | None, base_path: str | None, *, job_id: str
) -> None:
    """Merge node `below` (and whatever lies between it and `base`; base None: the whole chain) into
    `child_node` (as nodes() found it), which then reads `base` directly; its header names base_path (the real
    file, never /dev/fdset/N). A read-only child (an image below the top) is reopened read-write for it, and
    read-only again after."""
    args: dict[str, object] = {"job-id": job_id, "device": child_node.name}
    if base is not None:
        # QEMU writes the base node's driver as the backing format, and this name as its file.
        args |= {"base-node": base, "backing-file": base_path}
    if not child_node.read_only:
        await mon.run_job("block-stream", args, timeout_s=STREAM_TIMEOUT_S)
        return
    await reopen(mon, child_node, below, read_only=False)
    try:
        await mon.run_job("block-stream", args, timeout_s=STREAM_TIMEOUT_S)
    except JobFailed:
        await reopen(mon, child_node, below, read_only=True)  # it still stands on `below`
        raise
    await reopen(mon, child_node, base, read_only=True)


async def commit_back(mon: Monitor, disk: str, base: str, *, job_id: str) -> None:
    """Merge the overlay disk runs on now into node `base` below it and make `base` the active layer again
    (undoing a temporary snapshot); the overlay's nodes are then unused (drop_image)."""
    top = await top_node(mon, disk)
    args = {"job-id": job_id, "device": top, "base-node": base}
    await mon.run_active_commit(args, timeout_s=STREAM_TIMEOUT_S)


async def drop_image(mon: Monitor, pid: int, path: str) -> None:
    """Remove the nodes and fdsets that read the image at path, which nothing in QEMU uses any more (a merge
    took it out of the chain)."""
    gone = [n for n in await nodes(mon, pid) if n.path == os.path.realpath(path)]
    for n in gone:
        await _delete_nodes(mon, [n.name, f"{n.name}-file"], n.name)
        if n.fdset is not None:
            with contextlib.suppress(Exception):
                await mon.remove_fd(n.fdset)
