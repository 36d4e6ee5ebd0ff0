#!/usr/bin/env python3
"""What one spawn costs a process of the daemon's size: how long the spawning call blocks its caller (and
with it, in the daemon, the event loop), by method and by what is exec'd.

Methods:
- vfork+setsid(): subprocess.Popen as vmkit calls it today (start_new_session, pass_fds, close_fds; CPython
  3.11 still uses vfork for all of that; only preexec_fn, user=, group= or extra_groups= make it fork). The
  caller (holding the GIL) is suspended until the child has exec'd, and the child calls setsid() first.
- vfork+setsid exec: the same Popen without start_new_session, running util-linux `setsid -- argv`: the
  session is made after the exec, by setsid(1), which then execs argv in place (same pid).
- fork+setsid(): Popen with vfork disabled, as user=/group=/extra_groups=/preexec_fn would do.
- posix_spawn+setsid: os.posix_spawn(setsid=True) (glibc: clone(CLONE_VM|CLONE_VFORK), setsid() in the child).
Where the kernel's autogroups are on (/proc/sys/kernel/sched_autogroup_enabled, and the spawner in the root
cpu cgroup), setsid() moves the child into a new scheduling group; under load it then waits a scheduling
round for a CPU before it can exec, and a vfork'd caller waits with it.
Programs: /bin/true, and `setpriv --reuid --regid --clear-groups --no-new-privs --inh-caps=-all
--bounding-set=-all -- /bin/true` (how QEMU is to be launched to drop root): the second exec happens in the
child after the spawning call has returned, so it shows in "until exit", not in "call".

Each case spawns --count processes back to back from one thread, then --count at once from as many
threads. --load N runs N busy loops meanwhile, each in its own session like a QEMU under TCG.
Figures only; run as root (setpriv needs it): .venv/bin/python bench/spawn.py [--load 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETSID = "/usr/bin/setsid"
SETPRIV = [
    "setpriv",
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
    "--no-new-privs",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--",
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def grow_to_daemon_size(target_mb: float) -> list[bytearray]:
    """Import what the daemon imports, then pad with touched memory up to target_mb of RSS."""
    import uvicorn  # noqa: F401

    import vmkit.api.app  # noqa: F401
    import vmkit.services.vms  # noqa: F401

    pad = []
    missing = target_mb - rss_mb()
    if missing > 0:
        pad.append(bytearray(os.urandom(1024)) * int(missing * 1024))
    return pad


def _popen(argv: list[str], fd: int, *, new_session: bool) -> Callable[[], object]:
    p = subprocess.Popen(  # noqa: S603
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=[fd],
        start_new_session=new_session,
        close_fds=True,
    )
    return p.wait


def popen_session(argv: list[str], fd: int) -> Callable[[], object]:
    """vmkit today: the vfork'd child calls setsid() before it execs."""
    return _popen(argv, fd, new_session=True)


def popen_setsid_exec(argv: list[str], fd: int) -> Callable[[], object]:
    """The child execs util-linux setsid, which calls setsid() and execs argv in place (same pid)."""
    return _popen([SETSID, "--", *argv], fd, new_session=False)


def popen_fork(argv: list[str], fd: int) -> Callable[[], object]:
    """What Popen(user=..., group=..., extra_groups=...) or preexec_fn would do: fork, not vfork."""
    setattr(subprocess, "_USE_VFORK", False)  # noqa: B010 - a private switch (CPython 3.11+)
    try:
        return _popen(argv, fd, new_session=True)
    finally:
        setattr(subprocess, "_USE_VFORK", True)  # noqa: B010


def posix_spawn(argv: list[str], fd: int) -> Callable[[], object]:
    """glibc posix_spawn (clone with CLONE_VM|CLONE_VFORK), setsid() in the child."""
    path = argv[0] if "/" in argv[0] else f"/usr/bin/{argv[0]}"
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawn(
            path,
            argv,
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)],
            setsid=True,
        )
    finally:
        os.close(devnull)
    return lambda: os.waitpid(pid, 0)


Spawner = Callable[[list[str], int], Callable[[], object]]  # (argv, fd to pass) -> wait for it


def measure(spawn: Spawner, argv: list[str], count: int, threads: bool) -> dict[str, float]:
    """Per spawn: seconds the call blocked, and seconds until the process had exited (reaped)."""
    r, w = os.pipe()  # an fd to pass, like vmkit's QMP socket
    calls: list[float] = []
    exits: list[float] = []
    lock = threading.Lock()
    go = threading.Event()

    def one() -> None:
        go.wait()
        t0 = time.monotonic()
        wait = spawn(argv, w)
        t1 = time.monotonic()
        wait()
        t2 = time.monotonic()
        with lock:
            calls.append(t1 - t0)
            exits.append(t2 - t0)

    t0 = time.monotonic()
    if threads:
        ts = [threading.Thread(target=one) for _ in range(count)]
        for t in ts:
            t.start()
        t0 = time.monotonic()
        go.set()
        for t in ts:
            t.join()
    else:
        go.set()
        for _ in range(count):
            one()
    wall = time.monotonic() - t0
    os.close(r)
    os.close(w)
    calls.sort()
    return {
        "call_median_ms": 1000 * statistics.median(calls),
        "call_p90_ms": 1000 * calls[int(0.9 * (len(calls) - 1))],
        "call_max_ms": 1000 * calls[-1],
        "exit_median_ms": 1000 * statistics.median(exits),
        "wall_ms": 1000 * wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--rss", type=float, default=55.0, help="grow this process to about this many MB first")
    ap.add_argument("--load", type=int, default=0, help="busy loops running meanwhile, one session each")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median run is shown")
    args = ap.parse_args()
    _pad = grow_to_daemon_size(args.rss)
    busy = [
        subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True)  # noqa: S603, S607
        for _ in range(args.load)
    ]
    methods = {
        "vfork+setsid()": popen_session,
        "vfork+setsid exec": popen_setsid_exec,
        "fork+setsid()": popen_fork,
        "posix_spawn+setsid": posix_spawn,
    }
    programs = {"/bin/true": ["/bin/true"], "setpriv ... -- /bin/true": [*SETPRIV, "/bin/true"]}
    print(
        f"spawn cost from a {rss_mb():.0f} MB process, {args.count} spawns per case, {args.load} busy loops, "
        f"{os.cpu_count()} CPUs; ms, median run of {args.repeat}"
    )
    head = f"{'method':18} {'program':26} {'how':10} {'call med':>8} {'p90':>6} {'max':>6} {'exit med':>8} {'wall':>7}"
    print(head)
    try:
        for mname, spawn in methods.items():
            for pname, argv in programs.items():
                for threads in (False, True):
                    runs = sorted(
                        (measure(spawn, argv, args.count, threads) for _ in range(args.repeat)),
                        key=lambda m: m["wall_ms"],
                    )
                    m = runs[len(runs) // 2]
                    print(
                        f"{mname:18} {pname:26} {'threads' if threads else 'serial':10} "
                        f"{m['call_median_ms']:8.2f} {m['call_p90_ms']:6.2f} {m['call_max_ms']:6.2f} "
                        f"{m['exit_median_ms']:8.2f} {m['wall_ms']:7.1f}",
                        flush=True,
                    )
    finally:
        for b in busy:
            b.send_signal(signal.SIGKILL)
            b.wait()


if __name__ == "__main__":
    main()
