"""Real storage servers for tests, inside a network namespace the test made (tests/netns.py): an NFSv3 server
(Debian's userspace nfs-ganesha with rpcbind) and an iSCSI target (Debian's userspace tgt).

Each runs under a bash of its own in a private mount namespace with a tmpfs on /run: rpcbind's socket
(/run/rpcbind.sock) and tgtd's control socket (/run/tgtd/socket.N) are fixed paths that every network
namespace shares, so they must not land in the host's /run, where they would clash with another test's server
or the host's own and stay behind. The bash is the servers' parent and reaps them, so nothing is left for the
host's init to collect; when the test ends (failed or not) everything is stopped and checked gone."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.netns import Netns

_count = itertools.count()

# A private /run for the servers: mounted by the bash before it starts them.
_PRIVATE_RUN = "mount -t tmpfs -o mode=0755 vmkit-test-run /run"


def _start(ns: Netns, script: str, log: Path) -> subprocess.Popen[bytes]:
    """bash running script inside ns and a private mount namespace, in a process group of its own."""
    with log.open("ab") as out:
        return ns.popen(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], what: str) -> None:
    """Stop the bash of _start (its TERM trap kills the servers and reaps them), then check none is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, 0)  # any process left in its group (the bash's pid is the group's id)?
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{what}: processes were left running in group {proc.pid}")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def ganesha_config(export_dir: Path, export: str, state: Path) -> str:
    """An NFSv3-only ganesha export of export_dir as `export`: read-write, root not squashed, AUTH_SYS, TCP."""
    return textwrap.dedent(f"""\
        NFS_CORE_PARAM {{
            Protocols = 3;
            mount_path_pseudo = true;  # NFSv3 clients mount the Pseudo path (the export name), not export_dir
            Enable_NLM = false;
            Enable_RQUOTA = false;
            Enable_UDP = false;
            Plugins_Dir = "/usr/lib/x86_64-linux-gnu/ganesha";
        }}
        NFS_KRB5 {{ Active_krb5 = false; }}
        NFSV4 {{
            Graceless = true;
            RecoveryBackend = fs;
            RecoveryRoot = "{state}/recovery";
        }}
        EXPORT {{
            Export_Id = 1;
            Path = "{export_dir}";
            Pseudo = "{export}";
            Protocols = 3;
            Access_Type = RW;
            Squash = No_Root_Squash;
            SecType = sys;
            Transports = TCP;
            FSAL {{ Name = VFS; }}
        }}
        """)


@contextlib.contextmanager
def nfs_server(ns: Netns, export_dir: Path, export: str = "/vmkit") -> Iterator[None]:
    """rpcbind + ganesha.nfsd in ns serving export_dir as NFSv3 export `export` (on every address of ns) until
    the block ends. Its config, log, pid file and recovery dir live in a temp dir removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix="vmkit-nfs-"))
    conf, log = state / "ganesha.conf", state / "ganesha.log"
    conf.write_text(ganesha_config(export_dir, export, state))
    # rpcbind first: ganesha registers mountd and nfsd with it at start. `wait -n`: if either dies the other
    # is killed and the bash ends, which the readiness loop notices.
    script = f"""
        set -e
        {_PRIVATE_RUN}
        rpcbind -f &
        trap 'kill -KILL $(jobs -p) 2>/dev/null; wait; exit 0' TERM
        for _ in $(seq 200); do [ -S /run/rpcbind.sock ] && break; sleep 0.05; done
        ganesha.nfsd -F -f {conf} -L {log} -p {state}/ganesha.pid -N NIV_EVENT &
        set +e
        wait -n
        kill -KILL $(jobs -p) 2>/dev/null
        wait
        exit 1
    """
    proc = _start(ns, script, state / "bash.log")
    try:
        probe = f"from vmkit.storage.nfs import NfsShare, probe; probe(NfsShare('127.0.0.1', {export!r}), 2)"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ganesha stopped: {_tail(state / 'bash.log')}\n{_tail(log)}")
            res = ns.python(probe, check=False, timeout=30)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"ganesha not ready: {res.stderr[-2000:]}\n{_tail(log)}")
            time.sleep(0.1)
        yield
    finally:
        try:
            _stop(proc, "nfs_server")
        finally:
            shutil.rmtree(state, ignore_errors=True)


def _control_port() -> int:
    """A tgtd control port (-C; tgtd takes at most 32767) no other test process picks: it names tgtd's socket."""
    return 1000 + (os.getpid() % 3000) * 10 + next(_count) % 10


@contextlib.contextmanager
def iscsi_target(ns: Netns, iqn: str, luns: Sequence[Path]) -> Iterator[None]:
    """tgtd in ns with target iqn (tid 1) and one LUN per file (LUN 1, 2, …), open to every initiator, until
    the block ends; then shut down through tgtadm (tgtd ignores SIGTERM) and checked gone."""
    port = _control_port()
    state = Path(tempfile.mkdtemp(prefix="vmkit-tgt-"))
    log = state / "tgtd.log"
    script = f"""
        set -e
        {_PRIVATE_RUN}
        tgtd -f -C {port} &
        trap 'kill -KILL $(jobs -p) 2>/dev/null; wait; exit 0' TERM
        wait
    """
    proc = _start(ns, script, log)

    def tgtadm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Into the bash's mount namespace, where tgtd's control socket is; the network namespace does not matter.
        return subprocess.run(
            ["nsenter", "-t", str(proc.pid), "-m", "tgtadm", "-C", str(port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    try:
        deadline = time.monotonic() + 20
        while tgtadm("--op", "show", "--mode", "system", check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tgtd did not start: {_tail(log)}")
            time.sleep(0.05)
        tgtadm("--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
        for lun, path in enumerate(luns, start=1):
            tgtadm(
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                str(lun),
                "-b",
                str(path),
            )
        tgtadm("--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        yield
    finally:
        try:
            if proc.poll() is None:
                # "delete system" is refused while a target exists: the target goes first, forced (sessions may
                # still be logged in).
                tgtadm("--lld", "iscsi", "--op", "delete", "--force", "--mode", "target", "--tid", "1", check=False)
                tgtadm("--op", "delete", "--mode", "system", check=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)  # the bash ends when tgtd has
            _stop(proc, "iscsi_target")
        finally:
            shutil.rmtree(state, ignore_errors=True)
