"""File-level helpers of directory pools, on real files (and, for ENOSPC, a small tmpfs mounted here)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.errors import NoSpace
from vmkit.model.names import valid_name
from vmkit.storage import files
from vmkit.storage.files import PathEscape

MiB = 1024**2


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at where (made here), unmounted whatever happens: a filesystem to fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def sparse_file(path: Path, size: int, data_at: list[int], chunk: int = MiB) -> Path:
    """A file of `size` bytes holding random data at the offsets in data_at (chunk bytes each), holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in data_at:
            os.pwrite(fd, os.urandom(chunk), off)
    finally:
        os.close(fd)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- resolve / temp_path -------------------------------------------------------------------------------------


def test_resolve_plain_names(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    assert files.resolve(pool, "disk.qcow2") == pool / "disk.qcow2"  # need not exist yet
    (pool / "disk.qcow2").write_bytes(b"x")
    assert files.resolve(pool, "disk.qcow2") == pool / "disk.qcow2"
    # A pool reached through a symbolic link resolves to its real directory.
    (tmp_path / "alias").symlink_to(pool)
    assert files.resolve(tmp_path / "alias", "disk.qcow2") == pool / "disk.qcow2"


@pytest.mark.parametrize(
    "name", ["..", ".", "../etc", "../../etc/shadow", "a/b", "/etc/passwd", ".hidden", ".vmkit-tmp.a.1", "", "a\n"]
)
def test_resolve_refuses_names_that_are_not_plain_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(PathEscape, match="invalid volume name"):
        files.resolve(tmp_path, name)


def test_resolve_refuses_symlinks_outside_and_inside(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (tmp_path / "secret").write_text("host file")
    (pool / "inside.raw").write_bytes(b"")
    (pool / "out").symlink_to(tmp_path / "secret")
    (pool / "in").symlink_to(pool / "inside.raw")
    (pool / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("out", "in", "dangling"):
        with pytest.raises(PathEscape, match="symbolic link"):
            files.resolve(pool, name)


def test_resolve_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("dir", "fifo"):
        with pytest.raises(PathEscape, match="not a regular file"):
            files.resolve(tmp_path, name)


def test_temp_paths_are_hidden_unique_and_never_volume_names(tmp_path: Path) -> None:
    a, b = files.temp_path(tmp_path, "disk"), files.temp_path(tmp_path, "disk")
    assert a != b
    assert a.parent == b.parent == tmp_path
    assert a.name.startswith(".vmkit-tmp.disk.")
    assert files.is_temp(a.name)
    assert not files.is_temp("disk")
    assert not valid_name(a.name)
    with pytest.raises(PathEscape):
        files.resolve(tmp_path, a.name)
    with pytest.raises(PathEscape):
        files.temp_path(tmp_path, "../x")


# --- detect_format --------------------------------------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "q"), "1M"], check=True)
    iso = bytearray(0x8800)
    iso[0x8000:0x8006] = b"\x01CD001"  # ISO 9660 primary volume descriptor
    (tmp_path / "i").write_bytes(bytes(iso))
    sparse_file(tmp_path / "r", 4 * MiB, [0])
    (tmp_path / "tiny").write_bytes(b"QF")
    (tmp_path / "empty").write_bytes(b"")
    assert files.detect_format(tmp_path / "q") == "qcow2"
    assert files.detect_format(tmp_path / "i") == "iso"
    assert [files.detect_format(tmp_path / n) for n in ("r", "tiny", "empty")] == ["raw"] * 3


def test_a_raw_disk_holding_a_qcow2_header_is_detected_as_qcow2(tmp_path: Path) -> None:
    """Why detection happens once, at import: a guest can write a qcow2 header (naming any host file as its
    backing file) at the start of its raw disk. Probed again, that disk would turn into a qcow2 image; the
    format recorded when the volume was made is what counts from then on (the service keeps it)."""
    q = tmp_path / "q"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", str(q), "1M"])
    raw = sparse_file(tmp_path / "guest-disk", 8 * MiB, [])
    assert files.detect_format(raw) == "raw"
    with raw.open("r+b") as f:  # what the guest does
        f.write(q.read_bytes()[:4096])
    assert files.detect_format(raw) == "qcow2"


def test_detect_format_does_not_follow_symlinks(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc/hostname")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        files.detect_format(tmp_path / "link")


# --- sizes ----------------------------------------------------------------------------------------------------


def test_allocated_bytes_and_fs_space(tmp_path: Path) -> None:
    f = sparse_file(tmp_path / "f", 64 * MiB, [0, 10 * MiB])
    assert 2 * MiB <= files.allocated_bytes(f) < 3 * MiB
    capacity, available = files.fs_space(tmp_path)
    assert 0 < available <= capacity
    df = subprocess.run(["df", "-B1", "--output=size,avail", str(tmp_path)], capture_output=True, text=True)
    df_capacity, df_available = (int(v) for v in df.stdout.split()[-2:])
    assert df_capacity == capacity
    assert abs(df_available - available) < 256 * MiB  # others may write meanwhile


# --- copy_file ------------------------------------------------------------------------------------------------


def test_copy_file_keeps_holes_and_content(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", 64 * MiB, [0, 5 * MiB, 63 * MiB, 20 * MiB + 4096], chunk=MiB - 8192)
    seen: list[float] = []
    files.copy_file(src, tmp_path / "dst", progress=seen.append)
    dst = tmp_path / "dst"
    assert dst.stat().st_size == src.stat().st_size
    assert digest(dst) == digest(src)
    assert abs(files.allocated_bytes(dst) - files.allocated_bytes(src)) <= 64 * 1024
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert seen and seen == sorted(seen) and seen[-1] == 1.0


def test_copy_file_thick(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", 16 * MiB, [MiB])
    files.copy_file(src, tmp_path / "dst", sparse=False)
    assert files.allocated_bytes(tmp_path / "dst") >= 16 * MiB
    assert digest(tmp_path / "dst") == digest(src)


def test_copy_file_empty_and_all_hole(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    files.copy_file(tmp_path / "empty", tmp_path / "empty2")
    assert (tmp_path / "empty2").read_bytes() == b""
    hole = sparse_file(tmp_path / "hole", 32 * MiB, [])
    files.copy_file(hole, tmp_path / "hole2")
    assert (tmp_path / "hole2").stat().st_size == 32 * MiB
    assert files.allocated_bytes(tmp_path / "hole2") == 0


def test_copy_file_never_overwrites_nor_follows_links(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", MiB, [0])
    (tmp_path / "there").write_text("keep me")
    with pytest.raises(FileExistsError):
        files.copy_file(src, tmp_path / "there")
    assert (tmp_path / "there").read_text() == "keep me"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        files.copy_file(src, tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("refused", [["copy_file_range"], ["copy_file_range", "sendfile"]])
def test_copy_file_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: list[str]) -> None:
    """Where copy_file_range is refused (EXDEV: old kernels across filesystems) sendfile copies; where that is
    refused too, pread/pwrite."""

    def refuser(code: int) -> object:
        def refuse(*args: object, **kwargs: object) -> int:
            raise OSError(code, os.strerror(code))

        return refuse

    for name in refused:
        monkeypatch.setattr(os, name, refuser(errno.EXDEV if name == "copy_file_range" else errno.EINVAL))
    src = sparse_file(tmp_path / "src", 8 * MiB, [0, 3 * MiB + 512])
    files.copy_file(src, tmp_path / "dst")
    assert digest(tmp_path / "dst") == digest(src)
    assert files.allocated_bytes(tmp_path / "dst") <= files.allocated_bytes(src) + 64 * 1024


def test_copy_file_progress_exception_removes_the_copy(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", 8 * MiB, [0])

    def cancel(fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.copy_file(src, tmp_path / "dst", progress=cancel)
    assert not (tmp_path / "dst").exists()


def test_copy_file_no_space(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", 16 * MiB, list(range(0, 16 * MiB, MiB)))
    with small_tmpfs(tmp_path / "full") as full:
        with pytest.raises(NoSpace, match=str(full / "dst")) as exc:
            files.copy_file(src, full / "dst")
        assert exc.value.status == 507
        assert not (full / "dst").exists()  # a failed copy is removed, freeing its space


# --- preallocate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_preallocate_reserves_every_block_and_keeps_data(tmp_path: Path, mode: str) -> None:
    f = sparse_file(tmp_path / "f", 16 * MiB, [MiB, 7 * MiB + 4096])
    before = digest(f)
    files.preallocate(f, mode)
    assert files.allocated_bytes(f) >= 16 * MiB
    assert digest(f) == before


def test_preallocate_off_and_invalid(tmp_path: Path) -> None:
    f = sparse_file(tmp_path / "f", 16 * MiB, [])
    files.preallocate(f, "off")
    assert files.allocated_bytes(f) == 0
    with pytest.raises(ValueError, match="does not apply"):
        files.preallocate(f, "metadata")
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    files.preallocate(empty, "falloc")  # posix_fallocate refuses a length of 0: nothing to do instead


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_preallocate_no_space(tmp_path: Path, mode: str) -> None:
    with small_tmpfs(tmp_path / "full") as full:
        f = sparse_file(full / "f", 16 * MiB, [])
        with pytest.raises(NoSpace, match=str(f)):
            files.preallocate(f, mode)
