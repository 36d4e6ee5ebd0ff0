"""The qemu-img wrapper against the real qemu-img, on small images in tmp_path (each call takes milliseconds)."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_storage_files import MiB, small_tmpfs, sparse_file
from vmkit.errors import CommandFailed, Conflict, NoSpace
from vmkit.storage import files, qemu_img
from vmkit.storage.qemu_img import ImageInfo
from vmkit.util.proc import Result, run_streaming


def qemu_io(path: Path, fmt: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


SIZE = 32 * MiB
THICK = {"falloc", "full"}


@pytest.mark.parametrize(
    ("fmt", "prealloc"),
    [("raw", "off"), ("raw", "falloc"), ("raw", "full"), *[("qcow2", p) for p in qemu_img.PREALLOC_MODES]],
)
def test_create_thin_and_thick(tmp_path: Path, fmt: str, prealloc: str) -> None:
    path = tmp_path / f"v.{fmt}"
    qemu_img.create(path, fmt=fmt, size_bytes=SIZE, prealloc=prealloc)
    allocated = files.allocated_bytes(path)
    if prealloc in THICK:
        assert allocated >= SIZE
    else:  # off and metadata: at most qcow2's metadata (header, tables: a few hundred KiB here)
        assert allocated < MiB
    if prealloc == "metadata":  # the clusters are laid out, so the file spans the whole disk already
        assert path.stat().st_size >= SIZE
    got = qemu_img.info(path, fmt)
    assert (got.virtual_size, got.format, got.backing_file, got.dirty) == (SIZE, fmt, None, False)
    assert got.actual_size == allocated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert files.detect_format(path) == fmt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": "raw", "size_bytes": SIZE, "prealloc": "metadata"},
        {"fmt": "vmdk", "size_bytes": SIZE},
        {"fmt": "iso", "size_bytes": SIZE},
        {"fmt": "qcow2", "size_bytes": SIZE, "prealloc": "sparse"},
        {"fmt": "qcow2", "size_bytes": 0},
        {"fmt": "qcow2", "size_bytes": -1},
        {"fmt": "qcow2", "size_bytes": True},
        {"fmt": "qcow2", "size_bytes": "1G"},
        {"fmt": "qcow2", "size_bytes": SIZE, "backing_fmt": "raw"},
        {"fmt": "raw", "size_bytes": 0, "backing": Path("/b"), "backing_fmt": "raw"},
        {"fmt": "qcow2", "size_bytes": 0, "backing": Path("/b")},
        {"fmt": "qcow2", "size_bytes": 0, "backing": Path("/b"), "backing_fmt": "vpc"},
        {"fmt": "qcow2", "size_bytes": 0, "backing": Path("/b"), "backing_fmt": "raw", "prealloc": "metadata"},
    ],
)
def test_create_refuses_invalid_values_before_running_anything(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        qemu_img.create(tmp_path / "v", **kwargs)
    assert not (tmp_path / "v").exists()


def test_create_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "v").write_text("a volume")
    with pytest.raises(Conflict):
        qemu_img.create(tmp_path / "v", fmt="raw", size_bytes=SIZE)
    assert (tmp_path / "v").read_text() == "a volume"


def test_paths_are_never_options_nor_protocols(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("-f", "nbd:localhost:10809", "json:{}"):
        qemu_img.create(Path(name), fmt="qcow2", size_bytes=MiB)
        assert (tmp_path / name).is_file()
        assert qemu_img.info(Path(name), "qcow2").virtual_size == MiB


def test_overlay_info_and_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img.create(base, fmt="raw", size_bytes=SIZE)
    mid = tmp_path / "mid.qcow2"
    qemu_img.create(mid, fmt="qcow2", size_bytes=0, backing=base, backing_fmt="raw")  # 0: the backing's size
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, fmt="qcow2", size_bytes=2 * SIZE, backing=mid, backing_fmt="qcow2")
    assert files.allocated_bytes(mid) < MiB  # a linked clone copies nothing

    got = qemu_img.info(mid, "qcow2")
    assert (got.virtual_size, got.backing_file, got.backing_format) == (SIZE, str(base), "raw")
    chain = qemu_img.chain_info(top, "qcow2")
    assert [(i.format, i.virtual_size, i.backing_file, i.backing_format) for i in chain] == [
        ("qcow2", 2 * SIZE, str(mid), "qcow2"),
        ("qcow2", SIZE, str(base), "raw"),
        ("raw", SIZE, None, None),
    ]
    assert qemu_img.chain_info(base, "raw") == [qemu_img.info(base, "raw")]


def test_overlay_relative_backing_resolves_against_its_directory(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, fmt="qcow2", size_bytes=SIZE)
    qemu_img.create(tmp_path / "top", fmt="qcow2", size_bytes=0, backing=Path("base.qcow2"), backing_fmt="qcow2")
    assert qemu_img.info(tmp_path / "top", "qcow2").backing_file == str(base)


def test_info_of_an_iso_reads_it_raw(tmp_path: Path) -> None:
    iso = sparse_file(tmp_path / "x.iso", 4 * MiB, [0])
    got = qemu_img.info(iso, "iso")
    assert (got.format, got.virtual_size) == ("raw", 4 * MiB)


def test_info_reports_a_dirty_image(tmp_path: Path) -> None:
    path = tmp_path / "v.qcow2"
    qemu_img.create(path, fmt="qcow2", size_bytes=SIZE)
    with path.open("r+b") as f:  # set the "corrupt" bit of the incompatible features (header byte 72..79)
        f.seek(72)
        (features,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", features | 2))
    assert qemu_img.info(path, "qcow2").dirty


def test_info_works_on_an_image_in_use(tmp_path: Path) -> None:
    """A running QEMU holds its disks' locks: info reads anyway (-U); check, which needs a stable image, does not."""
    path = tmp_path / "v.qcow2"
    qemu_img.create(path, fmt="qcow2", size_bytes=SIZE)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        holder.stdout.read1(1)  # its prompt: the image is open and locked
        assert qemu_img.info(path, "qcow2").virtual_size == SIZE
        with pytest.raises(CommandFailed, match="another process"):
            qemu_img.check(path, "qcow2")
    finally:
        holder.kill()
        holder.wait()


