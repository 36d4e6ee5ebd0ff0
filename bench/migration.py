#!/usr/bin/env python3
"""Live migration figures (issue 10, "Speed"): the demo guest at 256 MiB moved between two vmkit hosts in two
cases, each next to plain QEMU driven by hand over QMP doing the same between two QEMUs on the same two hosts:
with its disk copied while it runs (`vmkit vm migrate VM REMOTE --copy-storage`), and with its disk on a shared
NFS pool both hosts define (`vmkit vm migrate VM REMOTE`: only RAM and device state move).

Hosts, as tests/e2e/test_shared_storage_e2e.py builds them: network namespaces `ha`, `hb` and a storage host
`st`, each joined by a veth pair to a bridge in a fourth (switched_lan() of tests/netns.py). `st` runs an NFSv3
server (nfs_server() of tests/storage_servers.py: rpcbind and nfs-ganesha) exporting a temp dir as /vmkit. `ha`
and `hb` each run a vmkit daemon (daemon_in(): own state dir, run dir, socket, and TLS listener VMKIT_LISTEN on
its LAN address), with a token made on each and the other added as a remote (`vmkit remote add b https://…`),
and both define pool `nas` (`vmkit pool create nas --type nfs --server ST --export /vmkit`). Nothing touches the
machine's own namespace; the server is stopped and the namespaces (and whatever still runs in them) deleted at
the end, also on failure or SIGTERM.

Each case: its VM made on a (copy: `--image demo`, an overlay in pool default; shared: `--image demo --copy
--pool nas`, a full copy on the export), started and booted to VMKIT-DEMO-READY; then --runs rounds (7), a→b in
even rounds and b→a in odd ones, each a vmkit migration then a plain QEMU one, so both share the machine's load
of the moment; the idle guests rest IDLE_S between migrations. The VM is deleted before the next case.

vmkit: the wall time of `POST /v1/vms/VM/migrate {"remote": …, "copy_storage": true}` (shared: false) until
GET /v1/operations/ID?wait_s=… says it has succeeded, as a client sees it; the operation's result (downtime_ms,
total_s); QEMU's own figures from the source's query-migrate once completed (total-time, setup-time, downtime),
read back from the source VM's QMP log (state dir vms/VM/qmp.log, opened before the call: the VM's dir goes with
it) and the destination's. The logs' timestamps split the time into PHASES and EXTRAS, and give how long the
guest was really paused: the source's STOP event to the destination's RESUME (QEMU's `downtime` ends when the
source has sent the last bytes, before the mirrors are cancelled and the destination is told to `cont`).

Plain QEMU: the argv vmkit ran the VM with on the destination of its first migration (RUN/vms/VM/argv.json),
turned into a plain argv by bench/replay.py (paths for vmkit's descriptors), without its -incoming; the QEMUs are
spawned in the hosts' namespaces, as root (vmkit's run as the VM's own uid). Copy: a flat disk; the first source
boots from a copy of vmkit's disk (qemu-img convert -U). Shared: the disk's `-blockdev driver=nfs,…` node as
vmkit wrote it (QEMU's own NFS client), pointed at plain QEMU's own copy of vmkit's disk on the export
(qemu-img convert -U there), which both sides' QEMUs open. Each migration: prepare (copy: an empty qcow2 of the
disk's size; the destination spawned with `-S -incoming defer`, a tls-creds-psk server object, copy:
`nbd-server-start` + `nbd-server-add` writable; migrate-set-parameters tls-creds, `migrate-incoming`), mirror (a
tls-creds-psk client object; copy: an NBD client node, `blockdev-mirror sync=full` until ready), migrate
(max-bandwidth uncapped, downtime-limit the first one vmkit set, `migrate` until the MIGRATION event says
completed, query-migrate), finish (copy: `block-job-cancel`, the job dismissed, the NBD node deleted; the
destination's MIGRATION completed event, copy: `nbd-server-stop`; `cont`, the TLS object deleted), cleanup
(source `quit` until the process is gone; copy: its disk deleted): vmkit's sequence with the same TLS-PSK files
(keys.psk, and RFC 7919's ffdhe2048 as dh-params.pem: vmkit/qemu/migrate.py's write_psk), without its bookkeeping
(volumes, definitions, journal, the HTTPS calls between the daemons). "vmkit's own time" is vmkit's median minus
plain QEMU's: of the totals, and of the totals without QEMU's migration (total − total-time).

Not measured: iSCSI pools (the same migration of RAM and device state; tests/e2e/test_shared_storage_e2e.py
covers it), and libvirt (not installed here). 512 MiB are faulted in before each migration (see prefault() in
bench/concurrent_start.py). Prints tables; never fails on timing. Run as root: `make bench` (or
.venv/bin/python bench/migration.py; --qmp-logs DIR keeps vmkit's QMP logs of each migration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.qmp import EventListener, QMPClient  # noqa: E402

from bench.concurrent_start import prefault  # noqa: E402
from bench.network import in_netns  # noqa: E402
from bench.replay import med, own, plain_argv, stats, table, wait_ready  # noqa: E402
from tests.conftest import Daemon  # noqa: E402 - the same daemon harness the tests use
from tests.netns import Netns, daemon_in, switched_lan  # noqa: E402
from tests.storage_servers import nfs_server  # noqa: E402
from vmkit.qemu.migrate import PSK_USER, write_psk  # noqa: E402 - vmkit's TLS-PSK files, for plain QEMU too

MEMORY_MIB = 256
API_PORT = 8443
POOL = "nas"  # the shared pool, NFS, on both hosts
EXPORT = "/vmkit"
NBD_PORT = 10809  # plain QEMU's fixed ports (vmkit's destination binds port 0); nothing else listens there
MIGRATION_PORT = 4444
MAX_BANDWIDTH = 2**63 - 1  # vmkit's: no cap
DOWNTIME_LIMIT_MS = 300  # QEMU's default; plain QEMU sets the first limit vmkit set instead when there is one
TARGET_DOWNTIME_MS = 50
TARGET_OWN_S = 0.2
PREFAULT_BYTES = 512 << 20
IDLE_S = 1.0  # between migrations: the guest settles
PHASES = {
    "prepare": "prepare: destination ready (vmkit: POST /v1/migrations/incoming, until the source's first QMP command)",
    "mirror": "mirror: TLS object, NBD client node, blockdev-mirror until ready",
    "migrate": "migrate: RAM and device state, until query-migrate says completed",
    "finish": "finish: mirrors cancelled, destination nbd-server-stop and cont (answered)",
    "cleanup": "cleanup: source QEMU quit, its VM and disk deleted (vmkit: until the client sees success)",
}
EXTRAS = {
    "destination QMP up": "… prepare: destination QEMU's QMP up (from the start)",
    "dh": "… prepare: destination's tls-creds-psk object-add (DH parameters given: ffdhe2048)",
    "destination listening": "… prepare: destination's migrate-incoming answered (from the start)",
    "mirrors cancelled": "… finish: mirrors cancelled, NBD node deleted (from completed)",
    "destination finished": "… finish: destination's cont answered (from the mirrors cancelled)",
    "source quit": "… cleanup: source QEMU's quit sent (from the destination's cont)",
}


@dataclass(frozen=True)
class Case:
    """What is measured: the VM's disk copied (--copy-storage), or on the shared pool and left there."""

    vm: str
    shared: bool
    title: str


