"""Hot-plug sequencing (vmkit/qemu/hotplug.py) against the fake QEMU, spawned directly from vmkit's argv:
no daemon involved. Real QEMU is exercised by the e2e tests and was checked by hand (see the module doc)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from vmkit.errors import InvalidInput
from vmkit.model.vm import CdromSpec, DiskLimits, DiskSpec, SetVm, VmSpec
from vmkit.qemu import hotplug
from vmkit.qemu.argv import SPARE_PORTS, HostConfig, RuntimePaths, qemu_argv
from vmkit.qemu.handover import open_disk, open_handover, open_medium
from vmkit.qemu.monitor import EV_DEVICE_TRAY_MOVED, Monitor
from vmkit.services import limits

FAKE = Path(__file__).resolve().parent.parent / "fakes" / "fake_qemu.py"
HOST = HostConfig(qemu_binary="qemu-system-x86_64", accelerator="tcg")


def _img(path: Path, fmt: str = "qcow2", backing: Path | None = None, bfmt: str = "raw") -> str:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(backing), "-F", bfmt]
    subprocess.run([*argv, str(path), "1M"], check=True)
    return str(path)


class Vm:
    def __init__(self, mon: Monitor, tmp: Path) -> None:
        self.mon = mon
        self.tmp = tmp
        self.stack = contextlib.ExitStack()

    def disk(self, name: str, *, backing: bool = False, readonly: bool = False) -> DiskSpec:
        base = _img(self.tmp / f"{name}-base.raw", "raw") if backing else None
        path = _img(self.tmp / f"{name}.qcow2", backing=Path(base) if base else None)
        return DiskSpec(name=name, path=path, format="qcow2", readonly=readonly)

    async def attach(self, disk: DiskSpec) -> None:
        await hotplug.attach_disk(self.mon, disk, open_disk(self.stack, disk, os.getuid(), os.getgid()))

    async def nodes(self) -> list[str]:
        return sorted(n["node-name"] for n in await self.mon.query_named_block_nodes())

    async def fdsets(self) -> list[str]:
        return sorted(f.get("opaque", "") for s in await self.mon.query_fdsets() for f in s["fds"])

    async def ports(self) -> dict[str, list[str]]:
        """Each root port and the devices query-pci shows behind it."""
        return {
            d["qdev_id"]: [b["qdev_id"] for b in d["pci_bridge"]["devices"]]
            for bus in await self.mon.query_pci()
            for d in bus["devices"]
            if "pci_bridge" in d
        }


@contextlib.contextmanager
def _fake_vm(tmp_path: Path, spec: VmSpec, env: dict[str, str]) -> Iterator[Callable[[], Awaitable[Vm]]]:
    paths = RuntimePaths(tmp_path / "run", tmp_path / "vm")
    paths.run_dir.mkdir()
    paths.vm_dir.mkdir()
    with open_handover(spec, paths, os.getuid(), os.getgid()) as fds:
        argv = qemu_argv(spec, paths, HOST, fds)
        proc = subprocess.Popen([sys.executable, str(FAKE), *argv[1:]], pass_fds=fds.all(), env={**os.environ, **env})
    try:

        async def connect() -> Vm:
            mon = Monitor(spec.name)
            await mon.connect(paths.qmp_sock, lambda name, data: None)
            return Vm(mon, tmp_path)

        yield connect
    finally:
        proc.kill()
        proc.wait()


def run(tmp_path: Path, test: Callable[[Vm], Awaitable[None]], *, spec: VmSpec | None = None, **env: str) -> None:
    spec = spec or VmSpec(
        name="t",
        uuid="00000000-0000-4000-8000-000000000001",
        memory_mib=64,
        vcpus=1,
        disks=[DiskSpec(name="disk0", path=_img(tmp_path / "disk0.qcow2"), format="qcow2")],
        cdroms=[CdromSpec(name="cd0")],
    )

    async def main(connect: Callable[[], Awaitable[Vm]]) -> None:
        vm = await connect()
        try:
            await test(vm)
        finally:
            vm.stack.close()
            await vm.mon.close()

    with _fake_vm(tmp_path, spec, env) as connect:
        asyncio.run(main(connect))


def test_attach_and_detach_a_disk_with_a_backing_chain(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        before_nodes, before_fdsets = await vm.nodes(), await vm.fdsets()
        await vm.attach(vm.disk("disk1", backing=True))
        assert set(await vm.nodes()) - set(before_nodes) == {"disk1", "disk1-file", "disk1-b1", "disk1-b1-file"}
        assert set(await vm.fdsets()) - set(before_fdsets) == {"disk1", "disk1-b1"}
        ports = await vm.ports()
        assert ports["hp0"] == ["disk1-dev"] and ports["disk0-port"] == ["disk0-dev"]
        nodes = {n["node-name"]: n for n in await vm.mon.query_named_block_nodes()}
        assert nodes["disk1-b1"]["ro"] and nodes["disk1-b1"]["drv"] == "raw" and not nodes["disk1"]["ro"]

        await hotplug.detach_disk(vm.mon, "disk1", timeout_s=5)
        assert await vm.nodes() == before_nodes
        assert await vm.fdsets() == before_fdsets
        assert (await vm.ports())["hp0"] == []

    run(tmp_path, test)


def test_a_cold_disk_detaches_and_its_port_takes_the_next_disk(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        await hotplug.detach_disk(vm.mon, "disk0", timeout_s=5)
        assert not [n for n in await vm.nodes() if n.startswith("disk0")]
        assert "disk0" not in await vm.fdsets()  # the fdset -add-fd gave it at start is gone too
        for i in range(1, SPARE_PORTS + 1):
            await vm.attach(vm.disk(f"disk{i}"))
        ports = await vm.ports()
        assert [ports[f"hp{i}"] for i in range(SPARE_PORTS)] == [[f"disk{i + 1}-dev"] for i in range(SPARE_PORTS)]
        await vm.attach(vm.disk("disk9"))
        assert (await vm.ports())["disk0-port"] == ["disk9-dev"]

    run(tmp_path, test)


def test_no_free_port_leaves_nothing_behind(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        for i in range(1, SPARE_PORTS + 1):
            await vm.attach(vm.disk(f"disk{i}"))
        nodes, fdsets = await vm.nodes(), await vm.fdsets()
        with pytest.raises(hotplug.HotplugError, match="no free PCIe root port"):
            await vm.attach(vm.disk("disk7"))
        assert (await vm.nodes(), await vm.fdsets()) == (nodes, fdsets)

    run(tmp_path, test)


def test_a_failed_attach_is_undone(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        nodes, fdsets = await vm.nodes(), await vm.fdsets()
        # disk0 exists: its node name is taken, so the format node cannot be added; the file node and the
        # fdset that went in before are removed again, and disk0 itself is untouched.
        with pytest.raises(ExecuteError, match="Duplicate"):
            await vm.attach(vm.disk("disk0", backing=True))
        assert (await vm.nodes(), await vm.fdsets()) == (nodes, fdsets)
        assert (await vm.ports())["disk0-port"] == ["disk0-dev"]

    run(tmp_path, test)


def test_a_read_only_disk_is_attached_read_only(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        await vm.attach(vm.disk("disk1", readonly=True))
        nodes = {n["node-name"]: n for n in await vm.mon.query_named_block_nodes()}
        assert nodes["disk1"]["ro"] and nodes["disk1-file"]["ro"]

    run(tmp_path, test)


def test_unplug_the_guest_ignores_times_out_and_leaves_the_disk(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        nodes = await vm.nodes()
        with pytest.raises(hotplug.UnplugTimeout, match="did not release disk0 within 0.3 s"):
            await hotplug.detach_disk(vm.mon, "disk0", timeout_s=0.3)
        assert await vm.nodes() == nodes
        assert (await vm.ports())["disk0-port"] == ["disk0-dev"]

    run(tmp_path, test, FAKE_QEMU_IGNORE_UNPLUG="1")


def test_a_late_acknowledgement_is_finished_by_a_second_detach(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        with pytest.raises(hotplug.UnplugTimeout):
            await hotplug.detach_disk(vm.mon, "disk0", timeout_s=0.1)
        await asyncio.sleep(0.6)  # the "guest" lets go now: the device is gone, its nodes are not
        assert "disk0" in await vm.nodes()
        await hotplug.detach_disk(vm.mon, "disk0", timeout_s=1)
        assert not [n for n in await vm.nodes() if n.startswith("disk0")]

    run(tmp_path, test, FAKE_QEMU_UNPLUG_DELAY="0.5")


def test_detaching_an_unknown_disk(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        with pytest.raises(hotplug.HotplugError, match="no disk disk5"):
            await hotplug.detach_disk(vm.mon, "disk5")

    run(tmp_path, test)


def test_change_medium(tmp_path: Path) -> None:
    iso1, iso2 = tmp_path / "a.iso", tmp_path / "b.iso"
    iso1.write_bytes(b"\0" * 4096)
    iso2.write_bytes(b"\0" * 8192)

    async def cd0(vm: Vm) -> dict[str, Any]:
        return next(b for b in await vm.mon.query_block() if b["qdev"] == "cd0-dev")

    async def test(vm: Vm) -> None:
        assert "inserted" not in await cd0(vm)  # an empty tray to start with
        with vm.mon.expect_event(EV_DEVICE_TRAY_MOVED, lambda d: d["id"] == "cd0-dev") as moved:
            await hotplug.change_medium(vm.mon, "cd0", open_medium(vm.stack, str(iso1)))
            assert (await moved.wait(2))["tray-open"] is True
        block = await cd0(vm)
        assert block["inserted"]["node-name"] == "cd0-g1" and block["inserted"]["ro"]
        assert not block["tray_open"]
        await hotplug.change_medium(vm.mon, "cd0", open_medium(vm.stack, str(iso2)))
        assert (await cd0(vm))["inserted"]["node-name"] == "cd0-g2"
        assert [f for f in await vm.fdsets() if f.startswith("cd0")] == ["cd0-g2"]
        await hotplug.change_medium(vm.mon, "cd0", None)
        block = await cd0(vm)
        assert "inserted" not in block and not block["tray_open"]
        assert not [n for n in await vm.nodes() if n.startswith("cd0")]
        assert not [f for f in await vm.fdsets() if f.startswith("cd0")]
        with pytest.raises(hotplug.HotplugError, match="no CD-ROM drive cd1"):
            await hotplug.change_medium(vm.mon, "cd1", None)

    run(tmp_path, test)


def test_a_medium_present_at_start_is_replaced(tmp_path: Path) -> None:
    iso = tmp_path / "a.iso"
    iso.write_bytes(b"\0" * 4096)
    spec = VmSpec(
        name="t", uuid="00000000-0000-4000-8000-000000000002", memory_mib=64, vcpus=1,
        cdroms=[CdromSpec(name="cd0", path=str(iso))],
    )  # fmt: skip

    async def test(vm: Vm) -> None:
        assert {"cd0", "cd0-file"} <= set(await vm.nodes()) and "cd0" in await vm.fdsets()
        await hotplug.change_medium(vm.mon, "cd0", open_medium(vm.stack, str(iso)))
        assert [n for n in await vm.nodes() if n.startswith("cd0")] == ["cd0-g1", "cd0-g1-file"]
        assert [f for f in await vm.fdsets() if f.startswith("cd0")] == ["cd0-g1"]

    run(tmp_path, test, spec=spec)


def test_disk_limits_go_by_name(tmp_path: Path) -> None:
    spec = VmSpec(
        name="t", uuid="00000000-0000-4000-8000-000000000003", memory_mib=64, vcpus=1,
        disks=[DiskSpec(name="disk0", path=_img(tmp_path / "a.qcow2"), format="qcow2"),
               DiskSpec(name="disk2", path=_img(tmp_path / "c.qcow2"), format="qcow2")],
    )  # fmt: skip
    new = limits.updated(spec, SetVm(disks=[DiskLimits(name="disk2", iops_total=100)]))
    assert [d.iops_total for d in new.disks] == [None, 100]
    with pytest.raises(InvalidInput, match=r"has no disk 'disk1' \(it has disk0, disk2\)"):
        limits.updated(spec, SetVm(disks=[DiskLimits(name="disk1", iops_total=100)]))

    async def test(vm: Vm) -> None:
        await limits.apply_disks(vm.mon, new, only_limited=True)
        live = {b["qdev"]: b["inserted"] for b in await vm.mon.query_block()}
        assert live[limits.qdev("disk2")]["iops"] == 100 and live[limits.qdev("disk2")]["group"] == "disk2"
        assert "iops" not in live[limits.qdev("disk0")]

    run(tmp_path, test, spec=new)


def test_wait_event_times_out(tmp_path: Path) -> None:
    async def test(vm: Vm) -> None:
        with pytest.raises(TimeoutError):
            await vm.mon.wait_event("DEVICE_DELETED", timeout_s=0.05)

    run(tmp_path, test)


@pytest.mark.parametrize(
    ("name", "owner", "owned"),
    [("disk1", "disk1", True), ("disk1-b2-file", "disk1", True), ("disk10", "disk1", False),
     ("disk10-file", "disk1", False), ("cd0-g3", "cd0", True)],
)  # fmt: skip
def test_ownership_by_name(name: str, owner: str, owned: bool) -> None:
    assert hotplug._owned_by(name, owner) is owned


def test_deletion_order_users_first() -> None:
    names = ["disk1-b1-file", "disk1-file", "disk1-b2", "disk1", "disk1-b1", "disk1-b2-file"]
    assert sorted(names, key=lambda n: hotplug._deletion_order(n, "disk1")) == [
        "disk1", "disk1-file", "disk1-b1", "disk1-b1-file", "disk1-b2", "disk1-b2-file",
    ]  # fmt: skip
    assert hotplug._generation("cd0", "cd0-g7") == 7
    assert hotplug._generation("cd0", "cd0") == 0
    assert hotplug._generation("cd0", None) == 0