def test_info_of_a_missing_file_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed, match=r"qemu-img info failed on .*nope"):
        qemu_img.info(tmp_path / "nope", "qcow2")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "v"
    qemu_img.create(path, fmt=fmt, size_bytes=SIZE)
    qemu_img.resize(path, fmt, 2 * SIZE)
    assert qemu_img.info(path, fmt).virtual_size == 2 * SIZE
    with pytest.raises(ValueError, match="shrinking"):
        qemu_img.resize(path, fmt, SIZE)
    assert qemu_img.info(path, fmt).virtual_size == 2 * SIZE
    qemu_img.resize(path, fmt, SIZE, shrink=True)
    assert qemu_img.info(path, fmt).virtual_size == SIZE


def test_resize_grow_thick(tmp_path: Path) -> None:
    path = tmp_path / "v"
    qemu_img.create(path, fmt="raw", size_bytes=SIZE, prealloc="falloc")
    qemu_img.resize(path, "raw", 2 * SIZE, prealloc="falloc")
    assert files.allocated_bytes(path) >= 2 * SIZE
    with pytest.raises(ValueError):
        qemu_img.resize(path, "raw", 3 * SIZE, prealloc="metadata")


def test_convert_round_trip_keeps_content_and_holes(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src.raw", SIZE, [0, 5 * MiB, 31 * MiB])
    seen: list[float] = []
    qemu_img.convert(src, "raw", tmp_path / "q", "qcow2", progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    assert qemu_img.info(tmp_path / "q", "qcow2").virtual_size == SIZE
    assert qemu_img.compare(src, "raw", tmp_path / "q", "qcow2")
    qemu_img.convert(tmp_path / "q", "qcow2", tmp_path / "back.raw", "raw")
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
    assert files.allocated_bytes(tmp_path / "back.raw") <= files.allocated_bytes(src) + 256 * 1024
    assert stat.S_IMODE((tmp_path / "back.raw").stat().st_mode) == 0o600


@pytest.mark.parametrize(("fmt", "prealloc"), [("raw", "falloc"), ("raw", "full"), ("qcow2", "falloc")])
def test_convert_thick(tmp_path: Path, fmt: str, prealloc: str) -> None:
    src = sparse_file(tmp_path / "src.raw", SIZE, [MiB])
    qemu_img.convert(src, "raw", tmp_path / "dst", fmt, prealloc=prealloc)
    assert files.allocated_bytes(tmp_path / "dst") >= SIZE
    assert qemu_img.compare(src, "raw", tmp_path / "dst", fmt)


def test_convert_flattens_the_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, fmt="qcow2", size_bytes=SIZE)
    qemu_io(base, "qcow2", "write -P 0x11 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, fmt="qcow2", size_bytes=0, backing=base, backing_fmt="qcow2")
    qemu_io(top, "qcow2", "write -P 0x22 1M 2M")
    qemu_img.convert(top, "qcow2", tmp_path / "flat", "qcow2")
    flat = qemu_img.info(tmp_path / "flat", "qcow2")
    assert flat.backing_file is None
    assert qemu_img.compare(top, "qcow2", tmp_path / "flat", "qcow2")
    assert not qemu_img.compare(base, "qcow2", tmp_path / "flat", "qcow2")


def test_convert_falls_back_to_the_page_cache_without_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert writes with O_DIRECT (-t none); on a filesystem that refuses it, it runs again without."""
    real_run, calls = qemu_img.run, []

    def run(argv: list[str], **kwargs: object) -> Result:
        calls.append(argv)
        if "-t" in argv:
            Path(argv[-1]).write_bytes(b"")  # qemu-img creates the file before opening it with O_DIRECT
            msg = f"qemu-img: Could not open '{argv[-1]}': filesystem does not support O_DIRECT\n"
            return Result(tuple(argv), 1, "", msg, 0.0)
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(qemu_img, "run", run)
    src = sparse_file(tmp_path / "src", MiB, [0])
    qemu_img.convert(src, "raw", tmp_path / "dst", "qcow2")
    assert [("-t" in c) for c in calls] == [True, False]
    assert qemu_img.compare(src, "raw", tmp_path / "dst", "qcow2")


def test_convert_refuses_invalid_and_existing_targets(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", MiB, [0])
    (tmp_path / "dst").write_text("a volume")
    with pytest.raises(Conflict):
        qemu_img.convert(src, "raw", tmp_path / "dst", "qcow2")
    assert (tmp_path / "dst").read_text() == "a volume"
    for bad in [("vmdk", "qcow2", "off"), ("raw", "iso", "off"), ("raw", "raw", "metadata"), ("raw", "raw", "x")]:
        with pytest.raises(ValueError):
            qemu_img.convert(src, bad[0], tmp_path / "new", bad[1], prealloc=bad[2])
    assert not (tmp_path / "new").exists()


def test_convert_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed, match="qemu-img convert failed"):
        qemu_img.convert(tmp_path / "missing", "raw", tmp_path / "dst", "qcow2", progress=lambda f: None)
    assert not (tmp_path / "dst").exists()


def test_rebase_unsafe(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img.create(base, fmt="raw", size_bytes=SIZE)
    qemu_io(base, "raw", "write -P 0x33 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, fmt="qcow2", size_bytes=0, backing=base, backing_fmt="raw")
    before = files.allocated_bytes(top)
    moved = base.rename(tmp_path / "moved.raw")
    qemu_img.rebase_unsafe(top, moved, "raw")
    got = qemu_img.info(top, "qcow2")
    assert (got.backing_file, got.backing_format) == (str(moved), "raw")
    assert files.allocated_bytes(top) == before  # header only: no data copied
    assert qemu_img.compare(top, "qcow2", moved, "raw")


def test_safe_rebase_merges_the_image_below_and_commit_writes_down(tmp_path: Path) -> None:
    # base <- mid <- top: merging mid into top (its data copied up) keeps top's content, mid can then go.
    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qcow2", tmp_path / "t,op.qcow2"
    qemu_img.create(base, fmt="raw", size_bytes=SIZE)
    qemu_io(base, "raw", "write -P 0x11 0 1M")
    qemu_img.create(mid, fmt="qcow2", size_bytes=0, backing=base, backing_fmt="raw")
    qemu_io(mid, "qcow2", "write -P 0x22 1M 1M")
    qemu_img.create(top, fmt="qcow2", size_bytes=0, backing=mid, backing_fmt="qcow2")
    qemu_io(top, "qcow2", "write -P 0x33 2M 1M")
    qemu_img.rebase(top, base, "raw")
    assert qemu_img.info(top, "qcow2").backing_file == str(base)
    mid.unlink()
    qemu_io(top, "qcow2", "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M")
    # Standalone: everything below is copied in.
    qemu_img.rebase(top, None, None)
    assert qemu_img.info(top, "qcow2").backing_file is None
    qemu_io(top, "qcow2", "read -P 0x11 0 1M", "read -P 0x22 1M 1M")
    with pytest.raises(ValueError):
        qemu_img.rebase(top, base, None)
    # commit: an overlay's writes go into the image below.
    over = tmp_path / "over.qcow2"
    qemu_img.create(over, fmt="qcow2", size_bytes=0, backing=top, backing_fmt="qcow2")
    qemu_io(over, "qcow2", "write -P 0x44 3M 1M")
    qemu_img.commit(over)
    qemu_io(top, "qcow2", "read -P 0x44 3M 1M")


def test_internal_snapshots(tmp_path: Path) -> None:
    img = tmp_path / "a,b.qcow2"  # a comma: the path travels inside --image-opts
    qemu_img.create(img, fmt="qcow2", size_bytes=SIZE)
    qemu_io(img, "qcow2", "write -P 0x11 0 1M")
    qemu_img.snapshot(img, "create", "s1")
    qemu_io(img, "qcow2", "write -P 0x22 0 1M")
    assert qemu_img.snapshot_tags(img) == {"s1": 0}  # disks only: no VM state
    qemu_img.snapshot(img, "apply", "s1")
    qemu_io(img, "qcow2", "read -P 0x11 0 1M")
    qemu_img.snapshot(img, "delete", "s1")
    assert qemu_img.snapshot_tags(img) == {}
    with pytest.raises(CommandFailed):
        qemu_img.snapshot(img, "apply", "s1")
    for op, tag in (("list", "s1"), ("create", "-l"), ("create", "")):
        with pytest.raises(ValueError):
            qemu_img.snapshot(img, op, tag)


def test_check(tmp_path: Path) -> None:
    path = tmp_path / "v.qcow2"
    qemu_img.create(path, fmt="qcow2", size_bytes=SIZE)
    qemu_io(path, "qcow2", "write -P 1 0 1M")
    clean, text = qemu_img.check(path, "qcow2")
    assert clean and "No errors" in text
    assert qemu_img.check(sparse_file(tmp_path / "r", MiB, []), "raw")[0]
    # Zero the refcount of a data cluster: the refcount table's first block, entry 6 (16-bit refcounts).
    with path.open("r+b") as f:
        f.seek(48)
        (table,) = struct.unpack(">Q", f.read(8))
        f.seek(table)
        (block,) = struct.unpack(">Q", f.read(8))
        f.seek(block + 2 * 6)
        f.write(b"\0\0")
    clean, text = qemu_img.check(path, "qcow2")
    assert not clean and "ERROR" in text


def test_compare(tmp_path: Path) -> None:
    a = sparse_file(tmp_path / "a", MiB, [])
    b = sparse_file(tmp_path / "b", 2 * MiB, [])
    assert qemu_img.compare(a, "raw", b, "raw")  # the larger one's tail is zeros
    qemu_io(b, "raw", "write -P 9 1536k 4k")
    assert not qemu_img.compare(a, "raw", b, "raw")
    with pytest.raises(CommandFailed):
        qemu_img.compare(a, "raw", tmp_path / "missing", "raw")


def test_image_info_is_plain_data() -> None:
    i = ImageInfo(1, 2, "raw", None, None, False)
    with pytest.raises(AttributeError):
        i.virtual_size = 3  # type: ignore[misc]


# --- a full filesystem ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("prealloc", ["falloc", "full"])
def test_create_thick_no_space(tmp_path: Path, fmt: str, prealloc: str) -> None:
    with small_tmpfs(tmp_path / "full") as full:
        with pytest.raises(NoSpace, match=str(full / "v")) as exc:
            qemu_img.create(full / "v", fmt=fmt, size_bytes=SIZE, prealloc=prealloc)
        assert exc.value.status == 507
        assert not (full / "v").exists()
        qemu_img.create(full / "thin", fmt=fmt, size_bytes=SIZE)  # what is thin still fits


@pytest.mark.parametrize("with_progress", [False, True])
def test_convert_no_space(tmp_path: Path, with_progress: bool) -> None:
    src = sparse_file(tmp_path / "src.raw", 16 * MiB, list(range(0, 16 * MiB, MiB)))
    with small_tmpfs(tmp_path / "full") as full:
        with pytest.raises(NoSpace, match=str(full / "dst")):
            qemu_img.convert(src, "raw", full / "dst", "qcow2", progress=(lambda f: None) if with_progress else None)
        assert not (full / "dst").exists()
        assert os.listdir(full) == []


def test_protocol_like_backing_names_are_files(tmp_path: Path) -> None:
    qemu_img.create(tmp_path / "nbd:x", fmt="qcow2", size_bytes=MiB)
    qemu_img.create(tmp_path / "top", fmt="qcow2", size_bytes=0, backing=Path("nbd:x"), backing_fmt="qcow2")
    assert qemu_img.info(tmp_path / "top", "qcow2").backing_file == str(tmp_path / "nbd:x")


# --- run_streaming: what convert's progress rides on ----------------------------------------------------------


def test_run_streaming_splits_on_cr_and_lf() -> None:
    seen: list[str] = []
    script = r'printf "  (0.00/100%%)\r  (50.00/100%%)\r"; echo oops >&2; printf "last\r\nx"'
    r = run_streaming(["sh", "-c", script], on_output=seen.append)
    assert seen == ["  (0.00/100%)", "  (50.00/100%)", "last", "x"]
    assert r.ok and r.stderr == "oops\n" and r.stdout.endswith("last\r\nx")


def test_run_streaming_failure_and_check() -> None:
    with pytest.raises(CommandFailed, match="sh failed: bad"):
        run_streaming(["sh", "-c", "echo bad >&2; exit 3"], on_output=lambda s: None)
    assert run_streaming(["sh", "-c", "exit 3"], on_output=lambda s: None, check=False).returncode == 3
    with pytest.raises(CommandFailed, match="not installed"):
        run_streaming(["/nonexistent/prog"], on_output=lambda s: None)


def test_run_streaming_timeout_and_callback_errors_end_the_program(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandFailed, match="timed out"):
        run_streaming(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], on_output=lambda s: None, timeout_s=0.5)
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()

    def stop(piece: str) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        run_streaming(["sh", "-c", f"echo $$ > {pidfile}; echo go; exec sleep 30"], on_output=stop)
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()
