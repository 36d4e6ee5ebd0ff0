#!/usr/bin/env python3
"""Concurrent start: N VMs started by N concurrent API calls, next to N plain QEMUs with the same argv.

Target (issue): 20 VMs started at once reach `running` within 1.3x the time 20 plain QEMUs with the same
argv, started at once, take to come up. Prints a table; never fails on timing. Run as root: `make bench`
(or .venv/bin/python bench/concurrent_start.py). It starts its own daemon in a temporary directory and removes
everything it made, QEMUs included, also when it fails or is interrupted.

One round:
- vmkit: N threads, each with its own connection, POST /v1/vms/NAME/start at the same moment; the figure is
  the time until the last of them has answered `running` (QEMU spawned, QMP negotiated, `cont` done).
- plain: the argv vmkit recorded for each VM (RUN/vms/NAME/argv.json) as bench/replay.py replays it (paths
  for the descriptors vmkit hands over, no -S, its own pre-opened QMP socket, sockets and qcow2 overlay), all
  N spawned at once, each in its own session; the figure is the time until the last of them answers
  `query-status` with `running`. (Not the QMP greeting: QEMU's monitor I/O thread sends that as soon as it
  accepts the connection, before the machine even exists.)
A warm-up round comes first and is not counted. Each round has one of each, vmkit first in odd rounds and
plain first in even ones, so each pair shares the machine's state at that moment. Before each phase the bench
samples the other load on the CPUs (printed) and faults in memory (see prefault()).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import plain_argv  # noqa: E402 - as lifecycle.py replays vmkit's argv
from tests.conftest import Daemon  # noqa: E402 - the same daemon harness the tests use
from vmkit.cli.client import ApiError, Client  # noqa: E402

TARGET_RATIO = 1.3
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one), summed over the process's threads."""
    run = wait = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                r, w, _ = (task / "schedstat").read_text().split()
                run, wait = run + int(r), wait + int(w)
    return run / 1e9, wait / 1e9