COPY = Case("mig", False, "with storage copy (vm migrate --copy-storage; TLS-PSK on the NBD and migration streams, "
            "both sides)")  # fmt: skip
SHARED = Case("mignfs", True, f"on shared storage (vm migrate without --copy-storage; the disk on NFS pool {POOL}, "
              "served by ganesha from a third host; TLS-PSK on the migration stream)")  # fmt: skip
# The shared case's labels where they differ: nothing to mirror, cancel or delete.
SHARED_PHASES = PHASES | {
    "mirror": "mirror: none, the source's TLS object only (vmkit: until its first migrate-set-capabilities)",
    "finish": "finish: destination's cont (answered)",
    "cleanup": "cleanup: source QEMU quit, its VM deleted, not its disk (vmkit: until the client sees success)",
}
SHARED_EXTRAS = {k: v for k, v in EXTRAS.items() if k != "mirrors cancelled"} | {
    "destination finished": "… finish: destination's cont answered (from completed)",
}


@dataclass
class Host:
    name: str  # the remote's name the other host knows it by
    d: Daemon
    ns: Netns
    addr: str
    enter: Callable[[], None] = field(init=False)

    def __post_init__(self) -> None:
        self.enter = in_netns(self.ns)


@dataclass
class Run:
    """One migration: total wall time, its phases, how long the guest was paused, QEMU's query-migrate."""

    total: float
    phases: dict[str, float]
    paused_ms: float | None
    qemu: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)  # vmkit's operation result
    extra: dict[str, float] = field(default_factory=dict)
    limits: list[int] = field(default_factory=list)  # the downtime-limit values set, in order
    # query-migrate answered just after the completed event still said total-time 0 and downtime 0: QEMU sets
    # them a moment later (migration_calculate_complete). Both ask again (vmkit's are left out if it did not).
    raced: bool = False
    final: bool = True  # total-time and downtime in qemu are QEMU's final ones


