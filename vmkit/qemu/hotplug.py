"""Changing a running VM's storage over QMP: attaching and detaching disks, changing CD-ROM media.

This module talks only to a Monitor and is handed descriptors already opened by the caller (see
qemu.handover.open_disk / open_medium): like at start, QEMU opens no path of vmkit's. The nodes it adds are
the ones the argv builder would have given the disk at start (same option dicts: argv.disk_blockdevs), so a
VM looks the same to QEMU whether a disk was there at start or hot-plugged.

Names (see argv.py): a disk's format node is its name (disk3), its file node `disk3-file`, its backing
images `disk3-b1`, `disk3-b1-file`, …; its device `disk3-dev`, on a PCIe root port of its own. Every fdset
is labelled (opaque) with the node that opens it, which is how the ones of a disk or a medium are found and
dropped again. A medium put in a CD-ROM drive while the VM runs gets a generation suffix (cd0-g1, cd0-g2, …):
the old medium's nodes are gone by then, but a fresh name never meets a stale one.

Failures leave QEMU as it was: whatever an attach added is removed again before the error is raised.

Measured with QEMU 7.2 (q35, TCG) and the demo guest: q35 hot-plugs devices on root ports through ACPI (the
guest's acpiphp), not native PCIe hotplug, so there is no 5 s attention-button wait: a new disk shows in the
guest ~0.1 s after attach_disk, and an unplug completes (DEVICE_DELETED) ~0.1 s after device_del. A paused
guest acknowledges nothing until it runs again; a request made before the guest has booted is lost, and
repeating it later (detach_disk again) works, since QEMU accepts device_del again while one is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable

from qemu.qmp import ExecuteError

from vmkit.errors import Conflict, Timeout
from vmkit.model.vm import DiskSpec, NicSpec
from vmkit.qemu.argv import DiskFds, cdrom_blockdevs, device_id, disk_blockdevs, disk_device, nic_device
from vmkit.qemu.monitor import EV_DEVICE_DELETED, Monitor

log = logging.getLogger(__name__)

DETACH_TIMEOUT_S = 30.0
PERIPHERALS = "/machine/peripheral"
ROOT_PORT = "pcie-root-port"
# blockdev-del can find a node still held for a moment after DEVICE_DELETED (the device's last reference
# goes when it is finalized): retry a few times before calling it an error.
_DEL_RETRIES = 20
_DEL_RETRY_S = 0.05


class HotplugError(Conflict):
    """QEMU's storage cannot be changed as asked (no free port, no such drive, …)."""


class UnplugTimeout(Timeout):
    """The guest did not let go of a disk in time; QEMU still has it attached (the request stays pending)."""


def _owned_by(name: str, node: str) -> bool:
    """Whether block node or fdset label `name` belongs to disk/drive `node` (disk1 owns disk1-b2-file, not
    disk10)."""
    return name == node or name.startswith(node + "-")


def _fdset(fdset_id: int) -> str:
    return f"/dev/fdset/{fdset_id}"


# ----- NICs -----------------------------------------------------------------------------------------------
async def attach_nic(mon: Monitor, nic: NicSpec, tap: int) -> str:
    """Hot-plug `nic` with the tap open as `tap` (the caller opened it on its network's bridge) onto a free
    root port, whose id it returns. Whatever was added is removed again on failure."""
    fdname = f"{nic.name}-tap"
    added_netdev = False
    try:
        port = await free_port(mon)
        await mon.getfd(tap, fdname)
        await mon.netdev_add({"type": "tap", "id": nic.name, "fd": fdname, "vhost": False})
        added_netdev = True
        await mon.device_add(nic_device(nic, port))
    except BaseException:
        with contextlib.suppress(Exception):
            if added_netdev:
                await mon.netdev_del(nic.name)
            else:
                await mon.closefd(fdname)
        raise
    log.info("attached %s on %s", nic.name, port)
    return port


async def detach_nic(mon: Monitor, name: str, *, timeout_s: float = DETACH_TIMEOUT_S) -> None:
    """Hot-unplug NIC `name`: the guest acknowledges (DEVICE_DELETED), then its netdev goes, and with it the tap
    (QEMU held the last descriptor). UnplugTimeout as for disks."""
    await _unplug(mon, name, timeout_s)  # False (already gone) is fine: only the netdev is left to drop
    with contextlib.suppress(ExecuteError):  # already gone with an earlier, late acknowledgement
        await mon.netdev_del(name)
    log.info("detached %s", name)