def _proc_start_s(pid: int) -> float | None:
    """Process start in CLOCK_BOOTTIME seconds (1/CLK_TCK resolution)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19]) / CLK_TCK


@dataclass
class VmkitRound:
    wall: float  # first call sent -> last `running` answer
    answers: list[float]  # per call, from t0
    spawned: list[float] = field(default_factory=list)  # QEMU process start (from /proc), from t0
    greeting: list[float] = field(default_factory=list)  # QMP greeting seen by the daemon (qmp.log), from t0
    caps_done: list[float] = field(default_factory=list)  # reply to `qmp_capabilities` (qmp.log), from t0
    cont_done: list[float] = field(default_factory=list)  # reply to `cont` (qmp.log), from t0


@dataclass
class PlainRound:
    wall: float  # first spawn -> last `running`
    spawned: list[float]  # Popen returned, from t0
    greeting: list[float]  # QMP greeting, from t0
    running: list[float]  # query-status answered `running`, from t0
    cpu: list[float]  # per QEMU, seconds on a CPU until it answered `running`
    cpu_wait: list[float]  # per QEMU, seconds runnable but waiting for a CPU until then


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def prefault(size: int) -> float:
    """Fault in `size` bytes of anonymous memory and free it again; returns the seconds it took.

    Where the machine is itself a VM whose free memory goes back to its host (virtio-balloon free page
    reporting, as on these machines: /sys/module/page_reporting), memory freed more than ~2 s ago is
    handed back, and the next process to touch it waits for the host to supply it again: the QEMUs of
    one round then spend 2-3x the CPU in the kernel (clear_page under folio_zero_user), and the round
    takes ~2.2 s instead of ~0.8 s, for plain QEMU and vmkit alike. Touching enough memory just before
    each measured phase puts freshly backed pages on the free lists, which is what QEMU then gets.
    """
    size = min(size, _mem_available() // 2)
    if size <= 0:
        return 0.0
    t0 = time.monotonic()
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    m.close()
    return time.monotonic() - t0


# ----- vmkit -----------------------------------------------------------------------------------------------


def _concurrently(d: Daemon, names: list[str], action: str) -> tuple[float, list[float], list[dict[str, Any]]]:
    """POST /v1/vms/NAME/ACTION for every name at the same moment, one thread and connection each.
    Returns (t0 in time.time(), per-call seconds from t0, answers)."""
    n = len(names)
    ready = threading.Barrier(n + 1)
    go = threading.Event()
    t0_box: list[float] = []
    took: list[float] = [0.0] * n
    answers: list[Any] = [None] * n

    def one(i: int) -> None:
        client = Client(str(d.socket), timeout_s=120)
        ready.wait()
        go.wait()
        try:
            answers[i] = client.post(f"/v1/vms/{names[i]}/{action}")
        except (ApiError, OSError) as e:
            answers[i] = e
        took[i] = time.monotonic() - t0_box[0]

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    wall0 = time.time()
    t0_box.append(time.monotonic())
    go.set()
    for t in threads:
        t.join(180)
    failed = [f"{names[i]}: {a}" for i, a in enumerate(answers) if not isinstance(a, dict)]
    if failed:
        raise RuntimeError(f"{action} failed for {len(failed)} VMs: " + "; ".join(failed[:5]))
    return wall0, took, answers


def _qmp_log_times(path: Path) -> tuple[float | None, float | None, float | None]:
    """(greeting received, `qmp_capabilities` answered, `cont` answered) in time.time() seconds, from the
    per-VM QMP log the daemon writes as it handles each message."""
    greeting = caps_done = cont_done = None
    sent = ""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, None, None
    for line in lines:
        ts, arrow, msg = line.split(" ", 2)
        if arrow == "->":
            sent = msg
        elif greeting is None and '"QMP"' in msg:
            greeting = float(ts)
        elif '"return"' in msg and '"qmp_capabilities"' in sent and caps_done is None:
            caps_done = float(ts)
        elif '"return"' in msg and '"cont"' in sent and cont_done is None:
            cont_done = float(ts)
    return greeting, caps_done, cont_done


def vmkit_round(d: Daemon, names: list[str]) -> tuple[VmkitRound, dict[str, tuple[list[str], dict[str, Any]]]]:
    """Start every VM at once; returns the figures and, per VM, the argv vmkit recorded and its record."""
    wall0, took, answers = _concurrently(d, names, "start")
    boot0 = _boottime() - (time.time() - wall0)
    not_running = [f"{a['name']}={a['state']}" for a in answers if a["state"] != "running"]
    if not_running:
        raise RuntimeError(f"start answered without `running`: {not_running}")
    r = VmkitRound(wall=max(took), answers=took)
    argvs = {}
    for a in answers:
        name = a["name"]
        argvs[name] = (json.loads((d.run_dir / "vms" / name / "argv.json").read_text()), a)
        start = _proc_start_s(a["pid"]) if a.get("pid") else None
        if start is not None:
            r.spawned.append(start - boot0)
        greeting, caps_done, cont_done = _qmp_log_times(d.state_dir / "vms" / name / "qmp.log")
        if greeting is not None:
            r.greeting.append(greeting - wall0)
        if caps_done is not None:
            r.caps_done.append(caps_done - wall0)
        if cont_done is not None:
            r.cont_done.append(cont_done - wall0)
    return r, argvs


def vmkit_stop_all(d: Daemon, names: list[str]) -> None:
    _concurrently(d, names, "destroy")
    for name in names:
        vm = d.wait_state(name, "shut off", timeout_s=20)
        if vm["state"] != "shut off":
            raise RuntimeError(f"{name} is {vm['state']} after destroy")


# ----- plain QEMU ------------------------------------------------------------------------------------------


@dataclass
class PlainQemu:
    argv: list[str]
    work: Path
    listener: socket.socket
    proc: subprocess.Popen[bytes] | None = None


def plain_prepare(argv: list[str], vm: dict[str, Any], work: Path) -> PlainQemu:
    """vmkit's argv as plain QEMU runs it by itself (bench/replay.py: paths for the descriptors vmkit hands
    over, its own sockets, serial log and qcow2 overlay in `work`, no -S), with its own pre-opened QMP
    socket as vmkit passes one. vm is the VM's record (GET /v1/vms/NAME)."""
    shutil.rmtree(work, ignore_errors=True)
    out, listener = plain_argv(argv, vm, work)
    return PlainQemu(out, work, listener)