def fresh() -> None:
    prefault(PREFAULT_BYTES)


def event_time(ev: dict[str, Any]) -> float:
    """An event's own timestamp (QEMU's wall clock when it emitted it)."""
    ts = ev.get("timestamp") or {}
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


@contextlib.contextmanager
def hosts() -> Iterator[tuple[Host, Host, Path]]:
    """Hosts a and b and a storage host on a LAN of their own, a and b each a remote of the other, both with pool
    POOL: the storage host's NFS export EXPORT. Yields a, b and the exported directory."""
    export = Path(tempfile.mkdtemp(prefix="vmkit-bench-nfs-"))
    try:
        with (
            switched_lan("ha", "hb", "st") as (_, [(ha, a_addr), (hb, b_addr), (st, st_addr)]),
            nfs_server(st, export, EXPORT),
            daemon_in(ha, "vmkit-bench-miga-", {"VMKIT_LISTEN": f"{a_addr}:{API_PORT}"}) as a,
            daemon_in(hb, "vmkit-bench-migb-", {"VMKIT_LISTEN": f"{b_addr}:{API_PORT}"}) as b,
        ):
            ha_, hb_ = Host("a", a, ha, a_addr), Host("b", b, hb, b_addr)
            for src, dst in ((ha_, hb_), (hb_, ha_)):
                secret = json.loads(dst.d.cli("token", "create", f"from-{src.name}", "--json").stdout)["secret"]
                src.d.cli("remote", "add", dst.name, f"https://{dst.addr}:{API_PORT}", "--token", secret)
                src.d.cli("pool", "create", POOL, "--type", "nfs", "--server", st_addr, "--export", EXPORT)
            yield ha_, hb_, export
    finally:
        shutil.rmtree(export, ignore_errors=True)


# ----- vmkit, through the API --------------------------------------------------------------------------------


def qmp_log(text: str, since: float = 0.0) -> list[tuple[float, str, dict[str, Any]]]:
    """A vmkit QMP log's lines (time, arrow, message), from `since` on."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            ts, arrow, body = line.split(" ", 2)
            if float(ts) >= since:
                out.append((float(ts), arrow, json.loads(body)))
    return out


class Timeline:
    """What one QEMU's QMP log says: when each command was sent and answered, and its events."""

    def __init__(self, lines: list[tuple[float, str, dict[str, Any]]]) -> None:
        self.first = lines[0][0] if lines else 0.0
        self.sent: list[tuple[float, str, Any]] = []  # (time, command, id)
        self.args: list[tuple[str, dict[str, Any]]] = []
        self.answers: dict[Any, tuple[float, Any]] = {}
        self.events: list[dict[str, Any]] = []
        for ts, arrow, msg in lines:
            if arrow == "->" and "execute" in msg:
                self.sent.append((ts, msg["execute"], msg.get("id")))
                self.args.append((msg["execute"], msg.get("arguments") or {}))
            elif "event" in msg:
                self.events.append(msg | {"logged": ts})
            elif "id" in msg:
                self.answers[msg["id"]] = (ts, msg.get("return"))

    def sent_at(self, cmd: str, last: bool = False) -> float:
        times = [t for t, c, _ in self.sent if c == cmd]
        if not times:
            raise LookupError(f"no {cmd} in the QMP log")
        return times[-1] if last else times[0]

    def answered_at(self, cmd: str, last: bool = False) -> float:
        times = [self.answers[i][0] for _, c, i in self.sent if c == cmd and i in self.answers]
        if not times:
            raise LookupError(f"no answer to {cmd} in the QMP log")
        return times[-1] if last else times[0]

    def arguments(self, cmd: str) -> list[dict[str, Any]]:
        return [a for c, a in self.args if c == cmd]

    def completed(self) -> tuple[float, dict[str, Any], bool]:
        """When query-migrate first said completed, its last answer that says so (vmkit asks again until QEMU has
        filled in its figures), and whether the first one still lacked them."""
        done = [
            (ts, ret)
            for ts, ret in (self.answers[i] for _, c, i in self.sent if c == "query-migrate" and i in self.answers)
            if isinstance(ret, dict) and ret.get("status") == "completed"
        ]
        if not done:
            raise LookupError("no completed query-migrate in the QMP log")
        return done[0][0], done[-1][1], not done[0][1].get("total-time")

    def event(self, name: str, pred: Callable[[dict[str, Any]], bool] = lambda _: True) -> dict[str, Any]:
        for ev in self.events:
            if ev["event"] == name and pred(ev.get("data") or {}):
                return ev
        raise LookupError(f"no {name} event in the QMP log")


