"""Live migration to another vmkit host, with the disks copied while the guest runs (virsh migrate --live
--copy-storage-all), as two daemons talking over the destination's TLS API with a token (services/remotes.py).

Source (`migrate`): asks the destination to make room (POST /v1/migrations/incoming: volumes, the VM defined,
its QEMU waiting with `-incoming defer`, an NBD server on the new disks), mirrors each disk there, migrates RAM
and device state (qemu/migrate.py), then tells the destination to finish (POST …/finish: the guest runs there)
and only then removes the VM and its disks here. A failure or a cancel at any stage before the destination has
finished leaves the VM running here as before, and the destination is told to drop everything it made.

Destination (`prepare`, `finish`, `abort`): the VM it defines is journaled ("incoming") until finished, so a
destination daemon that dies half-way removes the half-made VM at its next start (its QEMU never ran the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from vmkit.errors import Conflict, InvalidInput, NotFound, VmkitError
from vmkit.model.migration import FinishIncoming, IncomingDisk, IncomingMigration, IncomingReady, MigrateVm
from vmkit.model.storage import DEFAULT_POOL, CloneVolume, CreateVolume, split_volume
from vmkit.model.vm import DiskSpec, VmInfo, VmSpec, VmState
from vmkit.qemu import blocksnap
from vmkit.qemu import migrate as qmig
from vmkit.qemu.monitor import Monitor
from vmkit.qemu.savevm import EV_MIGRATION, MAX_BANDWIDTH
from vmkit.services import journal
from vmkit.services.networks import NetworkService
from vmkit.services.operations import Progress
from vmkit.services.remotes import RemoteService, remote_error
from vmkit.services.vms import VmRuntime, VmService, _host_memory_mib, _qmp
from vmkit.services.volumes import VolumeService
from vmkit.store.db import Store
from vmkit.util.crash import crashpoint
from vmkit.util.tasks import TaskSet

log = logging.getLogger(__name__)

MIGRATION_TIMEOUT_S = 24 * 3600.0
HEARTBEAT_S = 1.0  # how often the source tells the destination it is still at it
START_DOWNTIME_MS = 50  # the autopilot's first downtime limit (raised up to the request's max_downtime_ms)


def _no_progress(fraction: float, message: str) -> None:
    pass


class MigrationService:
    def __init__(
        self, *, store: Store, vms: VmService, volumes: VolumeService, networks: NetworkService, remotes: RemoteService
    ) -> None:
        self._store = store
        self._vms = vms
        self._volumes = volumes
        self._networks = networks
        self._remotes = remotes
        self._incoming: dict[str, str] = {}  # migration id → VM name (destination side)
        self._outgoing: dict[str, asyncio.Task[Any]] = {}  # VM name → the task migrating it (source side)
        self._watchers = TaskSet()
        self._alive: dict[str, float] = {}  # migration id → when its source last said it is still at it

    # ----- source --------------------------------------------------------------------------------
    def check(self, name: str, req: MigrateVm) -> None:
        """Refuse up front what cannot work: no such VM or remote, the wrong state for the kind asked."""
        vm = self._vms.runtime(name)
        self._remotes.info(req.remote)
        owned = self._vms.owned_volumes(vm)
        leaning = sorted({k for key in owned for k in self._volumes.dependents(key) if k not in owned})
        if leaning:
            raise Conflict(
                f"volume(s) {', '.join(leaning)} stand on images of {name!r} (linked clones): it cannot move"
            )
        if self._store.snapshots(name) and not req.offline:
            # A live copy of a disk is flat, and internal snapshots live in the very image QEMU writes.
            raise Conflict(
                f"VM {name!r} has snapshots: a live migration cannot carry them; shut it off and migrate it --offline "
                "(its snapshot tree goes along), or delete them"
            )
        if req.offline:
            if vm.state.active or vm.proc is not None or vm.state is VmState.SAVED:
                raise Conflict(f"VM {name!r} is {vm.state}; an offline migration needs it shut off")
            return
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            raise Conflict(f"VM {name!r} is {vm.state}; a live migration needs it running or paused")
        if req.postcopy and any(not self._shared_disk(d) for d in vm.spec.disks):
            # A disk mirror completes at the switch-over; after a switch to post-copy the guest writes there
            # while the mirror could still be sending: its disks must not move at all.
            raise InvalidInput("post-copy needs every disk on a shared pool (a copied disk cannot switch mid-way)")
        local = [d.volume or d.name for d in vm.spec.disks if not self._shared_disk(d)]
        if local and not req.copy_storage:
            raise InvalidInput(
                f"disk(s) {', '.join(local)} are on local pools: give --copy-storage to copy them (or keep disks "
                "on a shared pool, nfs or iscsi, that both hosts define)"
            )
        if vm.spec.cdroms and any(c.path for c in vm.spec.cdroms):
            raise Conflict(f"VM {name!r} has CD-ROM media in; eject them first (vm media eject)")

    async def cancel(self, name: str) -> None:
        """Stop a migration of VM `name` under way (virsh migrate-cancel); the VM stays here, running as before."""
        task = self._outgoing.get(name)
        if task is None or task.done():
            raise NotFound(f"VM {name!r} is not being migrated")
        task.cancel()

    async def migrate(self, name: str, req: MigrateVm, progress: Progress = _no_progress) -> dict[str, Any]:
        """Migrate VM `name` (the API checked the request up front; it is checked again under the VM's lock)."""
        if name in self._outgoing:
            raise Conflict(f"VM {name!r} is being migrated already")
        task = asyncio.current_task()
        assert task is not None
        self._outgoing[name] = task
        try:
            return await self._migrate(name, req, progress)
        except asyncio.CancelledError:
            task.uncancel()  # asked for by migrate-cancel, and answered: the operation fails with this reason
            raise VmkitError(f"the migration of {name!r} was cancelled; it runs here as before") from None
        finally:
            del self._outgoing[name]

    def _shared_disk(self, d: DiskSpec) -> bool:
        return d.volume is not None and self._volumes.shared(d.volume)

    def _incoming_body(self, vm: VmRuntime, *, sent: dict[str, str] | None = None, **extra: Any) -> IncomingMigration:
        spec = vm.spec
        disks = [
            IncomingDisk(disk=d.name, size_bytes=max(1, self._volumes.info(d.volume or "").capacity_bytes),
                         format="qcow2" if d.format == "qcow2" else "raw",
                         shared=d.volume if self._shared_disk(d) else None,
                         location=d.path if self._shared_disk(d) else None,
                         sent=(sent or {}).get(d.name))
            for d in spec.disks
            if d.volume
        ]  # fmt: skip
        return IncomingMigration(
            spec=spec,
            autostart=vm.autostart,
            disks=disks,
            kernel_volume=self._volumes.key_of_path(spec.kernel) if spec.kernel else None,
            initrd_volume=self._volumes.key_of_path(spec.initrd) if spec.initrd else None,
            **extra,
        )

    async def _offline(self, name: str, req: MigrateVm, progress: Progress) -> dict[str, Any]:
        """A shut-off VM: each disk sent whole (an overlay flattened first) over the destination's API (the
        upload `volume import` uses), then the VM defined there and removed here. A VM with snapshots (or bases)
        sends every image they stand on, as it is, and its snapshot tree goes along (_send_chains)."""
        vm = self._vms.runtime(name)
        t0 = time.monotonic()
        async with vm.lock:
            self.check(name, req)
            client = self._remotes.client(req.remote, timeout_s=MIGRATION_TIMEOUT_S)
            sent: dict[str, str] = {}
            uploaded: list[str] = []  # volumes made there, in order (removed in reverse if this fails)
            temps: list[str] = []
            extra: dict[str, Any] = {}
            disks = [d for d in vm.spec.disks if d.volume and not self._shared_disk(d)]
            records = self._store.snapshots(name)
            try:
                if records or vm.spec.bases:
                    renames = await self._send_chains(client, req.remote, vm, progress, uploaded)
                    sent = {d.name: renames[d.volume or ""] for d in disks}
                    extra = {"renames": renames, "snapshots": records,
                             "current_snapshot": self._store.current_snapshot(name)}  # fmt: skip
                for i, d in enumerate(disks if not extra else []):
                    key = d.volume or ""
                    row = self._volumes.row(key)
                    ext = ".qcow2" if row.format == "qcow2" else ".raw"
                    if row.backing:  # one standalone image goes, not a chain
                        pool = split_volume(key)[0]
                        flat = f"{pool}/{self._volumes.free_name(pool, f'{name}-{d.name}-migrating', ext)}"
                        await self._volumes.clone(key, CloneVolume(target=flat), frozen=True)
                        temps.append(flat)
                        key = flat
                    target = f"{name}-{d.name}{ext}"
                    await self._send(client, req.remote, self._volumes.path(key), target, progress, i, len(disks))
                    sent[d.name] = f"{DEFAULT_POOL}/{target}"
                    uploaded.append(sent[d.name])
                crashpoint("migrate-offline-sent")
                sent |= {d.name: d.volume for d in vm.spec.disks if d.volume and self._shared_disk(d)}
                body = self._incoming_body(vm, volumes=sent, **extra)
                await self._remotes.request(req.remote, "POST", "/v1/migrations/incoming", body.model_dump(mode="json"))
            except BaseException:
                await self._unsend(req.remote, uploaded)
                raise
            finally:
                for key in temps:
                    self._volumes.discard(key)
        await self._vms.delete(name, leave_shared=True)
        progress(1.0, f"defined on {req.remote}")
        return {"vm": name, "remote": req.remote, "total_s": round(time.monotonic() - t0, 3), "downtime_ms": None,
                "offline": True}  # fmt: skip

    async def _send_readonly(self, vm: VmRuntime, remote: str, progress: Progress) -> dict[str, str]:
        """A live migration's read-only local disks (no guest writes them: no mirror needed), sent whole before
        anything else; disk → POOL/NAME there."""
        disks = [d for d in vm.spec.disks if d.readonly and d.volume and not self._shared_disk(d)]
        if not disks:
            return {}
        client = self._remotes.client(remote, timeout_s=MIGRATION_TIMEOUT_S)
        sent: dict[str, str] = {}
        try:
            for i, d in enumerate(disks):
                row = self._volumes.row(d.volume or "")
                target = f"{vm.spec.name}-{d.name}{'.qcow2' if row.format == 'qcow2' else '.raw'}"
                await self._send(client, remote, self._volumes.path(row.key), target, progress, i, len(disks))
                sent[d.name] = f"{DEFAULT_POOL}/{target}"
        except BaseException:
            await self._unsend(remote, list(sent.values()))
            raise
        return sent

    async def _unsend(self, remote: str, keys: list[str]) -> None:
        """Remove volumes sent to the remote (the last first: overlays before what they stand on)."""
        for key in reversed(keys):
            with contextlib.suppress(Exception):
                await self._remotes.request(remote, "DELETE", f"/v1/pools/{key.replace('/', '/volumes/')}")

    async def _send_chains(
        self, client: Any, remote: str, vm: VmRuntime, progress: Progress, uploaded: list[str]
    ) -> dict[str, str]:
        """Send every image the VM's disks, snapshots and bases stand on, each whole and as it is (its internal
        snapshots too), bottom of each chain first, each overlay re-pointed there at its backing's copy; returns
        source POOL/NAME → POOL/NAME there. An image of another pool (the demo's base in `images`) goes too: the
        same name there is no proof of the same bytes."""
        want = [d.volume for d in vm.spec.disks if d.volume and not self._shared_disk(d)]
        want += [*self._vms.snapshot_images(vm.spec.name), *vm.spec.bases]
        keys: list[str] = []
        while want:
            key = want.pop()
            if key not in keys:
                keys.append(key)
                backing = self._volumes.row(key).backing
                if backing:
                    want.append(backing)
        among = list(keys)  # (list.sort empties the list it sorts while it runs)
        keys.sort(key=lambda k: self._volumes.depth(k, among))
        renames: dict[str, str] = {}
        for i, key in enumerate(keys):
            row = self._volumes.row(key)
            target = row.name if row.pool == DEFAULT_POOL else f"{row.pool}-{row.name}"
            backing = renames[row.backing] if row.backing else None
            await self._send(client, remote, self._volumes.path(key), target, progress, i, len(keys), backing=backing)
            renames[key] = f"{DEFAULT_POOL}/{target}"
            uploaded.append(renames[key])
        return renames

    async def _send(
        self,
        client: Any,
        remote: str,
        path: Path,
        target: str,
        progress: Progress,
        i: int,
        n: int,
        *,
        backing: str | None = None,
    ) -> None:
        """Upload the image at path into the remote's default pool as `target` (streamed, never held whole); with
        backing, an overlay re-pointed there at that volume."""

        def report(f: float) -> None:
            progress((i + f) / max(n, 1) * 0.95, f"sending {target}")

        def send() -> Any:
            with open(path, "rb") as f:
                url = f"/v1/pools/{DEFAULT_POOL}/volumes/{target}/upload"
                if backing is not None:
                    url += f"?backing={quote(backing, safe='')}"
                return client.upload(url, f, os.fstat(f.fileno()).st_size, report)

        try:
            await asyncio.to_thread(send)
        except Exception as e:
            raise remote_error(remote, e) from e

    async def _migrate(self, name: str, req: MigrateVm, progress: Progress) -> dict[str, Any]:
        if req.offline:
            return await self._offline(name, req, progress)
        vm = self._vms.runtime(name)
        url = self._remotes.info(req.remote).url
        host = urlsplit(url).hostname or ""
        async with vm.lock:
            self.check(name, req)
            if vm.monitor is None or vm.proc is None:
                raise Conflict(f"VM {name!r} is not running")
            # Mirrored: writable local disks; shared ones stay; read-only ones (a seed) are sent whole first.
            disks = [d for d in vm.spec.disks if d.volume and not self._shared_disk(d) and not d.readonly]
            t0 = time.monotonic()
            sent = await self._send_readonly(vm, req.remote, progress)
            body = self._incoming_body(vm, host=host, postcopy=req.postcopy, sent=sent)
            progress(0.0, f"preparing {req.remote}")
            try:
                ready = IncomingReady.model_validate(
                    await self._remotes.request(
                        req.remote, "POST", "/v1/migrations/incoming", body.model_dump(mode="json")
                    )
                )
            except BaseException:
                await self._unsend(req.remote, list(sent.values()))
                raise
            beat = asyncio.create_task(self._beat(req.remote, ready.id))
            was_running = vm.state is VmState.RUNNING
            mon = vm.monitor
            tls_dir = vm.paths.run_dir / "migration-tls"
            jobs: list[str] = []
            finishing = False
            try:
                shutil.rmtree(tls_dir, ignore_errors=True)
                qmig.write_psk(tls_dir, ready.psk, vm.uid if vm.uid is not None else 0)
                await qmig.drop_tls(mon)  # one an earlier migration left (it ended with its outcome unknown)
                await _qmp(qmig.add_tls(mon, tls_dir, endpoint="client"))
                progress(0.05, "copying disks")
                tops = await _qmp(blocksnap.top_nodes(mon, [d.name for d in disks]))
                jobs = await _qmp(qmig.mirror(mon, tops, host, ready.nbd_port, ready.exports))
                crashpoint("migrate-mirrored")
                progress(0.3, "moving RAM")

                def report(info: dict[str, Any]) -> None:
                    ram = info.get("ram") or {}
                    total, left = ram.get("total") or 0, ram.get("remaining") or 0
                    done = (total - left) / total if total else 0.0
                    rate = ram.get("dirty-pages-rate", 0)
                    progress(0.3 + 0.65 * done, f"RAM {ram.get('transferred', 0) >> 20} MiB sent, "
                             f"{left >> 20} MiB left, dirtying {rate} pages/s")  # fmt: skip

                bandwidth = req.bandwidth_mib_s * 1024 * 1024 if req.bandwidth_mib_s else MAX_BANDWIDTH
                # The pause at the switch-over starts short and grows only while the guest outruns the link.
                autopilot = qmig.Autopilot(start_ms=START_DOWNTIME_MS, max_ms=req.max_downtime_ms,
                                           postcopy=req.postcopy)  # fmt: skip
                if req.postcopy:
                    await _qmp(qmig.enable_postcopy(mon))

                async def finish() -> None:
                    nonlocal finishing
                    finishing = True
                    try:
                        await self._remotes.request(
                            req.remote, "POST", f"/v1/migrations/{ready.id}/finish", {"running": was_running}
                        )
                    except VmkitError:
                        # Its answer may be what got lost: the guest must never run on both hosts.
                        there = await self._runs_there(req.remote, vm)
                        if there is None:
                            raise Conflict(
                                f"{req.remote} did not say whether it took {name!r} over: it stays paused here; if "
                                f"it runs there, `vm stop --force {name}` here, else `vm resume {name}` here"
                            ) from None
                        if not there:
                            raise
                        log.warning("VM %s: %s runs it though its finish answer was lost", name, req.remote)

                try:
                    info = await _qmp(
                        qmig.migrate(mon, host, ready.migration_port, max_bandwidth=bandwidth, autopilot=autopilot,
                                     progress=report, timeout_s=MIGRATION_TIMEOUT_S, on_postcopy=finish)
                    )  # fmt: skip
                except VmkitError as e:
                    if isinstance(e.__cause__, qmig.PostcopyFailed):
                        raise e.__cause__ from None
                    raise
                await qmig.stop_mirrors(mon, jobs, [d.name for d in disks])
                jobs = []
                crashpoint("migrate-sent")
                if not info.get("handed_over"):
                    await finish()
            except qmig.PostcopyFailed as e:
                # Past the switch the guest's memory is split between the hosts: neither side can run it alone.
                shutil.rmtree(tls_dir, ignore_errors=True)
                raise Conflict(
                    f"post-copy of {name!r} to {req.remote} failed after the switch ({e}): the guest is paused on "
                    f"both hosts; it can only be stopped (`vm stop --force {name}` on each)"
                ) from None
            except BaseException as e:
                if isinstance(e, Conflict) and finishing:
                    await qmig.drop_tls(mon)
                    shutil.rmtree(tls_dir, ignore_errors=True)
                    raise  # unknown outcome: the guest stays paused here, never resumed by us
                await self._undo_source(vm, mon, jobs, [d.name for d in disks], was_running)
                with contextlib.suppress(Exception):
                    await self._remotes.request(req.remote, "DELETE", f"/v1/migrations/{ready.id}")
                shutil.rmtree(tls_dir, ignore_errors=True)
                if isinstance(e, (VmkitError, asyncio.CancelledError)):
                    raise
                raise VmkitError(f"migration of {name!r} to {req.remote} failed: {e}") from e
            finally:
                beat.cancel()
            # The guest runs on the destination now: this copy goes, with its disks.
            await self._vms.halt(vm)
            shutil.rmtree(tls_dir, ignore_errors=True)
        await self._vms.delete(name, leave_shared=True)
        progress(1.0, f"running on {req.remote}")
        return {
            "vm": name,
            "remote": req.remote,
            "total_s": round(time.monotonic() - t0, 3),
            "downtime_ms": info.get("downtime"),
            "postcopy": bool(info.get("postcopy")),
            "ram_transferred_bytes": (info.get("ram") or {}).get("transferred"),
        }

    async def _runs_there(self, remote: str, vm: VmRuntime) -> bool | None:
        """Whether the remote runs this VM (same UUID, migrated); None when it cannot be asked."""
        try:
            info = await self._remotes.request(remote, "GET", f"/v1/vms/{vm.spec.name}")
        except VmkitError as e:
            return False if getattr(e, "remote_status", None) == 404 else None
        # Still waiting there (paused, "incoming migration") is not taken over; anything else its QEMU does is.
        taken = info.get("state") in ("running", "paused") and info.get("reason") != "incoming migration"
        return bool(info.get("uuid") == vm.spec.uuid and taken)

    async def _beat(self, remote: str, mid: str) -> None:
        """Tell the destination every HEARTBEAT_S that this migration goes on (see _watch)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(VmkitError):
                await self._remotes.request(remote, "POST", f"/v1/migrations/{mid}/alive", {}, timeout_s=HEARTBEAT_S)

    async def _undo_source(
        self, vm: VmRuntime, mon: Monitor, jobs: list[str], disks: list[str], was_running: bool
    ) -> None:
        """Back to as it was: the migration cancelled, mirrors and NBD nodes gone, TLS dropped, the guest running
        (a completed migration leaves the source paused, in postmigrate)."""
        with contextlib.suppress(Exception):
            await mon.execute("migrate_cancel")
        await qmig.stop_mirrors(mon, jobs, disks)
        await qmig.drop_tls(mon)
        if was_running:
            with contextlib.suppress(Exception):
                await mon.cont()

    # ----- destination ---------------------------------------------------------------------------
    async def prepare(self, req: IncomingMigration) -> IncomingReady:
        spec = req.spec
        if any(v.spec.name == spec.name for v in self._vms.runtimes()):
            raise Conflict(f"a VM named {spec.name!r} already exists here")
        if any(v.spec.uuid == spec.uuid for v in self._vms.runtimes()):
            raise Conflict(f"a VM with UUID {spec.uuid} already exists here")
        missing = sorted({n.network for n in spec.nics if n.network and not self._networks.exists(n.network)})
        if missing:
            raise Conflict(f"network(s) {', '.join(missing)} do not exist here; create them first")
        available, reserved = _available_memory_mib(), host_reserved_mib()
        if available and spec.memory_mib > available - reserved:
            kept = f", {reserved} MiB of them kept for the host" if reserved else ""
            raise Conflict(
                f"not enough memory here for {spec.memory_mib} MiB of {spec.name!r} ({available} MiB available{kept})"
            )
        kernel = self._image_path(req.kernel_volume, "kernel") if spec.kernel else None
        initrd = self._image_path(req.initrd_volume, "initrd") if spec.initrd else None
        if req.volumes is not None:
            return await self._define_offline(req, kernel, initrd)
        if req.host is None:
            raise InvalidInput("give the address to listen on (host), or the volumes of an offline migration")
        host = req.host
        if host not in await asyncio.to_thread(_local_addresses):  # pyroute2's sync API runs a loop of its own
            raise InvalidInput(f"{host} is no address of this host")
        made: list[str] = []
        mid = uuid.uuid4().hex
        try:
            disks, shared = [], []
            for d in req.disks:
                old = spec.disk(d.disk)
                if old is None:
                    raise InvalidInput(f"the VM has no disk {d.disk}")
                if d.shared is not None:
                    shared.append(await self._shared_here(old, d.shared, d.location))
                    continue
                if d.sent is not None:  # a read-only disk, sent whole: it is this VM's from now on
                    row = self._volumes.row(d.sent)
                    made.append(row.key)
                    shared.append(old.model_copy(update={"volume": row.key, "path": self._volumes.location(row.key),
                                                         "format": row.format, "owned": True}))  # fmt: skip
                    continue
                name = self._volumes.free_name(DEFAULT_POOL, f"{spec.name}-{d.disk}", f".{d.format}")
                info = await self._volumes.create(
                    DEFAULT_POOL, CreateVolume(name=name, size_bytes=d.size_bytes, format=d.format)
                )
                made.append(info.key)
                disks.append(old.model_copy(update={"path": info.path, "format": d.format, "volume": info.key,
                                                    "owned": True}))  # fmt: skip
            new = spec.model_copy(update={"disks": _in_order(spec, disks + shared), "kernel": kernel,
                                          "initrd": initrd, "bases": [],
                                          "cdroms": [c.model_copy(update={"path": None, "volume": None})
                                                     for c in spec.cdroms]})  # fmt: skip
            await self._vms.define(new, autostart=req.autostart)
            self._store.set_journal(new.name, {"op": "incoming", "id": mid, "volumes": made})
        except BaseException:
            for key in made:
                self._volumes.discard(key)
            raise
        vm = self._vms.runtime(new.name)
        psk = secrets.token_hex(32)
        ports: dict[str, int] = {}
        tls_dir = vm.paths.vm_dir / "migration-tls"
        listener = socket.create_server((host, 0), family=_family(host))

        async def ready(mon: Monitor) -> None:
            shutil.rmtree(tls_dir, ignore_errors=True)
            qmig.write_psk(tls_dir, psk, vm.uid if vm.uid is not None else 0)
            await qmig.add_tls(mon, tls_dir, endpoint="server")
            if req.postcopy:
                try:
                    await qmig.enable_postcopy(mon)  # refused by a QEMU that cannot use userfaultfd here
                except qmig.MigrationError as e:
                    raise Conflict(f"{e}{_userfaultfd_hint()}") from None
            await qmig.serve_disks(mon, listener, {d.name: d.name for d in disks})
            ports["nbd"] = listener.getsockname()[1]
            ports["migration"] = await qmig.listen_migration(mon, host)

        try:
            async with vm.lock:
                vm.paths.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                await self._vms.boot(vm, incoming=ready)
        except BaseException:
            await self._drop_incoming(vm)
            raise
        finally:
            listener.close()
        self._incoming[mid] = new.name
        self._watchers.spawn(self._watch(mid, vm))
        crashpoint("incoming-ready")
        return IncomingReady(id=mid, migration_port=ports["migration"], nbd_port=ports["nbd"],
                             exports={d.name: d.name for d in disks}, psk=psk)  # fmt: skip

    async def heartbeat(self, mid: str) -> None:
        """The source is still at it (it says so every HEARTBEAT_S while the migration runs)."""
        self._incoming_vm(mid)
        self._alive[mid] = asyncio.get_running_loop().time()

    async def _watch(self, mid: str, vm: VmRuntime) -> None:
        """Drop an incoming VM nobody finishes: its QEMU gave up (a failed incoming migration ends it), or the
        source has not said it is still at it for VMKIT_INCOMING_STALL_S (the source or the link died: it can no
        longer tell us to abort). The destination's QEMU counts nothing while it receives: hence heartbeats."""
        loop = asyncio.get_running_loop()
        self._alive[mid] = loop.time()
        while mid in self._incoming:
            await asyncio.sleep(1.0)
            if mid not in self._incoming:
                break
            mon = vm.monitor
            try:
                info = await mon.execute("query-migrate", timeout_s=5) if mon is not None else {}
            except Exception:  # noqa: BLE001 - QEMU gone or not answering: the VM cannot come any more
                info = {"status": "failed"}
            status = info.get("status")
            silent = loop.time() - self._alive.get(mid, 0.0) > incoming_stall_s()
            if status in ("failed", "cancelled") or vm.proc is None or silent:
                log.warning("incoming VM %s: %s; removing it", vm.spec.name, "source silent" if silent else status)
                self._incoming.pop(mid, None)
                with contextlib.suppress(VmkitError):
                    await self._drop_incoming(vm)
                break
        self._alive.pop(mid, None)

    async def _shared_here(self, disk: DiskSpec, key: str, location: str | None) -> DiskSpec:
        """The disk on a shared volume, as this host reaches it: its pool must be defined here with the same
        server (the same URL), and the volume is adopted here if this host has not seen it yet."""
        pool = split_volume(key)[0]
        try:
            here_shared = self._volumes.shared(key)
        except NotFound:
            raise Conflict(f"disk {disk.name} is on shared pool {pool!r}, which is not defined here") from None
        if not here_shared:
            raise Conflict(f"pool {pool!r} here is a local pool, not the shared pool disk {disk.name} is on")
        here = self._volumes.location(key)
        if location is not None and here != location:
            raise Conflict(f"pool {pool!r} here is {here.rpartition('/')[0]}, not the one the source uses")
        with contextlib.suppress(NotFound):
            self._volumes.row(key)
            return disk.model_copy(update={"path": here, "volume": key})
        await self._volumes.refresh(pool)
        try:
            self._volumes.row(key)
        except NotFound:
            raise Conflict(f"volume {key} is not on the server as this host sees it") from None
        return disk.model_copy(update={"path": here, "volume": key})

    async def _define_offline(self, req: IncomingMigration, kernel: str | None, initrd: str | None) -> IncomingReady:
        """An offline migration's VM: its disks are the volumes the source uploaded here (or shared ones); with
        renames, whole chains came, and its snapshot tree with them."""
        if req.renames is not None:
            return await self._define_with_snapshots(req, kernel, initrd)
        volumes = req.volumes or {}
        shared = {d.disk: d for d in req.disks if d.shared is not None}
        disks = []
        for d in req.spec.disks:
            key = volumes.get(d.name)
            if key is None:
                raise InvalidInput(f"no volume given for disk {d.name}")
            if d.name in shared:
                disks.append(await self._shared_here(d, key, shared[d.name].location))
                continue
            row = self._volumes.row(key)
            if row.format not in ("raw", "qcow2") or row.backing:
                raise InvalidInput(f"{key} is not a standalone disk image")
            disks.append(d.model_copy(update={"volume": row.key, "path": str(self._volumes.path(row.key)),
                                              "format": row.format, "owned": True}))  # fmt: skip
        spec = req.spec.model_copy(update={"disks": disks, "kernel": kernel, "initrd": initrd, "bases": [],
                                           "cdroms": [c.model_copy(update={"path": None, "volume": None})
                                                      for c in req.spec.cdroms]})  # fmt: skip
        await self._vms.define(spec, autostart=req.autostart)
        return IncomingReady(id=uuid.uuid4().hex)

    async def _define_with_snapshots(
        self, req: IncomingMigration, kernel: str | None, initrd: str | None
    ) -> IncomingReady:
        renames = req.renames or {}
        for key in renames.values():
            self._volumes.row(key)  # each one here (404 otherwise)

        def moved(spec: VmSpec) -> VmSpec:
            disks = [
                d.model_copy(update={"volume": renames[d.volume], "path": self._volumes.location(renames[d.volume])})
                if d.volume in renames else d
                for d in spec.disks
            ]  # fmt: skip
            return spec.model_copy(update={"disks": disks, "bases": [renames.get(b, b) for b in spec.bases]})

        records = [r.model_copy(update={"spec": moved(r.spec)}) for r in req.snapshots]
        spec = moved(req.spec)
        named = {d.volume for s in [spec, *(r.spec for r in records)] for d in s.disks}
        # Images below them that no disk names (the demo's base, sent as a copy): the VM's own from now on.
        bases = [*spec.bases, *(k for k in renames.values() if k not in named and k not in spec.bases)]
        spec = spec.model_copy(update={"kernel": kernel, "initrd": initrd, "bases": bases,
                                       "cdroms": [c.model_copy(update={"path": None, "volume": None})
                                                  for c in spec.cdroms]})  # fmt: skip
        if req.current_snapshot is not None and req.current_snapshot not in {r.name for r in records}:
            raise InvalidInput(f"the current snapshot {req.current_snapshot!r} is not among the snapshots sent")
        await self._vms.define(spec, autostart=req.autostart)
        with self._store.transaction():
            for rec in records:
                self._store.add_snapshot(spec.name, rec)
            self._store.set_current_snapshot(spec.name, req.current_snapshot)
        return IncomingReady(id=uuid.uuid4().hex)

    def _image_path(self, key: str | None, what: str) -> str:
        if key is None:
            raise Conflict(f"the VM boots a {what} that is no volume on the source: it cannot move")
        try:
            return str(self._volumes.path(self._volumes.row(key).key))
        except NotFound:
            raise Conflict(f"the {what} volume {key} is not here: build or import the same image here first") from None

    async def finish(self, mid: str, req: FinishIncoming) -> VmInfo:
        """The source says the migration completed: serve no more disks, run the guest, keep the VM."""
        vm = self._incoming_vm(mid)
        async with vm.lock:
            if vm.monitor is None:
                raise Conflict(f"the QEMU of incoming VM {vm.spec.name!r} is gone")
            status = await _qmp(_incoming_status(vm.monitor))
            if status not in ("completed", "postcopy-active"):
                raise Conflict(f"the migration has not completed here (QEMU says {status})")
            await _qmp(qmig.finish_incoming(vm.monitor, run=req.running))
            # The guest is this host's from here on, whatever else fails.
            self._vms.set_state(vm, VmState.RUNNING if req.running else VmState.PAUSED, "migrated")
            self._store.set_journal(vm.spec.name, None)
            del self._incoming[mid]
            crashpoint("incoming-finished")
            if status == "postcopy-active":
                return vm.info()  # the pages still coming use the TLS object; a next migration drops it
            with contextlib.suppress(Exception):
                await qmig.drop_tls(vm.monitor)
            shutil.rmtree(vm.paths.vm_dir / "migration-tls", ignore_errors=True)
            return vm.info()

    async def abort(self, mid: str) -> None:
        vm = self._incoming_vm(mid)
        del self._incoming[mid]
        await self._drop_incoming(vm)

    def _incoming_vm(self, mid: str) -> VmRuntime:
        name = self._incoming.get(mid)
        if name is None:
            raise NotFound(f"no incoming migration {mid!r} here")
        return self._vms.runtime(name)

    async def _drop_incoming(self, vm: VmRuntime) -> None:
        """Remove a VM that was coming and never ran here: its QEMU, definition and new disks."""
        async with vm.lock:
            await self._vms.halt(vm)
            shutil.rmtree(vm.paths.vm_dir / "migration-tls", ignore_errors=True)
        await self._vms.delete(vm.spec.name, leave_shared=True)  # a shared disk is still the source's
        self._store.set_journal(vm.spec.name, None)

    async def recover(self) -> None:
        """A destination daemon that died with a VM still coming: that VM never ran here; remove it."""
        await journal.recover(self._store, self._vms, ("incoming",), lambda vm, _: self._drop_incoming(vm))


def _in_order(spec: Any, disks: list[DiskSpec]) -> list[DiskSpec]:
    """disks in the order the VM has them (copied and shared ones were gathered apart)."""
    order = {d.name: i for i, d in enumerate(spec.disks)}
    return sorted(disks, key=lambda d: order.get(d.name, len(order)))


def _userfaultfd_hint() -> str:
    """Why QEMU here may have refused post-copy, when the host says so: QEMU 7.2 creates its userfaultfd with the
    system call, which an unprivileged process may only use when vm.unprivileged_userfaultfd is 1 (vmkit never
    gives QEMU CAP_SYS_PTRACE instead: with it, a VM's QEMU could ptrace root's processes)."""
    try:
        if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "0":
            return (
                " (QEMU runs unprivileged, and this host's vm.unprivileged_userfaultfd is 0: post-copy needs it "
                "set to 1 by the administrator; migrate without --postcopy)"
            )
    except OSError:
        pass
    return ""


def host_reserved_mib() -> int:
    """Memory this host keeps for itself, never promised to an incoming VM (VMKIT_HOST_RESERVED_MIB, as the
    reserve Proxmox and oVirt keep for the host; 0 by default)."""
    try:
        return max(0, int(os.environ.get("VMKIT_HOST_RESERVED_MIB", "0")))
    except ValueError:
        return 0


def incoming_stall_s() -> float:
    """How long an incoming migration may go without a byte arriving (VMKIT_INCOMING_STALL_S; tests shorten it)."""
    return float(os.environ.get("VMKIT_INCOMING_STALL_S", "30"))


_SETTLED = ("completed", "failed", "cancelled", "postcopy-active")


async def _incoming_status(mon: Monitor) -> str:
    """The incoming migration's status here. It may say completed a moment after the source's: its MIGRATION
    event is awaited (registered before asking, so it cannot slip between), not polled for."""
    with mon.expect_event(EV_MIGRATION, lambda d: d.get("status") in _SETTLED) as settled:
        status = str((await mon.execute("query-migrate")).get("status", "none"))
        if status in _SETTLED:
            return status
        with contextlib.suppress(TimeoutError):
            return str((await settled.wait(5.0)).get("status"))
    return str((await mon.execute("query-migrate")).get("status", "none"))


def _available_memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return _host_memory_mib()


def _local_addresses() -> set[str]:
    """The addresses of this network namespace's interfaces (where a QEMU here can listen)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