# How plain QEMUs get their own session (as vmkit's do): "exec" runs them through util-linux `setsid`, which
# calls setsid() after the exec, so the spawning call returns at once; "child" has the forked child call it
# before the exec (subprocess's start_new_session=True): where the kernel's autogroups are on, that puts the
# child into a new scheduling group before it can exec, and under load the spawning call waits a whole
# scheduling round (~20 ms with 20 busy QEMUs) each time; "none" leaves them in this process's session.
PLAIN_SESSION = {"exec": (["setsid", "--"], False), "child": ([], True), "none": ([], False)}


def plain_round(qemus: list[PlainQemu], session: str = "exec") -> PlainRound:
    """Spawn all at once (each in its own session, as vmkit does), then wait until each says it is running.

    The QMP greeting alone does not mean that: QEMU's monitor I/O thread sends it the moment the connection
    is accepted, long before the machine is built. So after the greeting each client sends
    `qmp_capabilities` and `query-status` (answered by QEMU's main loop) and repeats `query-status` until it
    answers `running` (QEMU may answer during initialisation, from a nested main-loop poll, with `prelaunch`).
    """
    sel = selectors.DefaultSelector()
    spawned: list[float] = []
    greeting: list[float] = [float("nan")] * len(qemus)
    running: list[float] = [float("nan")] * len(qemus)
    cpu: list[float] = [float("nan")] * len(qemus)
    cpu_wait: list[float] = [float("nan")] * len(qemus)
    buf: list[bytes] = [b""] * len(qemus)
    prefix, new_session = PLAIN_SESSION[session]
    t0 = time.monotonic()
    try:
        for i, q in enumerate(qemus):
            with open(q.work / "qemu.log", "ab") as log:
                q.proc = subprocess.Popen(  # noqa: S603
                    [*prefix, *q.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=[q.listener.fileno()],
                    start_new_session=new_session,
                )
            spawned.append(time.monotonic() - t0)
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(q.work / "qmp.sock"))  # queued in the backlog of the socket QEMU inherited
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, i)
        for q in qemus:
            q.listener.close()
        pending = len(qemus)
        deadline = t0 + 120
        while pending:
            events = sel.select(max(0.0, deadline - time.monotonic()))
            if not events:
                raise TimeoutError(f"{pending} plain QEMUs not running within 120 s")
            now = time.monotonic() - t0
            for key, _ in events:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                i = key.data
                data = sock.recv(65536)
                if not data:
                    log_tail = (qemus[i].work / "qemu.log").read_text()[-500:]
                    raise RuntimeError(f"plain QEMU {i} closed QMP before running: {log_tail}")
                buf[i] += data
                *lines, buf[i] = buf[i].split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if "QMP" in msg:
                        greeting[i] = now
                        sock.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
                    elif isinstance(msg.get("return"), dict) and "status" in msg["return"]:
                        if msg["return"]["status"] == "running":
                            running[i] = now
                            assert qemus[i].proc is not None
                            cpu[i], cpu_wait[i] = _schedstat(qemus[i].proc.pid)
                            sel.unregister(sock)
                            sock.close()
                            pending -= 1
                            break
                        sock.sendall(b'{"execute":"query-status"}\n')
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return PlainRound(
        wall=max(running), spawned=spawned, greeting=greeting, running=running, cpu=cpu, cpu_wait=cpu_wait
    )


