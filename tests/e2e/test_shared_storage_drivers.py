"""vmkit's NFS and iSCSI drivers (vmkit.storage.nfs, vmkit.storage.iscsi) against real servers: nfs-ganesha
(NFSv3, with rpcbind) and tgt, in a storage namespace `st` on a private LAN, used from a client namespace `h`
as a vmkit host would, and by qemu-img's own NFS driver (libnfs) there."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Netns, lan
from tests.storage_servers import iscsi_target, nfs_server
from vmkit.storage.nfs import NfsShare

IQN = "iqn.2026-11.org.vmkit.test:disks"
INITIATOR = "iqn.2026-11.org.vmkit.test:host-h"
MiB = 1024**2
LUN_SIZES = [64 * MiB, 100_000_000, 3 * 1024**3 + 512]  # tgt serves whole 512 B blocks: 100000000 -> 99999744


@dataclass
class Site:
    st: Netns  # the storage server's namespace
    st_addr: str
    h: Netns  # the client (a vmkit host)
    h_addr: str
    export_dir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("shared")
    export_dir = root / "export"
    export_dir.mkdir()
    luns = []
    for i, size in enumerate(LUN_SIZES, start=1):
        path = root / f"lun{i}.img"
        with path.open("wb") as f:
            f.truncate(size)  # sparse
        luns.append(path)
    with (
        lan("st", "h") as [(st, st_addr), (h, h_addr)],
        nfs_server(st, export_dir),
        iscsi_target(st, IQN, luns),
    ):
        yield Site(st, st_addr, h, h_addr, export_dir)


def in_ns(ns: Netns, code: str, timeout: float = 60) -> dict[str, Any]:
    """Run code inside ns with nfs, iscsi, NfsShare and IscsiTarget imported. Returns {"out": what it assigned
    to `out` (dataclasses as dicts), "elapsed": s} or, if it raised, {"error": class name, "message", "status",
    "elapsed"}."""
    program = (
        "import dataclasses, json, time\n"
        "from vmkit.storage import iscsi, nfs\n"
        "from vmkit.storage.iscsi import IscsiTarget\n"
        "from vmkit.storage.nfs import NfsShare\n"
        "def enc(o):\n"
        "    return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)\n"
        "out = None\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"{textwrap.indent(textwrap.dedent(code), '    ')}\n"
        "    res = {'out': out}\n"
        "except Exception as e:\n"
        "    res = {'error': type(e).__name__, 'message': str(e), 'status': getattr(e, 'status', None)}\n"
        "res['elapsed'] = time.monotonic() - t\n"
        "print(json.dumps(res, default=enc))\n"
    )
    res = ns.python(program, timeout=timeout)
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def share(site: Site, **kw: Any) -> str:
    """Python source of the NfsShare of the site's export (for in_ns)."""
    return repr(NfsShare(site.st_addr, "/vmkit", **kw))


def test_nfs_session_operations(site: Site) -> None:
    (site.export_dir / "a.qcow2").write_bytes(b"x" * 5000)
    (site.export_dir / "sub").mkdir()
    a, sub = os.stat(site.export_dir / "a.qcow2"), os.stat(site.export_dir / "sub")
    res = in_ns(
        site.h,
        f"""
        with nfs.session({share(site)}) as s:
            first = s.listdir()
            s.rename("a.qcow2", "b.qcow2")
            after_rename = [f.name for f in s.listdir()]
            b, gone = s.stat("b.qcow2"), s.stat("a.qcow2")
            s.unlink("b.qcow2")
            s.unlink("b.qcow2")  # again: already gone is fine
            try:
                s.rename("nosuch", "x")
            except nfs.NfsError as e:
                rename_missing = e.message
            try:
                s.stat("../etc")
            except ValueError as e:
                bad_name = str(e)
            out = dict(first=first, after_rename=after_rename, b=b, gone=gone, last=s.listdir(), space=s.space(),
                       rename_missing=rename_missing, bad_name=bad_name)
        """,
    )
    out = res["out"]
    assert out["first"] == [
        {"name": "a.qcow2", "size_bytes": 5000, "allocated_bytes": a.st_blocks * 512, "is_file": True},
        {"name": "sub", "size_bytes": sub.st_size, "allocated_bytes": sub.st_blocks * 512, "is_file": False},
    ]
    assert out["after_rename"] == ["b.qcow2", "sub"]
    assert out["b"]["size_bytes"] == 5000 and out["gone"] is None
    assert [f["name"] for f in out["last"]] == ["sub"]
    assert not (site.export_dir / "b.qcow2").exists()
    assert out["rename_missing"].startswith(f"NFS {site.st_addr}:/vmkit: cannot rename nosuch to x: ")
    assert "NFS3ERR_NOENT" in out["rename_missing"]
    assert "invalid file name" in out["bad_name"]
    st = os.statvfs(site.export_dir)
    capacity, available = out["space"]
    assert capacity == st.f_blocks * st.f_frsize
    assert abs(available - st.f_bavail * st.f_frsize) < 256 * MiB  # the host's disk is in use meanwhile
    (site.export_dir / "sub").rmdir()


