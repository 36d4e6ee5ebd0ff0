#!/usr/bin/env python3
"""Storage figures: 4 KiB write IOPS by format and preallocation, linked clones, full clones and conversion.

Works on 1 GiB images in a directory of its own under --dir (default /var/tmp: a disk filesystem, as a pool's
would be; a tmpfs is refused, its figures would be memory's) and removes it at the end. Prints tables; never
fails on timing. Run as root: `make bench` (or .venv/bin/python bench/storage.py).

(1) `qemu-img bench`: 4 KiB writes, 32 in flight, one per 64 KiB (qcow2's cluster size) across the image, so
    the first pass allocates a new cluster with every write: what thin provisioning costs a guest writing to
    fresh space; the second pass overwrites the same places. qemu-img bench has no random pattern: this strided
    one is the worst case for allocation. O_DIRECT (-t none) shows the disk; page cache (-t writeback, as
    vmkit's VMs run: cache.direct=off) shows the CPU cost of the format.
(2) A linked clone: a qcow2 overlay on a 1 GiB image, through vmkit.storage.qemu_img.create (fsync included).
(3) A full clone of a 1 GiB raw image half full of data (2 MiB of data every 4 MiB): files.copy_file and
    qemu_img.convert against `cp --sparse=always`, each as durable as the other (cp then `sync FILE`), and
    also without the final flush. The source stays in the page cache: all read it alike.
(4) Conversion raw -> qcow2 of the same image against cp.
(5) Through a vmkit daemon of its own (state dir under --dir): creating a VM with a new 8 GiB thin disk (the API
    call, qcow2 with preallocation off and metadata), and importing the 1 GiB image through the API (a streamed
    upload over the UNIX socket) against `cp --sparse=always` of the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import table  # noqa: E402
from vmkit.storage import files, qemu_img  # noqa: E402

GiB = 1024**3
MiB = 1024**2
STEP = 64 * 1024
WRITES = GiB // STEP  # one pass over the image
TARGET_LINKED_S = 0.05
TARGET_CLONE_VS_CP = 0.9
TARGET_CREATE_S = 0.05
TARGET_IMPORT_VS_CP = 0.8
LAYOUTS = [("raw", "off"), ("raw", "falloc"), ("qcow2", "off"), ("qcow2", "metadata"), ("qcow2", "falloc")]


def fs_type(path: Path) -> str:
    """The type of the filesystem holding path: the longest mount point above it in /proc/mounts."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ, *_ = line.split()
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, typ
    return kind


def qemu_img_bench(path: Path, fmt: str, cache: str) -> float:
    """IOPS of one pass of 4 KiB writes, one per 64 KiB."""
    argv = ["qemu-img", "bench", "-f", fmt, "-w", "-t", cache, "-d", "32", "-c", str(WRITES), "-s", "4k"]
    out = subprocess.run([*argv, "-S", str(STEP), str(path)], capture_output=True, text=True, check=True).stdout  # noqa: S603
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert m, out
    return WRITES / float(m.group(1))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def med(values: list[float]) -> float:
    return statistics.median(values)