def plain_stop_all(qemus: list[PlainQemu]) -> None:
    for q in qemus:
        q.listener.close()
        if q.proc is not None and q.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                q.proc.send_signal(signal.SIGKILL)
    for q in qemus:
        if q.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                q.proc.wait(10)
            q.proc = None
        shutil.rmtree(q.work, ignore_errors=True)


# ----- report ----------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def _spread(values: list[float]) -> str:
    """Within one round: first .. median .. last."""
    if not values:
        return "-"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def _busy(seconds: float) -> float:
    """Fraction of all CPUs busy over the next `seconds` (anything else running on the machine)."""
    a = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    time.sleep(seconds)
    b = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    d = [y - x for x, y in zip(a, b, strict=True)]
    return 1 - (d[3] + d[4]) / max(1, sum(d))  # idle + iowait


def kill_by_uuid(uuids: set[str]) -> None:
    """SIGKILL every process whose argv holds `-uuid U` for one of uuids: vmkit's QEMUs (their argv names
    descriptors, not our dirs, and they outlive a stopped daemon by design) and the plain ones."""
    wanted = {u.encode() for u in uuids}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            argv = cmdline.read_bytes().split(b"\0")
            if any(a == b"-uuid" and b in wanted for a, b in zip(argv, argv[1:], strict=False)):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)