def vmkit_migrate(case: Case, src: Host, dst: Host, i: int, keep: Path | None) -> Run:
    """Migrate the case's VM from src to dst through src's API; the figures from the client's clock and both QMP
    logs."""
    fresh()
    src_log, dst_log = (h.d.state_dir / "vms" / case.vm / "qmp.log" for h in (src, dst))
    with open(src_log, "rb") as log:
        log.seek(0, os.SEEK_END)
        w0, t0 = time.time(), time.monotonic()
        body = {"remote": dst.name, "copy_storage": not case.shared}
        op = src.d.api.post(f"/v1/vms/{case.vm}/migrate", body)["operation"]
        while op["status"] == "running":
            op = src.d.api.get(f"/v1/operations/{op['id']}?wait_s=10")
        took = time.monotonic() - t0
        src_text = log.read().decode(errors="replace")
    if op["status"] != "success":
        raise RuntimeError(f"migration {src.name}→{dst.name}: {op.get('error')}")
    if keep is not None:  # --qmp-logs
        (keep / f"{case.vm}-{i + 1}-{src.name}-source.qmp.log").write_text(src_text)
        shutil.copy(dst_log, keep / f"{case.vm}-{i + 1}-{dst.name}-destination.qmp.log")
    s = Timeline(qmp_log(src_text, w0))
    d = Timeline(qmp_log(dst_log.read_text(), w0))
    s_first = min(s.sent_at("add-fd"), s.sent_at("object-add"))
    s_done, info, raced = s.completed()
    if case.shared:  # nothing to mirror nor cancel: the migration's own set-up starts once the TLS object is made
        s_ready, s_cancelled = s.sent_at("migrate-set-capabilities"), s_done
    else:
        s_ready = s.event("JOB_STATUS_CHANGE", lambda e: e.get("status") == "ready")["logged"]
        s_cancelled = s.answered_at("blockdev-del", last=True)
    d_cont = d.answered_at("cont")
    stop, resume = s.event("STOP"), d.event("RESUME")
    limits = [int(a["downtime-limit"]) for a in s.arguments("migrate-set-parameters") if "downtime-limit" in a]
    extra = {"destination QMP up": d.first - w0, "dh": d.answered_at("object-add") - d.sent_at("object-add"),
             "destination listening": d.answered_at("migrate-incoming") - w0,
             "destination finished": d_cont - s_cancelled}  # fmt: skip
    if not case.shared:
        extra["mirrors cancelled"] = s_cancelled - s_done
    with contextlib.suppress(LookupError):
        extra["source quit"] = s.sent_at("quit") - d_cont
    return Run(
        total=took,
        phases={
            "prepare": s_first - w0,
            "mirror": s_ready - s_first,
            "migrate": s_done - s_ready,
            "finish": d_cont - s_done,
            "cleanup": w0 + took - d_cont,
        },  # fmt: skip
        paused_ms=(event_time(resume) - event_time(stop)) * 1000,
        qemu=info,
        result=op.get("result") or {},
        extra=extra,
        limits=limits,
        raced=raced,
        final=bool(info.get("total-time")),
    )


def where(name: str, a: Host, b: Host) -> Host:
    for h in (a, b):
        if any(v["name"] == name for v in h.d.api.get("/v1/vms")):
            return h
    raise RuntimeError(f"VM {name} is on neither host")


# ----- plain QEMU, by hand over QMP --------------------------------------------------------------------------