def make_source(path: Path) -> None:
    """1 GiB raw, 2 MiB of random data every 4 MiB: half data, half holes; on disk before timing starts."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, GiB)
        block = os.urandom(2 * MiB)
        for off in range(0, GiB, 4 * MiB):
            os.pwrite(fd, block[off % MiB :] + block[: off % MiB], off)  # rotated: no two chunks alike
        os.fsync(fd)
    finally:
        os.close(fd)


def iops(work: Path, runs: int) -> list[tuple[str, str, str, str]]:
    rows = []
    for fmt, prealloc in LAYOUTS:
        first, again, cached = [], [], []
        for i in range(runs):
            img = work / f"iops-{i}"
            qemu_img.create(img, fmt=fmt, size_bytes=GiB, prealloc=prealloc)
            first.append(qemu_img_bench(img, fmt, "none"))
            again.append(qemu_img_bench(img, fmt, "none"))
            img.unlink()
            qemu_img.create(img, fmt=fmt, size_bytes=GiB, prealloc=prealloc)
            cached.append(qemu_img_bench(img, fmt, "writeback"))
            img.unlink()
            os.sync()
        rows.append((f"{fmt} {prealloc}", f"{med(first):,.0f}", f"{med(again):,.0f}", f"{med(cached):,.0f}"))
    return rows


def linked_clone(work: Path, src: Path, runs: int) -> list[float]:
    times = []
    for i in range(max(runs, 10)):
        overlay = work / f"linked-{i}"
        times.append(
            timed(lambda o=overlay: qemu_img.create(o, fmt="qcow2", size_bytes=0, backing=src, backing_fmt="raw"))
        )
        overlay.unlink()
    return times


CP, CP_SYNC = "cp --sparse=always", "cp --sparse=always; sync FILE"


def clones(work: Path, src: Path, runs: int) -> dict[str, list[float]]:
    """Seconds of each way to copy src, by name (CP and CP_SYNC first: the baselines)."""
    dst = work / "dst"

    def sh(*argv: str) -> Callable[[], object]:
        return lambda: subprocess.run(argv, check=True)  # noqa: S603

    methods: dict[str, Callable[[], object]] = {
        CP: sh("cp", "--sparse=always", str(src), str(dst)),
        CP_SYNC: sh("sh", "-c", f"cp --sparse=always {src} {dst} && sync {dst}"),
        "files.copy_file, no fsync": lambda: files.copy_file(src, dst, durable=False),
        "files.copy_file": lambda: files.copy_file(src, dst),
        "qemu_img.convert raw -> raw": lambda: qemu_img.convert(src, "raw", dst, "raw"),
        "qemu_img.convert raw -> raw, progress": lambda: qemu_img.convert(
            src, "raw", dst, "raw", progress=lambda f: None
        ),
        "qemu_img.convert raw -> qcow2": lambda: qemu_img.convert(src, "raw", dst, "qcow2"),
    }
    res: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    # Interleaved rounds, each method once a round, so all share the machine's state of the moment; the order
    # rotates from round to round, so no method always follows the same one (a delete's discards and writeback
    # linger into the next). The first round is a warm-up, not counted.
    for i in range(runs + 1):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = timed(methods[name])
            if i:
                res[name].append(t)
            if name.endswith("qcow2"):
                assert qemu_img.compare(src, "raw", dst, "qcow2")
            elif files.allocated_bytes(dst) > files.allocated_bytes(src) * 1.05:
                print(f"note: {name} made a copy of {files.allocated_bytes(dst)} bytes allocated", file=sys.stderr)
            dst.unlink()
            os.sync()  # the next method starts with no dirty pages left behind by this one
    return res


def through_api(work: Path, src: Path, runs: int) -> dict[str, list[float]]:
    """(5): VM creates with a new 8 GiB disk, and the import of src, through a daemon of its own."""
    from tests.conftest import FAKE_QEMU, Daemon  # the harness the tests use

    d = Daemon(work / "daemon", {"VMKIT_QEMU": str(FAKE_QEMU)})
    (work / "daemon").mkdir()
    d.start()
    out: dict[str, list[float]] = {}
    try:
        for prealloc in ("off", "metadata"):
            key = f"VM create, new 8 GiB qcow2 disk, prealloc {prealloc}"
            out[key] = []
            for i in range(runs):
                body = {"name": f"c{i}", "nic": False, "disks": [{"size_bytes": 8 * GiB, "prealloc": prealloc}]}
                out[key].append(timed(lambda body=body: d.api.post("/v1/vms", body)))  # type: ignore[misc]
                d.api.request("DELETE", f"/v1/vms/c{i}")
        imports = out["import 1 GiB through the API (local: the daemon copies the file)"] = []
        uploads = out["import 1 GiB through the API (upload, as a remote client sends it)"] = []
        copies = out["cp --sparse=always"] = []
        synced = out["cp --sparse=always; sync FILE"] = []
        size = src.stat().st_size

        def local_import(i: int) -> None:
            op = d.api.post(f"/v1/pools/default/volumes/imp{i}.raw/import", {"path": str(src)})["operation"]
            while op["status"] == "running":
                op = d.api.get(f"/v1/operations/{op['id']}?wait_s=5")
            assert op["status"] == "success", op

        def upload(i: int) -> None:
            with open(src, "rb") as f:
                d.api.upload(f"/v1/pools/default/volumes/up{i}.raw/upload", f, size)

        for i in range(runs):
            imports.append(timed(lambda i=i: local_import(i)))  # type: ignore[misc]
            uploads.append(timed(lambda i=i: upload(i)))  # type: ignore[misc]
            dst = work / f"cp{i}.raw"
            copies.append(
                timed(lambda dst=dst: subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True))
            )  # type: ignore[misc]
            dst.unlink()

            def cp_sync(dst: Path = dst) -> None:
                subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
                subprocess.run(["sync", str(dst)], check=True)

            synced.append(timed(cp_sync))
            dst.unlink()
            for name in (f"imp{i}.raw", f"up{i}.raw"):
                d.api.request("DELETE", f"/v1/pools/default/volumes/{name}")
    finally:
        d.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to work (not a tmpfs)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kind = fs_type(args.dir)
    if kind in ("tmpfs", "ramfs"):
        sys.exit(f"{args.dir} is a {kind}: give --dir on a disk filesystem")
    _, available = files.fs_space(args.dir)
    if available < 4 * GiB:
        sys.exit(f"{args.dir}: {available // MiB} MiB free, 4 GiB needed")
    work = Path(tempfile.mkdtemp(prefix="vmkit-bench-storage-", dir=args.dir))
    try:
        iops_rows = iops(work, args.runs)
        src = work / "src.raw"
        make_source(src)
        linked = linked_clone(work, src, args.runs)
        clone = clones(work, src, args.runs)
        api = through_api(work, src, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps({"iops": iops_rows, "linked_clone_s": linked, "clone_s": clone, "api_s": api}))
        return
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"storage, {args.dir} on {kind}, 1 GiB images, {args.runs} runs (medians); load average at the end {load}")
    table(
        f"4 KiB writes, one per 64 KiB, 32 in flight, IOPS ({WRITES} writes a pass)",
        ("image", "first write, O_DIRECT", "overwrite, O_DIRECT", "first write, page cache"),
        iops_rows,
    )
    table(
        "linked clone (qcow2 overlay on a 1 GiB image)",
        ("figure", "median", "target"),
        [
            (
                "qemu_img.create",
                f"{med(linked):.4f} s (min {min(linked):.4f}, max {max(linked):.4f})",
                f"<= {TARGET_LINKED_S} s",
            )
        ],
    )
    rows = []
    for name, values in clone.items():
        # Against cp as durable as the method: copy_file and convert fsync unless told not to.
        base = clone[CP if name in (CP, "files.copy_file, no fsync") else CP_SYNC]
        target = "" if name.startswith("cp") else f">= {TARGET_CLONE_VS_CP}x"
        rows.append(
            (name, f"{med(values):.3f} s", f"{1 / med(values):.2f} GiB/s", f"{med(base) / med(values):.2f}x", target)
        )
    table(
        "full clone / conversion of 1 GiB raw, 50% data (speed as virtual size / time; vs cp as durable)",
        ("method", "time", "speed", "vs cp", "target"),
        rows,
    )
    cp = med(api.pop("cp --sparse=always"))
    # A volume is fsynced before it is registered (a crash must not leave a row on a half-written file): compare
    # with a copy as durable, and show plain cp beside it.
    cp_sync = med(api.pop("cp --sparse=always; sync FILE"))
    api_rows = []
    for name, values in api.items():
        if name.startswith("import"):
            vs = f"{cp_sync / med(values):.2f}x cp+sync ({cp_sync:.3f} s), {cp / med(values):.2f}x cp"
            target = f">= {TARGET_IMPORT_VS_CP}x cp+sync" if "local" in name else ""
        else:
            vs, target = "", f"<= {TARGET_CREATE_S} s"
        api_rows.append((name, f"{med(values):.3f} s (min {min(values):.3f})", vs, target))
    table("through the API (a daemon of its own)", ("figure", "median", "vs", "target"), api_rows)


if __name__ == "__main__":
    main()
