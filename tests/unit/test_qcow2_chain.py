"""Backing chains read from qcow2 headers match what qemu-img reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmkit.storage.qcow2 import EXT_BACKING_FORMAT, Backing, ImageError, backing_chain


def _img(
    path: Path, *, backing: Path | None = None, fmt: str = "qcow2", bfmt: str | None = None, rel: bool = False
) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", backing.name if rel else str(backing), "-F", bfmt or "qcow2"]
    subprocess.run([*argv, str(path), "1M"], check=True, cwd=path.parent)
    return path


def test_chain_of_three(tmp_path: Path) -> None:
    raw = _img(tmp_path / "base.raw", fmt="raw")
    mid = _img(tmp_path / "mid.qcow2", backing=raw, bfmt="raw")
    top = _img(tmp_path / "top.qcow2", backing=mid, rel=True)
    chain = backing_chain(str(top), "qcow2")
    assert chain == [Backing(str(mid), "qcow2"), Backing(str(raw), "raw")]
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(top)],
                       capture_output=True, text=True, check=True).stdout
    )  # fmt: skip
    assert [i["filename"] for i in info[1:]] == [b.path for b in chain]


def test_no_backing(tmp_path: Path) -> None:
    assert backing_chain(str(_img(tmp_path / "a.qcow2")), "qcow2") == []
    assert backing_chain(str(_img(tmp_path / "a.raw", fmt="raw")), "raw") == []


def test_missing_backing_is_a_clear_error(tmp_path: Path) -> None:
    base = _img(tmp_path / "base.qcow2")
    top = _img(tmp_path / "top.qcow2", backing=base)
    base.unlink()
    with pytest.raises(ImageError, match="not a local file"):
        backing_chain(str(top), "qcow2")


def _drop_backing_format(image: Path) -> None:
    """Make image look like one written before backing formats were recorded (QEMU then probes)."""
    data = bytearray(image.read_bytes())
    at = data.find(EXT_BACKING_FORMAT.to_bytes(4, "big"), 0, 4096)
    assert at > 0
    data[at : at + 4] = (0x12345678).to_bytes(4, "big")  # an unknown extension, skipped by readers
    image.write_bytes(bytes(data))


def test_recorded_formats_beat_the_content(tmp_path: Path) -> None:
    """A raw volume holding a qcow2 header (a guest can write one) is not taken for a qcow2 with a backing
    file of the guest's choosing (libvirt CVE-2010-2237): vmkit's recorded format decides, never the bytes."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"host secret")
    base = tmp_path / "base.raw"
    _img(tmp_path / "evil.qcow2", backing=secret, bfmt="raw")
    (tmp_path / "evil.qcow2").rename(base)  # a raw volume whose content is a qcow2 pointing at the secret
    top = _img(tmp_path / "top.qcow2", backing=base, bfmt="raw")
    _drop_backing_format(top)
    # Without recorded formats the content is probed and the secret joins the chain: the old hole.
    assert [b.path for b in backing_chain(str(top), "qcow2")] == [str(base), str(secret)]
    recorded = {str(base): "raw"}
    seen: list[str] = []

    def format_of(path: str) -> str | None:
        seen.append(path)
        return recorded.get(path)

    assert backing_chain(str(top), "qcow2", format_of=format_of) == [Backing(str(base), "raw")]
    assert seen == [str(base)]


def test_recorded_format_is_used_over_the_header(tmp_path: Path) -> None:
    base = _img(tmp_path / "base.qcow2")
    top = _img(tmp_path / "top.qcow2", backing=base, bfmt="raw")  # a header that says raw
    assert backing_chain(str(top), "qcow2", format_of=lambda p: "qcow2") == [Backing(str(base), "qcow2")]


def test_backing_outside_every_pool_is_refused(tmp_path: Path) -> None:
    base = _img(tmp_path / "base.qcow2")
    top = _img(tmp_path / "top.qcow2", backing=base)
    with pytest.raises(ImageError, match="not a volume of any pool"):
        backing_chain(str(top), "qcow2", format_of=lambda p: None)


def test_backing_is_looked_up_by_its_real_path(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    base = _img(pool / "base.qcow2")
    (tmp_path / "link.qcow2").symlink_to(base)
    top = _img(tmp_path / "top.qcow2", backing=tmp_path / "link.qcow2")
    formats = {str(base): "qcow2"}
    assert backing_chain(str(top), "qcow2", format_of=formats.get) == [Backing(str(base), "qcow2")]