def listen(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(16)
    return s


def psk_files(directory: Path, key_hex: str) -> None:
    """vmkit's TLS-PSK files (keys.psk, dh-params.pem) in a fresh directory, root's."""
    shutil.rmtree(directory, ignore_errors=True)
    write_psk(directory, key_hex, 0)


class Plain:
    """Plain QEMU on one host: vmkit's argv as bench/replay.py rewrites it, spawned in the host's namespace."""

    def __init__(self, host: Host, argv: list[str], work: Path, disk: Path | None = None) -> None:
        self.host = host
        self.argv = argv
        self.work = work
        self.disk = disk or work / "disk0.qcow2"  # the path plain_argv put in the argv (shared: on the export)
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self.events = EventListener()
        self.seen: list[dict[str, Any]] = []

    @property
    def q(self) -> QMPClient:
        assert self.qmp is not None
        return self.qmp

    async def spawn(self, extra: list[str]) -> None:
        sock = listen(self.work / "qmp.sock")
        mon = f"socket,id=mon0,fd={sock.fileno()},"
        argv = [re.sub(r"^socket,id=mon0,fd=\d+,", mon, a) for a in self.argv] + extra
        with open(self.work / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603, PLW1509 - the bench is single-threaded
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[sock.fileno()],
                preexec_fn=self.host.enter,
            )  # fmt: skip
        sock.close()
        self.qmp = QMPClient(f"plain-{self.host.name}")
        await self.qmp.connect(str(self.work / "qmp.sock"))
        self.events = EventListener()
        self.q.register_listener(self.events)
        self.seen = []

    async def x(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.q.execute(cmd, args)

    async def event(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 120) -> dict[str, Any]:
        """The next event pred accepts (events seen on the way are kept in self.seen)."""
        while True:
            ev: Any = await asyncio.wait_for(self.events.get(), timeout_s)
            ev = dict(ev)
            self.seen.append(ev)
            if pred(ev):
                return ev

    def drain(self) -> None:
        self.seen += [dict(ev) for ev in self.events.clear()]

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await self.x("quit")
        with contextlib.suppress(Exception):
            await self.q.disconnect()
        self.qmp = None
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait, 30)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def _job(job: str, *statuses: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e["event"] == "JOB_STATUS_CHANGE" and e["data"].get("id") == job and e["data"]["status"] in statuses
    )


async def plain_migrate(src: Plain, dst: Plain, size: int, limit_ms: int, shared: bool) -> Run:
    """One migration src → dst by hand, as vmkit's sequence (see the module's docstring); shared: both open the
    same disk, nothing is mirrored."""
    fresh()
    addr = dst.host.addr
    psk = secrets.token_hex(32)
    events = {"capabilities": [{"capability": "events", "state": True}]}
    src.drain()
    src.seen = []
    w0, t0 = time.time(), time.monotonic()
    # prepare: the destination, waiting for both streams (shared: for the migration's)
    if not shared:
        dst.disk.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst.disk), str(size)], check=True)  # noqa: S603
    psk_files(dst.work / "tls", psk)
    await dst.spawn(["-S", "-incoming", "defer"])
    t_up = time.time()
    await dst.x("object-add", {"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": "server",
                               "dir": str(dst.work / "tls")})  # fmt: skip
    t_dh = time.time() - t_up
    if not shared:
        nbd = {"type": "inet", "data": {"host": addr, "port": str(NBD_PORT)}}
        await dst.x("nbd-server-start", {"addr": nbd, "tls-creds": "tls0"})
        await dst.x("nbd-server-add", {"device": "disk0", "name": "disk0", "writable": True})
    await dst.x("migrate-set-capabilities", events)
    await dst.x("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": ""})
    await dst.x("migrate-incoming", {"uri": f"tcp:{addr}:{MIGRATION_PORT}"})
    t_prepared = time.monotonic()
    t_listening = time.time()
    # mirror (shared: the TLS object only)
    psk_files(src.work / "tls", psk)
    await src.x("object-add", {"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": "client",
                               "username": PSK_USER, "dir": str(src.work / "tls")})  # fmt: skip
    if not shared:
        server = {"type": "inet", "host": addr, "port": str(NBD_PORT)}
        await src.x("blockdev-add", {"driver": "nbd", "node-name": "disk0-mig", "server": server, "export": "disk0",
                                     "tls-creds": "tls0"})  # fmt: skip
        await src.x("blockdev-mirror", {"job-id": "mirror", "device": "disk0", "target": "disk0-mig",
                                        "sync": "full", "auto-dismiss": False})  # fmt: skip
        ready = await src.event(_job("mirror", "ready", "concluded"))
        if ready["data"]["status"] != "ready":
            raise RuntimeError(f"plain QEMU: the mirror ended: {await src.x('query-jobs')}")
    t_ready = time.monotonic()
    # migrate
    await src.x("migrate-set-capabilities", events)
    await src.x("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "", "max-bandwidth": MAX_BANDWIDTH,
                                           "downtime-limit": limit_ms})  # fmt: skip
    await src.x("migrate", {"uri": f"tcp:{addr}:{MIGRATION_PORT}"})
    end = await src.event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed",
                                                                                          "cancelled"))  # fmt: skip
    info = await src.x("query-migrate")
    if end["data"]["status"] != "completed":
        raise RuntimeError(f"plain QEMU: migration {end['data']['status']}: {info}")
    t_done = time.monotonic()
    # finish
    if not shared:
        await src.x("block-job-cancel", {"device": "mirror", "force": True})
        await src.event(_job("mirror", "concluded"))
        await src.x("job-dismiss", {"id": "mirror"})
        await src.x("blockdev-del", {"node-name": "disk0-mig"})
    t_cancelled = time.monotonic()
    incoming = await dst.event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"))
    if incoming["data"]["status"] != "completed":
        raise RuntimeError("plain QEMU: the incoming migration failed")
    if not shared:
        await dst.x("nbd-server-stop")
    await dst.x("cont")
    await dst.x("object-del", {"id": "tls0"})
    t_cont = time.monotonic()
    raced = not info.get("total-time")
    for _ in range(100):  # QEMU's final figures, asked again if need be (not timed)
        if info.get("total-time"):
            break
        await asyncio.sleep(0.01)
        info = await src.x("query-migrate")
    t_asked = time.monotonic()
    # cleanup: the source goes, with its disk (shared: the destination's now)
    await src.quit()
    if not shared:
        src.disk.unlink()
    shutil.rmtree(src.work / "tls", ignore_errors=True)
    shutil.rmtree(dst.work / "tls", ignore_errors=True)
    took = time.monotonic() - t0 - (t_asked - t_cont)
    stop = next(e for e in src.seen if e["event"] == "STOP")
    resume = await dst.event(lambda e: e["event"] == "RESUME", timeout_s=10)
    return Run(
        total=took,
        phases={
            "prepare": t_prepared - t0,
            "mirror": t_ready - t_prepared,
            "migrate": t_done - t_ready,
            "finish": t_cont - t_done,
            "cleanup": t0 + took - t_cont,
        },
        paused_ms=(event_time(resume) - event_time(stop)) * 1000,
        qemu=dict(info),
        extra={
            "destination QMP up": t_up - w0,
            "dh": t_dh,
            "destination listening": t_listening - w0,
            "destination finished": t_cont - t_cancelled,
        }
        | ({} if shared else {"mirrors cancelled": t_cancelled - t_done}),
        limits=[limit_ms],
        raced=raced,
        final=bool(info.get("total-time")),
    )