async def _unplug(mon: Monitor, name: str, timeout_s: float) -> bool:
    """device_del the device of disk or NIC `name` and wait for the guest to let go of it. False when the device
    was already gone (a guest that acknowledged an earlier request late); UnplugTimeout when the guest does not
    answer within timeout_s: the device then stays, its removal pending."""
    dev = device_id(name)
    with mon.expect_event(EV_DEVICE_DELETED, lambda d: d.get("device") == dev) as deleted:
        try:
            await mon.device_del(dev)
        except ExecuteError as e:
            if e.error_class != "DeviceNotFound":
                raise
            return False
        try:
            await deleted.wait(timeout_s)
        except TimeoutError as e:
            raise UnplugTimeout(
                f"the guest did not release {name} within {timeout_s:g} s (is it paused, still booting, or without "
                "PCI hotplug support?); it stays attached and its removal pending: the guest may still let it go, "
                "or detach it again"
            ) from e
    return True


# ----- disks ----------------------------------------------------------------------------------------------
async def attach_disk(mon: Monitor, disk: DiskSpec, fds: DiskFds) -> str:
    """Hot-plug `disk` (descriptors `fds`, as handover.open_disk gives them) onto a free root port, whose id it
    returns.

    The guest sees the new virtio disk at once (PCIe native hotplug). Raises HotplugError when no root port is
    free, QMP's ExecuteError when QEMU refuses a step (a node name in use, …); either way, whatever was added is
    removed again first."""
    node = disk.name
    fdsets: list[int] = []
    nodes: list[str] = []
    try:
        port = await free_port(mon)
        # Bottom of the chain first, as at start; each fdset labelled with the node that opens it.
        backing: list[tuple[str, str]] = []
        for j, (fd, fmt) in reversed(list(enumerate(fds.backing, start=1))):
            fdsets.append(await mon.add_fd(fd, opaque=f"{node}-b{j}"))
            backing.insert(0, (_fdset(fdsets[-1]), fmt))
        if fds.fd is not None:
            fdsets.append(await mon.add_fd(fds.fd, opaque=node))
        for args in disk_blockdevs(disk, disk.path if fds.fd is None else _fdset(fdsets[-1]), backing):
            await mon.blockdev_add(args)
            nodes.append(args["node-name"])
        await mon.device_add(disk_device(node, port))
    except BaseException:
        await _undo(mon, nodes, fdsets)
        raise
    log.info("attached %s on %s", node, port)
    return port


async def detach_disk(mon: Monitor, node: str, *, timeout_s: float = DETACH_TIMEOUT_S) -> None:
    """Hot-unplug disk `node`: ask for its device's removal, wait until the guest has let go of it
    (DEVICE_DELETED), then drop its block nodes and fdsets.

    Raises UnplugTimeout when the guest does not acknowledge within timeout_s (a paused guest, one still
    booting, one without PCI hotplug support): the disk stays attached as QEMU has it and the
    request stays pending, so the guest may still release it later; the caller should then call release_disk
    (on DEVICE_DELETED for `{node}-dev`), or call detach_disk again, which finishes the job once the device is
    gone. Raises HotplugError when the VM has no such disk."""
    # Already gone (a guest that acknowledged an earlier request late): only the clean-up is left.
    if not await _unplug(mon, node, timeout_s):
        if not await release_disk(mon, node):
            raise HotplugError(f"no disk {node} is attached")
        return
    await release_disk(mon, node)
    log.info("detached %s", node)


async def release_disk(mon: Monitor, node: str) -> bool:
    """Drop the block nodes and fdsets of `node` once its device is gone; whether there was anything."""
    nodes = [n["node-name"] for n in await mon.query_named_block_nodes() if _owned_by(n.get("node-name", ""), node)]
    await _delete_nodes(mon, nodes, node)
    removed = await _remove_fdsets(mon, node)
    return bool(nodes or removed)


async def free_port(mon: Monitor) -> str:
    """The id of an empty PCIe root port: a spare one (hp0, hp1, …) first, else one a detached disk left.

    Occupancy comes from QOM (each device's parent bus), not from query-pci, which lists a port's devices only
    once the guest's firmware has numbered its bus. A device whose unplug is pending still holds its port."""
    peripherals = await mon.qom_list(PERIPHERALS)
    ports = [p["name"] for p in peripherals if p.get("type") == f"child<{ROOT_PORT}>"]
    used = set()
    for p in peripherals:
        ptype = str(p.get("type", ""))
        if ptype.startswith("child<") and ptype != f"child<{ROOT_PORT}>":
            bus = await mon.qom_get(f"{PERIPHERALS}/{p['name']}", "parent_bus")
            # A root port's bus is its child named as the port: /machine/peripheral/hp0/hp0.
            parts = str(bus).split("/")
            if len(parts) >= 4 and parts[:3] == ["", "machine", "peripheral"]:
                used.add(parts[3])
    free = [p for p in ports if p not in used]
    if not free:
        raise HotplugError(
            f"no free PCIe root port for another disk (all {len(ports)} are taken); stop and start the VM to "
            "attach it, which also brings new spare ports"
        )
    return min(free, key=_port_order)


