"""A VM's NICs: attach and detach, live while it runs and for its next start (virsh attach-interface /
detach-interface with --live --config). The spec changes only after QEMU has done it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from vmkit.errors import Conflict, InvalidInput, NotFound
from vmkit.model.network import NicRequest
from vmkit.model.vm import MAX_NICS, NicSpec, VmState
from vmkit.qemu import hotplug
from vmkit.services.networks import NetworkService
from vmkit.services.vms import VmRuntime, VmService, _mac, _qmp, running_machine


class VmNicService:
    def __init__(self, *, vms: VmService, networks: NetworkService) -> None:
        self._vms = vms
        self._networks = networks

    def _live(self, vm: VmRuntime) -> Any:
        if vm.proc is None and not vm.state.active:
            return None
        if vm.state is not VmState.RUNNING or vm.monitor is None:
            # A paused guest cannot acknowledge an unplug, nor bring a new NIC up: keep it simple and honest.
            raise Conflict(f"VM {vm.spec.name!r} is {vm.state}; NICs change while it runs or is shut off")
        return vm.monitor

    async def attach(self, name: str, req: NicRequest) -> list[dict[str, Any]]:
        vm = self._vms.runtime(name)
        async with vm.lock:
            if len(vm.spec.nics) >= MAX_NICS:
                raise Conflict(f"VM {name!r} has {MAX_NICS} NICs already")
            taken = {n.mac for other in self._vms.runtimes() for n in other.spec.nics}
            if req.mac is not None and req.mac in taken:
                raise Conflict(f"MAC {req.mac} is already used on this host")
            mac = req.mac or _mac()
            while mac in taken:
                mac = _mac()
            names = {n.name for n in vm.spec.nics}
            nic_name = next(f"net{i}" for i in range(MAX_NICS + 1) if f"net{i}" not in names)
            if req.network == "user":
                nic = NicSpec(name=nic_name, mac=mac, model=req.model)
            else:
                if not self._networks.exists(req.network):
                    raise NotFound(f"no network named {req.network!r} (vmkit network list)")
                self._networks.check_nic(req.network, req.vlan, req.trunks)
                nic = NicSpec(name=nic_name, kind="network", network=req.network, mac=mac, model=req.model,
                              vlan=req.vlan, trunks=req.trunks)  # fmt: skip
            mon = self._live(vm)
            if mon is not None:
                if nic.kind != "network" or nic.network is None:
                    raise InvalidInput("a user-mode NIC cannot be hot-plugged; add it while the VM is shut off")
                with contextlib.ExitStack() as stack:  # QEMU holds its own copy of the tap once it has it
                    fd = await asyncio.to_thread(self._vms.open_tap, name, nic, stack)
                    port = await _qmp(hotplug.attach_nic(mon, nic, fd))
                nic = nic.model_copy(update={"port": port})
            self._vms.save_spec(vm, running_machine(vm).model_copy(update={"nics": [*vm.spec.nics, nic]}))
        if nic.network:
            await self._networks.hosts_changed(nic.network)
        return self.list(name)

    async def detach(self, name: str, target: str) -> list[dict[str, Any]]:
        """Detach NIC `target`: its name (net1) or its MAC."""
        vm = self._vms.runtime(name)
        async with vm.lock:
            nic = vm.spec.nic(target) or next((n for n in vm.spec.nics if n.mac == target.lower()), None)
            if nic is None:
                have = ", ".join(f"{n.name} ({n.mac})" for n in vm.spec.nics) or "none"
                raise NotFound(f"VM {name!r} has no NIC {target!r} (its NICs: {have})")
            mon = self._live(vm)
            if mon is not None:
                await _qmp(hotplug.detach_nic(mon, nic.name))
            spec = running_machine(vm)
            self._vms.save_spec(vm, spec.model_copy(update={"nics": [n for n in spec.nics if n.name != nic.name]}))
        if nic.network:
            await self._networks.vm_nic_gone(nic.network, nic.mac)
            await self._networks.hosts_changed(nic.network)
        return self.list(name)

    def list(self, name: str) -> list[dict[str, Any]]:
        vm = self._vms.runtime(name)
        return [n.model_dump() for n in vm.spec.nics]