def plain_setup(case: Case, h: Host, a: Host, b: Host, work: Path, export: Path) -> tuple[Plain, Plain, int]:
    """Plain QEMU's two sides from the argv vmkit ran the VM with on h, where it has just arrived (without its
    -incoming defer), and the first source's disk: a copy of vmkit's (qemu-img convert -U, the idle guest running),
    on a (copy: vmkit's was a flat disk) or on the export, where the argv's NFS node is pointed to it (shared);
    returns the disk's virtual size too."""
    argv = json.loads((h.d.run_dir / "vms" / case.vm / "argv.json").read_text())
    vm = h.d.vm(case.vm)
    if "-incoming" in argv:
        i = argv.index("-incoming")
        del argv[i : i + 2]
    disk = vm["disks"][0]
    source, own_disk = disk["path"], None
    if case.shared:  # the NFS node stays as vmkit wrote it (plain_argv leaves all but /dev/fdset paths alone)
        url_path = urlsplit(disk["path"]).path
        source = str(export / Path(url_path).relative_to(EXPORT))
        own_disk = export / f"plain-{Path(url_path).name}"
        node = f"path={url_path},"
        if not any(node in a for a in argv):
            raise RuntimeError(f"no NFS node {node} in the argv vmkit ran the VM with on {h.name}")
        argv = [a.replace(node, f"path={EXPORT}/{own_disk.name},") for a in argv]
        vm = vm | {"disks": []}  # no local overlay to make
    sides = []
    for host in (a, b):
        out, listener = plain_argv(argv, vm, work / host.name)
        listener.close()
        sides.append(Plain(host, out, work / host.name, own_disk))
    img = ["qemu-img", "info", "-U", "-f", disk["format"], "--output=json", source]
    info = json.loads(subprocess.run(img, capture_output=True, check=True).stdout)  # noqa: S603
    if info.get("backing-filename"):
        raise RuntimeError(f"the VM's disk on {h.name} has a backing image: plain QEMU's argv would not fit it")
    for path in {side.disk for side in sides}:
        path.unlink(missing_ok=True)  # plain_argv's overlays
    convert = ["qemu-img", "convert", "-U", "-f", disk["format"], "-O", disk["format"], source, str(sides[0].disk)]
    subprocess.run(convert, check=True)  # noqa: S603
    for p in sides:
        (p.work / "serial.log").unlink(missing_ok=True)
    return sides[0], sides[1], int(info["virtual-size"])