def _port_order(port: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"hp(\d+)", port)
    return (0, int(m.group(1)), "") if m else (1, 0, port)


# ----- CD-ROM media ---------------------------------------------------------------------------------------
async def change_medium(mon: Monitor, drive: str, fd: int | None) -> None:
    """Eject the medium of CD-ROM `drive` (cd0, …), even one the guest has locked, and insert the image open
    as `fd` (read-only), or leave the tray empty with fd None. Works on an empty tray too. The tray ends closed.
    Raises HotplugError when the VM has no such drive; a failed insert leaves the drive empty."""
    dev = device_id(drive)
    block = next((b for b in await mon.query_block() if b.get("qdev") == dev), None)
    if block is None:
        raise HotplugError(f"the VM has no CD-ROM drive {drive}")
    old = (block.get("inserted") or {}).get("node-name")
    await mon.blockdev_open_tray(dev, force=True)
    await mon.blockdev_remove_medium(dev)
    await release_disk(mon, drive)  # the old medium's nodes and fdsets, and any a failed change left
    if fd is not None:
        node = f"{drive}-g{_generation(drive, old) + 1}"
        fdsets: list[int] = []
        nodes: list[str] = []
        try:
            fdsets.append(await mon.add_fd(fd, opaque=node))
            for args in cdrom_blockdevs(node, _fdset(fdsets[-1])):
                await mon.blockdev_add(args)
                nodes.append(args["node-name"])
            await mon.blockdev_insert_medium(dev, node)
        except BaseException:
            await _undo(mon, nodes, fdsets)
            with contextlib.suppress(Exception):
                await mon.blockdev_close_tray(dev)
            raise
    await mon.blockdev_close_tray(dev)
    log.info("%s: medium %s", drive, "changed" if fd is not None else "ejected")


def _generation(drive: str, node: str | None) -> int:
    """cd0 → 0, cd0-g3 → 3; an empty drive → 0."""
    m = re.fullmatch(re.escape(drive) + r"-g(\d+)", node or "")
    return int(m.group(1)) if m else 0


# ----- shared -----------------------------------------------------------------------------------------------
def _deletion_order(name: str, node: str) -> tuple[int, int, str]:
    """Users before what they use: the format node before its file node, an image before its backing, and a
    snapshot's overlay (-oN, qemu/blocksnap.py; newer ones higher) before the image it was put on."""
    rest = name[len(node) :]
    m = re.fullmatch(r"(?:-([bo])(\d+))?(-file)?", rest)
    if m is None:
        return (1_000_000, 0, name)
    depth = int(m.group(2) or 0) * (-1 if m.group(1) == "o" else 1)
    return (depth, 1 if m.group(3) else 0, name)


async def _delete_nodes(mon: Monitor, nodes: Iterable[str], owner: str) -> None:
    """blockdev-del each node, users first; a node still in use is retried after the others and, for a
    moment, after a short wait (QEMU drops a removed device's hold on its node when it finalizes it)."""
    pending = sorted(nodes, key=lambda n: _deletion_order(n, owner))
    tries = 0
    while pending:
        failed: list[tuple[str, ExecuteError]] = []
        for n in pending:
            try:
                await mon.blockdev_del(n)
            except ExecuteError as e:
                failed.append((n, e))
        if len(failed) == len(pending):
            tries += 1
            if tries >= _DEL_RETRIES:
                raise failed[0][1]
            await asyncio.sleep(_DEL_RETRY_S)
        pending = [n for n, _ in failed]


async def _remove_fdsets(mon: Monitor, owner: str) -> list[int]:
    removed = []
    for fdset in await mon.query_fdsets():
        if any(_owned_by(str(f.get("opaque", "")), owner) for f in fdset.get("fds", [])):
            await mon.remove_fd(int(fdset["fdset-id"]))
            removed.append(int(fdset["fdset-id"]))
    return removed


async def _undo(mon: Monitor, nodes: list[str], fdsets: list[int]) -> None:
    """Remove what a failed step added, newest first; errors here are logged, the original one is raised."""
    for n in reversed(nodes):
        try:
            await mon.blockdev_del(n)
        except Exception as e:
            log.warning("undo: blockdev-del %s failed: %s", n, e)
    for fdset_id in fdsets:
        try:
            await mon.remove_fd(fdset_id)
        except Exception as e:
            log.warning("undo: remove-fd %s failed: %s", fdset_id, e)
