"""Backing chains read from qcow2 headers match what qemu-img reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmkit.storage.qcow2 import Backing, ImageError, backing_chain


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