async def measure(
    case: Case, a: Host, b: Host, work: Path, export: Path, runs: int, keep: Path | None
) -> tuple[list[Run], list[Run], str]:
    """runs rounds, each a vmkit migration then a plain QEMU one, a→b in even rounds and b→a in odd ones (so both
    see the machine's load of the moment). Plain QEMU is set up after vmkit's first migration (its argv is the
    destination's). Returns vmkit's runs, plain QEMU's, and vmkit's first failure (its later rounds skipped)."""
    vm: list[Run] = []
    plain: list[Run] = []
    failed = ""
    sides: tuple[Plain, Plain] | None = None
    size, limit = 0, DOWNTIME_LIMIT_MS
    try:
        for i in range(runs):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            if not failed:
                try:
                    vm.append(await asyncio.to_thread(vmkit_migrate, case, src, dst, i, keep))
                    if (state := dst.d.vm(case.vm)["state"]) != "running":
                        raise RuntimeError(f"the VM is {state} on {dst.name} afterwards")
                except Exception as e:  # noqa: BLE001 - reported, not raised: plain QEMU goes on
                    failed = f"run {i + 1} ({src.name}→{dst.name}): {e}"
                await asyncio.sleep(IDLE_S)
            if sides is None:
                if not vm:
                    return vm, plain, failed  # no argv of vmkit's to replay
                pa, pb, size = plain_setup(case, dst, a, b, work, export)
                sides = (pa, pb)
                limit = vm[0].limits[0] if vm[0].limits else DOWNTIME_LIMIT_MS
                await pa.spawn([])
                await asyncio.to_thread(wait_ready, pa.work / "serial.log")
                await asyncio.sleep(IDLE_S)
            psrc, pdst = sides if i % 2 == 0 else sides[::-1]
            plain.append(await plain_migrate(psrc, pdst, size, limit, case.shared))
            await asyncio.sleep(IDLE_S)
    finally:
        for p in sides or ():
            await p.quit()
            p.kill()
        if sides and case.shared:
            sides[0].disk.unlink(missing_ok=True)
    return vm, plain, failed


def run_case(
    case: Case, a: Host, b: Host, work: Path, export: Path, runs: int, keep: Path | None
) -> tuple[list[Run], list[Run], str]:
    """The case's VM made on a, booted, measured, and deleted again."""
    spec = {"name": case.vm, "image": "demo", "memory_mib": MEMORY_MIB}
    a.d.api.post("/v1/vms", spec | ({"image_copy": True, "pool": POOL} if case.shared else {}))
    try:
        a.d.api.post(f"/v1/vms/{case.vm}/start")
        wait_ready(a.d.state_dir / "vms" / case.vm / "serial.log")
        time.sleep(IDLE_S)
        return asyncio.run(measure(case, a, b, work / case.vm, export, runs, keep))
    finally:
        with contextlib.suppress(Exception):  # the daemons' clean-up kills what is left anyway
            h = where(case.vm, a, b)
            h.d.api.post(f"/v1/vms/{case.vm}/destroy")
            h.d.api.request("DELETE", f"/v1/vms/{case.vm}")


# ----- report ------------------------------------------------------------------------------------------------


def fig(r: Run, key: str) -> Any:
    """One of QEMU's query-migrate figures; None for total-time and downtime when they were not final yet."""
    return None if not r.final and key in ("total-time", "downtime") else r.qemu.get(key)


def getter(attr: str, key: str) -> Callable[[Run], Any]:
    """A run's figure `key` of its dict `attr` (phases, extra)."""
    return lambda r: getattr(r, attr).get(key)


def col(runs: list[Run], get: Callable[[Run], Any]) -> list[float]:
    return [float(v) for v in (get(r) for r in runs) if v is not None]


def report(results: dict[Case, tuple[list[Run], list[Run], str]], runs: int, took: float) -> None:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"live migration: demo guest, {MEMORY_MIB} MiB, idle, accelerator {os.environ.get('VMKIT_ACCEL', 'tcg')}, "
        f"{os.cpu_count()} CPUs, {runs} runs a→b, b→a alternately between two hosts (network namespaces on a veth "
        f"LAN with an NFS server; bench took {took:.0f} s; load average at the end {load})"
    )
    print("shared storage on iSCSI: not measured (the same migration as on NFS: RAM and device state only)")
    print("libvirt: not installed here: its column is not measured")
    for case, (vm, plain, failed) in results.items():
        report_case(case, vm, plain, failed)