def remove_cgroups(parent: str) -> None:
    """The daemon's cgroup parent and any VM cgroups left in it."""
    with contextlib.suppress(Exception):
        from vmkit.host.cgroups import Cgroups

        cg = Cgroups.detect(parent=parent)
        if cg.mode != "none":
            for name in cg.names():
                with contextlib.suppress(Exception):
                    cg.remove(name)
            cg.remove_parent()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256, help="MiB per VM")
    ap.add_argument("--plain-session", choices=sorted(PLAIN_SESSION), default="exec", help="see PLAIN_SESSION")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    ap.add_argument(
        "--prefault-mib",
        type=int,
        default=200,
        help="MiB per VM faulted in (and freed) just before each measured phase, 0 for none; see prefault()",
    )
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of quiet between phases")
    ap.add_argument("--detail", action="store_true", help="per-round timeline (spawn, greeting, cont)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # A SIGTERM (or the Makefile's SIGINT) must still run the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="vmkit-cbench-"))
    cgroup_parent = f"vmkit-cbench-{os.getpid()}"
    d = Daemon(root, {"VMKIT_CGROUP_PARENT": cgroup_parent})
    names = [f"c{i:02d}" for i in range(args.vms)]
    uuids: set[str] = set()
    plain: list[PlainQemu] = []
    vm_rounds: list[VmkitRound] = []
    plain_rounds: list[PlainRound] = []
    background: list[float] = []

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    try:
        d.start()
        d.cli("image", "demo", timeout_s=900)
        for name in names:
            vm = d.api.post("/v1/vms", {"name": name, "image": "demo", "memory_mib": args.memory})
            uuids.add(vm["uuid"])
        recorded: dict[str, tuple[list[str], dict[str, Any]]] = {}

        def quiet() -> None:
            background.append(_busy(args.settle))
            prefault(args.prefault_mib * args.vms << 20)

        def one_vmkit() -> VmkitRound:
            quiet()
            vr, rec = vmkit_round(d, names)
            recorded.update(rec)
            vmkit_stop_all(d, names)
            return vr

        def one_plain() -> PlainRound:
            nonlocal plain
            plain = [plain_prepare(*recorded[n], root / "plain" / n) for n in names]
            quiet()
            pr = plain_round(plain, args.plain_session)
            plain_stop_all(plain)
            plain = []
            return pr

        # Warm-up (not counted): it also records the argv the plain runs replay.
        for _ in range(args.warmup):
            wv, wp = one_vmkit(), one_plain()
            say(f"warm-up: vmkit {wv.wall:.3f} s, plain {wp.wall:.3f} s")
        background.clear()
        for rnd in range(args.rounds):
            # Alternate which goes first, so neither always inherits the other's after-effects.
            if rnd % 2 == 0 or not recorded:
                vr = one_vmkit()
                pr = one_plain()
            else:
                pr = one_plain()
                vr = one_vmkit()
            vm_rounds.append(vr)
            plain_rounds.append(pr)
            say(
                f"round {rnd + 1}/{args.rounds}: vmkit {vr.wall:.3f} s, plain {pr.wall:.3f} s, "
                f"ratio {vr.wall / pr.wall:.2f}x; other load on the CPUs before each "
                f"{100 * background[-2]:.0f}%, {100 * background[-1]:.0f}%"
            )
            if args.detail:
                say(
                    f"  vmkit (s from first call, first/median/last): QEMU spawned {_spread(vr.spawned)}; "
                    f"QMP greeting {_spread(vr.greeting)}; "
                    f"capabilities answered {_spread(vr.caps_done)}; cont answered {_spread(vr.cont_done)}; "
                    f"HTTP answered {_spread(vr.answers)}\n"
                    f"  plain (s from first spawn): spawned {_spread(pr.spawned)}; "
                    f"QMP greeting {_spread(pr.greeting)}; running {_spread(pr.running)}; "
                    f"QEMU's CPU until running {_spread(pr.cpu)}, its wait for a CPU {_spread(pr.cpu_wait)}"
                )
    finally:
        plain_stop_all(plain)
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(Exception):
                for name in names:
                    if d.vm(name)["state"] != "shut off":
                        d.api.post(f"/v1/vms/{name}/destroy")
        d.cleanup()
        kill_by_uuid(uuids)
        time.sleep(0.2)
        remove_cgroups(cgroup_parent)
        shutil.rmtree(root, ignore_errors=True)

    vm_walls = [r.wall for r in vm_rounds]
    plain_walls = [r.wall for r in plain_rounds]
    ratios = [v / p for v, p in zip(vm_walls, plain_walls, strict=True)]
    ratio = statistics.median(vm_walls) / statistics.median(plain_walls)
    vm_each = [statistics.median(r.answers) for r in vm_rounds]
    plain_each = [statistics.median(r.running) for r in plain_rounds]
    took = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                {
                    "vms": args.vms,
                    "memory_mib": args.memory,
                    "vmkit_wall_s": vm_walls,
                    "plain_wall_s": plain_walls,
                    "ratio_of_medians": ratio,
                    "ratios_per_round": ratios,
                    "vmkit_median_vm_s": vm_each,
                    "plain_median_vm_s": plain_each,
                    "target_ratio": TARGET_RATIO,
                    "background_busy": background,
                    "vmkit_rounds": [r.__dict__ for r in vm_rounds],
                    "plain_rounds": [r.__dict__ for r in plain_rounds],
                    "bench_s": took,
                }
            )
        )
        return
    rows = [
        (f"vmkit: {args.vms} concurrent start calls -> all running", _stats(vm_walls), ""),
        (f"plain QEMU: {args.vms} spawned at once -> all running", _stats(plain_walls), ""),
        (
            "ratio vmkit / plain (of medians)",
            f"{ratio:.2f}x (per round {', '.join(f'{x:.2f}' for x in ratios)})",
            f"<= {TARGET_RATIO}x",
        ),
        ("vmkit: the median VM of a round -> running", _stats(vm_each), ""),
        ("plain QEMU: the median VM of a round -> running", _stats(plain_each), ""),
    ]
    head = ("figure", "median of rounds", "target")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(3)]
    print(
        f"concurrent start: {args.vms} VMs, demo guest, {args.memory} MiB, "
        f"accelerator {os.environ.get('VMKIT_ACCEL', 'tcg')}, {os.cpu_count()} CPUs, {args.rounds} rounds "
        f"(bench took {took:.0f} s)"
    )
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    busy = statistics.median(background) if background else 0.0
    note = " (a busy machine: figures spread more)" if busy > 0.1 else ""
    print(f"other load on the CPUs just before the measured phases: median {100 * busy:.0f}%{note}")


if __name__ == "__main__":
    main()