def test_nfs_probe_errors_are_clear_and_bounded(site: Site) -> None:
    ok = in_ns(site.h, f"nfs.probe({share(site)}, 3)")
    assert "error" not in ok and ok["elapsed"] < 2
    wrong_export = in_ns(site.h, f"nfs.probe(NfsShare({site.st_addr!r}, '/nope'), 3)")
    assert wrong_export["error"] == "NfsError" and wrong_export["status"] == 502
    # ganesha answers MNT3ERR_ACCES for an export it does not have, so the two cannot be told apart.
    assert wrong_export["message"].startswith(f"NFS {site.st_addr}:/nope: export /nope not found or access denied: ")
    assert "MNT3ERR_ACCES" in wrong_export["message"] and wrong_export["elapsed"] < 3
    # An address that answers but has no NFS server (the client itself: connection refused at once).
    refused = in_ns(site.h, f"nfs.probe(NfsShare({site.h_addr!r}, '/vmkit'), 3)")
    assert refused["error"] == "NfsError"
    assert refused["message"].startswith(f"NFS {site.h_addr}:/vmkit: cannot reach NFS server {site.h_addr}: ")
    assert "Connection refused" in refused["message"] and refused["elapsed"] < 3
    # An address on the LAN where no host is (no ARP answer): given up at the deadline.
    nobody = site.st_addr.rsplit(".", 1)[0] + ".200"
    silent = in_ns(site.h, f"nfs.probe(NfsShare({nobody!r}, '/vmkit'), 2)")
    assert silent["message"].startswith(f"NFS {nobody}:/vmkit: cannot reach NFS server {nobody}: ")
    assert 1.5 < silent["elapsed"] < 3.5, silent
    # A server that accepts connections and never answers (here: a bare listener on the portmapper's port).
    listener = site.h.popen(
        [
            "python3",
            "-c",
            "import socket, time; s = socket.create_server(('127.0.0.1', 111)); print('up', flush=True); "
            "c = s.accept(); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline() == b"up\n"
        hung = in_ns(site.h, "nfs.probe(NfsShare('127.0.0.1', '/vmkit'), 2)")
    finally:
        listener.kill()
        listener.wait()
    assert hung["message"] == "NFS 127.0.0.1:/vmkit: cannot reach NFS server 127.0.0.1: no answer within 2 s"
    assert 1.9 < hung["elapsed"] < 3


def qemu_img(ns: Netns, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ns.run(["qemu-img", *args], check=check, timeout=60)


def test_qemu_img_over_nfs_urls(site: Site) -> None:
    root = NfsShare(site.st_addr, "/vmkit")
    assert root.url("d0.qcow2") == f"nfs://{site.st_addr}/vmkit/d0.qcow2?uid=0&gid=0"
    qemu_img(site.h, "create", "-f", "qcow2", root.url("d0.qcow2"), "64M")
    on_disk = os.stat(site.export_dir / "d0.qcow2")
    assert (on_disk.st_uid, on_disk.st_gid, on_disk.st_mode & 0o777) == (0, 0, 0o600)  # qemu-img makes 0600
    listed = in_ns(site.h, f"with nfs.session({share(site)}) as s: out = s.listdir()")["out"]
    assert listed == [
        {"name": "d0.qcow2", "size_bytes": on_disk.st_size, "allocated_bytes": on_disk.st_blocks * 512, "is_file": True}
    ]
    info = json.loads(qemu_img(site.h, "info", "--output=json", root.url("d0.qcow2")).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MiB
    local = (site.export_dir / "d0.qcow2").read_bytes()
    reads = in_ns(
        site.h,
        f"""
        with nfs.session({share(site)}) as s:
            head, middle = s.read("d0.qcow2", 0, 512), s.read("d0.qcow2", 1000, 70000)
            tail = s.read("d0.qcow2", {len(local) - 10}, 100)
            past_end = s.read("d0.qcow2", {len(local) + 5}, 10)
            out = [head.hex(), middle.hex(), tail.hex(), past_end.hex()]
            try:
                s.read("nosuch", 0, 10)
            except nfs.NfsError as e:
                out.append(e.message)
        """,
    )["out"]
    assert reads[:4] == [local[:512].hex(), local[1000:71000].hex(), local[-10:].hex(), ""]
    assert local[:4] == b"QFI\xfb"
    assert reads[4].startswith(f"NFS {site.st_addr}:/vmkit: cannot open nosuch: ") and "NFS3ERR_NOENT" in reads[4]
    # Another uid in the URL: AUTH_SYS credentials are taken as given (no root squash here), so the server's
    # permissions decide. uid 1000 may not read root's 0600 file, nor create files in the export's root-owned
    # 0755 top directory.
    other = NfsShare(site.st_addr, "/vmkit", uid=1000, gid=1000)
    res = qemu_img(site.h, "info", other.url("d0.qcow2"), check=False)
    assert res.returncode != 0 and "ACCESS denied" in res.stderr, res.stderr
    res = qemu_img(site.h, "create", "-f", "qcow2", other.url("d1.qcow2"), "64M", check=False)
    assert res.returncode != 0 and "NFS3ERR_ACCES" in res.stderr, res.stderr
    # vmkit's own session as uid 1000 still lists and stats (that needs only the directory's r-x), reads
    # nothing of the file and may not delete it.
    as_1000 = share(site, uid=1000, gid=1000)
    seen = in_ns(site.h, f"with nfs.session({as_1000}) as s: out = s.listdir()")
    assert seen["out"] == listed
    for op in ('s.read("d0.qcow2", 0, 4)', 's.unlink("d0.qcow2")'):
        refused = in_ns(site.h, f"with nfs.session({as_1000}) as s: {op}")
        assert refused["error"] == "NfsError" and "ACCES" in refused["message"], refused
    assert (site.export_dir / "d0.qcow2").exists()
    # With the top directory owned by 1000, uid 1000 makes files that are its own (0600), and root, not
    # squashed, still reads them.
    os.chown(site.export_dir, 1000, 1000)
    try:
        qemu_img(site.h, "create", "-f", "qcow2", other.url("d1.qcow2"), "64M")
        made = os.stat(site.export_dir / "d1.qcow2")
        assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (1000, 1000, 0o600)
        assert (
            json.loads(qemu_img(site.h, "info", "--output=json", root.url("d1.qcow2")).stdout)["virtual-size"]
            == 64 * MiB
        )
        assert json.loads(qemu_img(site.h, "info", "--output=json", other.url("d1.qcow2")).stdout)["format"] == "qcow2"
    finally:
        os.chown(site.export_dir, 0, 0)
    gone = in_ns(
        site.h,
        f"""
        with nfs.session({share(site)}) as s:
            s.unlink("d0.qcow2")
            s.unlink("d1.qcow2")
            out = s.listdir()
        """,
    )
    assert gone["out"] == []


def test_iscsi_luns_with_exact_sizes(site: Site) -> None:
    res = in_ns(site.h, f"out = iscsi.luns(IscsiTarget({site.st_addr!r}, {IQN!r}), {INITIATOR!r})")
    exact = [size // 512 * 512 for size in LUN_SIZES]
    assert res["out"] == [{"lun": n, "size_bytes": size} for n, size in enumerate(exact, start=1)]
    assert res["elapsed"] < 5
    # iscsi-ls alone rounds (64 MiB shows as 63M): the sizes above come from READ CAPACITY(16).
    assert "(Size:63M)" in site.h.run(["iscsi-ls", "-s", "-i", INITIATOR, f"iscsi://{site.st_addr}"]).stdout


def test_iscsi_errors(site: Site) -> None:
    wrong = in_ns(
        site.h, f"out = iscsi.luns(IscsiTarget({site.st_addr!r}, 'iqn.2026-11.org.vmkit.test:nosuch'), {INITIATOR!r})"
    )
    assert wrong["error"] == "IscsiError" and wrong["status"] == 502
    assert wrong["message"] == (
        f"iSCSI {site.st_addr}:3260: no target iqn.2026-11.org.vmkit.test:nosuch there "
        f"(or initiator {INITIATOR} may not see it)"
    )
    refused = in_ns(site.h, f"out = iscsi.luns(IscsiTarget({site.h_addr!r}, {IQN!r}), {INITIATOR!r})")
    assert refused["error"] == "IscsiError"
    assert refused["message"].startswith(f"iSCSI {site.h_addr}:3260: cannot list the targets: ")
    assert "Connection refused" in refused["message"] and refused["elapsed"] < 3
    nobody = site.st_addr.rsplit(".", 1)[0] + ".200"
    silent = in_ns(site.h, f"out = iscsi.luns(IscsiTarget({nobody!r}, {IQN!r}), {INITIATOR!r}, timeout_s=2)")
    assert silent["error"] == "IscsiError" and silent["elapsed"] < 4, silent
    assert silent["message"].startswith(f"iSCSI {nobody}:3260: cannot list the targets: ")