def report_case(case: Case, vm: list[Run], plain: list[Run], failed: str) -> None:
    if failed:
        print(f"\nvmkit's migration {case.title.split(' (')[0]} failed: {failed}")
    ms: dict[str, Any] = {"unit": "ms", "scale": 1.0, "digits": 0}

    def both(get: Callable[[Run], Any], **kw: Any) -> tuple[str, str]:
        return stats(col(vm, get), **kw), stats(col(plain, get), **kw)

    total_v, total_p = col(vm, lambda r: r.total), col(plain, lambda r: r.total)
    out_v = col(vm, lambda r: r.total - fig(r, "total-time") / 1000 if fig(r, "total-time") else None)
    out_p = col(plain, lambda r: r.total - fig(r, "total-time") / 1000 if fig(r, "total-time") else None)

    def verdict(v: list[float], p: list[float]) -> str:
        if not v or not p:
            return ""
        return f"own <= {TARGET_OWN_S} s ({'met' if med(v) - med(p) <= TARGET_OWN_S else 'missed'})"

    down_v = col(vm, lambda r: fig(r, "downtime"))
    down_ok = f"<= {TARGET_DOWNTIME_MS} ms" + (
        "" if not down_v else f" ({'met' if med(down_v) <= TARGET_DOWNTIME_MS else 'missed'})"
    )
    first = sorted({r.limits[0] for r in vm if r.limits})
    highest = max((max(r.limits) for r in vm if r.limits), default=None)
    limits_v = f"first {'/'.join(map(str, first))} ms, highest {highest} ms" if first else "-"
    limits_p = f"{plain[0].limits[0]} ms (vmkit's first)" if plain and plain[0].limits else "-"
    head = ("figure", "vmkit (median, min, max)", "plain QEMU", "vmkit's own time", "target", "libvirt")
    ram = lambda r: (r.qemu.get("ram") or {}).get("transferred")  # noqa: E731
    table(
        case.title,
        head,
        [
            ("total (vmkit: POST …/migrate until its operation succeeded)", stats(total_v), stats(total_p),
             own(total_v, total_p), verdict(total_v, total_p), "not measured"),
            ("… outside QEMU's migration (total − query-migrate total-time)", stats(out_v), stats(out_p),
             own(out_v, out_p), verdict(out_v, out_p), ""),
            ("… vmkit's result total_s (its own clock, before the delete)",
             stats(col(vm, lambda r: r.result.get("total_s"))), "", "", "", ""),
            ("downtime, QEMU's (query-migrate)", *both(lambda r: fig(r, "downtime"), **ms), "", down_ok,
             "not measured"),
            ("… vmkit's result downtime_ms", stats(col(vm, lambda r: r.result.get("downtime_ms")), **ms), "", "", "",
             ""),
            ("… downtime-limit set", limits_v, limits_p, "", "", ""),
            ("guest paused: source STOP to destination RESUME", *both(lambda r: r.paused_ms, **ms), "", "", ""),
            ("QEMU total-time (query-migrate)", *both(lambda r: fig(r, "total-time"), **ms), "", "", ""),
            ("QEMU setup-time (query-migrate)", *both(lambda r: fig(r, "setup-time"), **ms), "", "", ""),
            ("RAM transferred", *both(ram, unit="MiB", scale=2**-20, digits=1), "", "", ""),
        ],
    )  # fmt: skip
    raced_v, raced_p = sum(r.raced for r in vm), sum(r.raced for r in plain)
    if raced_v or raced_p:
        print(f"query-migrate asked right after the completed event still said total-time 0 and downtime 0 in "
              f"{raced_v} of {len(vm)} vmkit runs and {raced_p} of {len(plain)} plain ones (both asked again; "
              f"{sum(not r.final for r in vm)} vmkit runs left out above for want of final figures): QEMU sets them "
              "a moment after it says completed")  # fmt: skip
    rows = []
    for k, label in (SHARED_PHASES if case.shared else PHASES).items():
        v, p = col(vm, getter("phases", k)), col(plain, getter("phases", k))
        rows.append((label, stats(v), stats(p), own(v, p)))
    for k, label in (SHARED_EXTRAS if case.shared else EXTRAS).items():
        v, p = col(vm, getter("extra", k)), col(plain, getter("extra", k))
        rows.append((label, stats(v), stats(p), own(v, p)))
    table("where the time goes (vmkit: from both QMP logs' timestamps)",
          ("phase", "vmkit (median, min, max)", "plain QEMU", "vmkit's own time"), rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--qmp-logs", type=Path, help="keep the QMP logs of vmkit's migrations in this directory")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the clean-up below runs on SIGTERM too

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vmkit-bench-mig-"))
    work.chmod(0o711)
    try:
        with hosts() as (a, b, export):
            results = {case: run_case(case, a, b, work, export, args.runs, args.qmp_logs) for case in (COPY, SHARED)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    took = time.monotonic() - started
    if args.json:
        out = {("shared" if case.shared else "copy"): {"vmkit": [r.__dict__ for r in vm],
                                                       "plain": [r.__dict__ for r in pl], "failed": failed}
               for case, (vm, pl, failed) in results.items()}  # fmt: skip
        print(json.dumps(out))
        return
    report(results, args.runs, took)


if __name__ == "__main__":
    main()
