"""The one wrapper around qemu-img: every call vmkit makes to it goes through here.

Invariants:
- Formats are always given (-f, -F, -O): qemu-img never probes one. A probed format lets a guest that wrote a
  qcow2 header into its raw disk make the host open any file as its backing image.
- Only checked values reach argv: formats and preallocation modes from fixed sets, sizes as positive ints,
  paths made so that qemu-img cannot read them as an option ("-x") or a protocol ("nbd:…", "json:…").
- Runs through vmkit.util.proc with LC_ALL=C, so that qemu-img's "No space left on device" is recognised
  whatever the daemon's locale and turned into NoSpace; any other failure is CommandFailed.
- Commands that make a file (create, convert) refuse an existing target and remove what they made when they
  fail, so a failed call leaves nothing behind and can never overwrite a volume.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.errors import CommandFailed, Conflict, NoSpace, VmkitError
from vmkit.util.proc import Result, run, run_streaming

QEMU_IMG = "qemu-img"
DISK_FORMATS = ("raw", "qcow2")
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_ENV = {"LC_ALL": "C"}  # qemu-img's error texts come from strerror(), which follows the locale
# qemu-img dies with the daemon: one left running after a kill -9 would go on writing a file the next start
# removes, and hold the image's lock meanwhile. (setpriv execs it in place; the signal survives the exec.)
_DIE_WITH_DAEMON = ("setpriv", "--pdeathsig", "KILL", "--")
_ENOSPC_TEXT = "No space left on device"
# qemu-img info and check parse images that may come from anywhere: a crafted qcow2 can make them use huge
# amounts of memory or CPU (CVE-2015-5162), so they run under limits. info reads headers only: 1 GiB of address
# space and 30 s of CPU, as OpenStack gives it. check walks all metadata, which takes longer and, for a big
# image, more memory (2 bytes of refcount per cluster): 4 GiB and no CPU bound.
_INFO_LIMITS = ["prlimit", f"--as={1024**3}", "--cpu=30", "--"]
_CHECK_LIMITS = ["prlimit", f"--as={4 * 1024**3}", "--"]
_INFO_TIMEOUT_S = 60
# convert: -W lets writes land out of order and -m 16 keeps 16 requests in flight, so a slow device always
# has work queued; -S 4k skips writing runs of zeros of 4 KiB and more, so holes and zeroed ranges of the
# source stay holes in the copy. -t none writes the target with O_DIRECT: through the page cache (qemu-img's
# default), 16 writers on one file contend for its lock in the kernel and a 1 GiB clone often takes 3x as long
# with the CPU busy in sys (bench/storage.py); O_DIRECT is steady, and leaves little for the final fsync.
_CONVERT_TUNING = ["-W", "-m", "16", "-S", "4k"]
_NO_O_DIRECT = "does not support O_DIRECT"  # qemu-img's words when the target's filesystem refuses it
_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class ImageInfo:
    virtual_size: int
    actual_size: int  # bytes allocated on the host
    format: str
    backing_file: str | None  # as qemu-img resolves it (relative names against the image's directory)
    backing_format: str | None
    dirty: bool  # qcow2's "corrupt" bit or dirty flag (lazy refcounts left unflushed) is set


def _check_fmt(fmt: str) -> str:
    """A format qemu-img may write: raw or qcow2."""
    if fmt not in DISK_FORMATS:
        raise ValueError(f"invalid image format {fmt!r}: use raw or qcow2")
    return fmt


def _read_fmt(fmt: str) -> str:
    """A format to read an image as: raw, qcow2, or iso (an install medium, which QEMU reads as raw)."""
    if fmt == "iso":
        return "raw"
    return _check_fmt(fmt)


def _check_prealloc(fmt: str, prealloc: str) -> str:
    if prealloc not in PREALLOC_MODES:
        raise ValueError(f"invalid preallocation {prealloc!r}: use one of {', '.join(PREALLOC_MODES)}")
    if fmt == "raw" and prealloc == "metadata":
        raise ValueError("preallocation metadata needs qcow2: a raw image has no metadata")
    return prealloc


def _check_size(size_bytes: int, *, zero_ok: bool = False) -> int:
    # bool is an int: refused, as is anything that is not a plain int (a str would go to argv unchecked).
    if type(size_bytes) is not int or size_bytes < 0 or (size_bytes == 0 and not zero_ok):
        raise ValueError(f"invalid size {size_bytes!r}: must be a positive number of bytes")
    return size_bytes


class Url(str):
    """A shared volume's URL (nfs://…, iscsi://…, built by vmkit from checked parts: services/sharedpools.py):
    passed to qemu-img as it is, for its network drivers. The server owns the file: nothing here checks for it,
    chmods or removes it (the shared-pool code names and renames files itself)."""


Target = Path | Url


def _arg(path: Target) -> str:
    """path as one qemu-img argument: relative paths get "./", so "-x" is no option and "nbd:x" no protocol
    (qemu-img takes a name for a protocol when a ":" comes before any "/"). A Url goes as it is."""
    if isinstance(path, Url):
        return str(path)
    s = os.fspath(path)
    if not s:
        raise ValueError("empty path")
    return s if s.startswith("/") else "./" + s


def _backing_arg(path: Path) -> str:
    """A backing path as the value of -b, written into the header as it is: an option value cannot be taken
    for an option, so only a protocol-like relative name gets "./"."""
    s = os.fspath(path)
    if not s:
        raise ValueError("empty path")
    colon, slash = s.find(":"), s.find("/")
    return "./" + s if colon >= 0 and (slash < 0 or colon < slash) else s


def _failure(result: Result, target: Target) -> VmkitError:
    """The error for a failed qemu-img run about target."""
    if _ENOSPC_TEXT in result.stderr:
        return NoSpace(f"no space left on the filesystem holding {target}")
    lines = (result.stderr or result.stdout).strip().splitlines()
    tail = lines[-1] if lines else f"exit status {result.returncode}"
    verb = result.argv[result.argv.index(QEMU_IMG) + 1]
    return CommandFailed(f"qemu-img {verb} failed on {target}: {tail}")


def _raise_for(result: Result, target: Target) -> None:
    if not result.ok:
        raise _failure(result, target)


def _qemu_img(args: Sequence[str], target: Target, *, timeout_s: float | None = 600, limits: bool = False) -> Result:
    argv = [*(_INFO_LIMITS if limits else []), QEMU_IMG, *args]
    result = run([*_DIE_WITH_DAEMON, *argv], check=False, env=_ENV, timeout_s=timeout_s)
    _raise_for(result, target)
    return result


def _refuse_existing(path: Target) -> None:
    # qemu-img create and convert truncate an existing file: never let them near a volume that exists.
    if not isinstance(path, Url) and os.path.lexists(path):
        raise Conflict(f"{path} already exists")


def _made(path: Target) -> None:
    """Finish a file qemu-img made: private (its umask left it world-readable, and a disk holds a guest's
    data) and on stable storage (convert writes with cache=unsafe, so nothing is flushed until this), so a
    rename that follows cannot outlive a crash without its data. (On NFS, qemu-img's own close commits it.)"""
    if isinstance(path, Url):
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpace(f"no space left on the filesystem holding {path}") from e
        raise
    finally:
        os.close(fd)


def _unlink(path: Target) -> None:
    if not isinstance(path, Url):
        path.unlink(missing_ok=True)


def create(
    path: Target,
    *,
    fmt: str,
    size_bytes: int,
    prealloc: str = "off",
    backing: Path | None = None,
    backing_fmt: str | None = None,
) -> None:
    """Create a new image at path (which must not exist).

    With backing, a qcow2 overlay on it: backing_fmt is required, and size_bytes 0 means the backing image's
    size. A relative backing path is recorded as given and resolved against path's directory. Overlays are
    thin (qemu-img 7.2 only preallocates an overlay with extended L2 entries), so prealloc must be "off".
    """
    _check_fmt(fmt)
    _check_prealloc(fmt, prealloc)
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        if fmt != "qcow2":
            raise ValueError("only a qcow2 image can have a backing image")
        if backing_fmt is None:
            raise ValueError("backing_fmt is required: the format of a backing image is never probed")
        if prealloc != "off":
            raise ValueError("an overlay is thin: preallocation must be off")
        _check_size(size_bytes, zero_ok=True)
        args += ["-b", _backing_arg(backing), "-F", _read_fmt(backing_fmt)]
    else:
        if backing_fmt is not None:
            raise ValueError("backing_fmt without backing")
        _check_size(size_bytes)
    if prealloc != "off":
        args += ["-o", f"preallocation={prealloc}"]
    args.append(_arg(path))
    if size_bytes:
        args.append(str(size_bytes))
    _refuse_existing(path)
    try:
        # Writing every byte (full) takes as long as the disk needs: no time limit then.
        _qemu_img(args, path, timeout_s=None if prealloc in ("falloc", "full") else 600)
        _made(path)
    except BaseException:
        _unlink(path)
        raise


def _image_info(d: dict[str, Any]) -> ImageInfo:
    specific = (d.get("format-specific") or {}).get("data") or {}
    backing = d.get("full-backing-filename") or d.get("backing-filename")
    if backing and backing.startswith("/"):
        backing = os.path.normpath(backing)  # "/pool/./base" (a relative "./base" in the header) → "/pool/base"
    return ImageInfo(
        virtual_size=int(d["virtual-size"]),
        actual_size=int(d.get("actual-size", 0)),
        format=str(d["format"]),
        backing_file=backing,
        backing_format=d.get("backing-filename-format"),
        dirty=bool(d.get("dirty-flag")) or bool(specific.get("corrupt")),
    )


def _info_json(path: Path, fmt: str, *, chain: bool) -> Any:
    # -U: no lock is taken, so this works on an image a running QEMU holds (figures may then be a moment old).
    args = ["info", "-U", "--output=json", "-f", _read_fmt(fmt)]
    if chain:
        args.append("--backing-chain")
    result = _qemu_img([*args, _arg(path)], path, timeout_s=_INFO_TIMEOUT_S, limits=True)
    try:
        return json.loads(result.stdout)
    except ValueError as e:
        raise CommandFailed(f"qemu-img info on {path}: unreadable output ({e})") from e


def info(path: Path, fmt: str) -> ImageInfo:
    """What qemu-img says of the image at path read as fmt ("iso" reads as raw). Backing files are not opened."""
    return _image_info(_info_json(path, fmt, chain=False))


def chain_info(path: Path, fmt: str) -> list[ImageInfo]:
    """The image and every image under it, top first. qemu-img opens each backing file by the name in the
    header above it: callers check the chain (vmkit.storage.qcow2.backing_chain) before trusting it."""
    return [_image_info(d) for d in _info_json(path, fmt, chain=True)]


def resize(path: Path, fmt: str, size_bytes: int, *, shrink: bool = False, prealloc: str = "off") -> None:
    """Set the virtual size. Shrinking throws away everything past the new end, so it is refused (ValueError)
    unless shrink=True. prealloc applies to the added part when growing."""
    _check_fmt(fmt)
    _check_size(size_bytes)
    _check_prealloc(fmt, prealloc)
    current = info(path, fmt).virtual_size
    if size_bytes < current and not shrink:
        raise ValueError(
            f"{path}: shrinking from {current} to {size_bytes} bytes loses the data past the new end; "
            "allow shrinking to do it"
        )
    args = ["resize", "-q", "-f", fmt]
    if shrink:
        args.append("--shrink")
    if prealloc != "off":
        args.append(f"--preallocation={prealloc}")
    _qemu_img([*args, _arg(path), str(size_bytes)], path, timeout_s=None if prealloc == "full" else 600)


def _progress_reader(progress: Callable[[float], None]) -> Callable[[str], None]:
    """on_output for `qemu-img convert -p`, whose stdout redraws "    (12.34/100%)" with \\r."""

    def on_output(piece: str) -> None:
        m = _PROGRESS.search(piece)
        if m:
            progress(min(1.0, max(0.0, float(m.group(1)) / 100)))

    return on_output


def convert(
    src: Target,
    src_fmt: str,
    dst: Target,
    dst_fmt: str,
    *,
    prealloc: str = "off",
    progress: Callable[[float], None] | None = None,
) -> None:
    """Write src (read as src_fmt, "iso" as raw) into the new image dst (which must not exist) as dst_fmt.

    The result stands alone: a backing chain under src is read through and flattened into it, so every file
    that chain names ends up in dst: callers check the chain first (vmkit.storage.qcow2.backing_chain), or a
    qcow2 from elsewhere naming /etc/shadow as its backing file would copy it. Zero ranges stay unallocated
    unless prealloc asks otherwise. dst is fsynced before this returns and removed if it fails.
    progress(fraction) is called as qemu-img reports it, last with 1.0.
    """
    in_fmt = _read_fmt(src_fmt)
    _check_fmt(dst_fmt)
    _check_prealloc(dst_fmt, prealloc)
    args = ["convert", *_CONVERT_TUNING, "-f", in_fmt, "-O", dst_fmt]
    if prealloc != "off":
        args += ["-o", f"preallocation={prealloc}"]
    if progress is not None:
        args.append("-p")
    paths = [_arg(src), _arg(dst)]
    _refuse_existing(dst)
    try:
        # The page cache only where the filesystem has no O_DIRECT (a network target has no host cache anyway).
        for cache in ([] if isinstance(dst, Url) else ["-t", "none"], []):
            argv = [QEMU_IMG, *args, *cache, *paths]
            # As long as the data takes to copy: no time limit.
            if progress is None:
                result = run([*_DIE_WITH_DAEMON, *argv], check=False, env=_ENV, timeout_s=None)
            else:
                result = run_streaming(
                    [*_DIE_WITH_DAEMON, *argv], on_output=_progress_reader(progress), check=False, env=_ENV
                )
            if result.ok or _NO_O_DIRECT not in result.stderr:
                break
            _unlink(dst)
        _raise_for(result, dst)
        _made(dst)
    except BaseException:
        _unlink(dst)
        raise
    if progress is not None:
        progress(1.0)


def rebase_unsafe(path: Path, backing: Path, backing_fmt: str) -> None:
    """Rewrite the backing file name and format in the qcow2 header of path, touching no data (-u).

    Only correct when the new backing image has the same content as the old one (it was moved or renamed)."""
    bfmt = _read_fmt(backing_fmt)
    _qemu_img(["rebase", "-q", "-u", "-f", "qcow2", "-b", _backing_arg(backing), "-F", bfmt, _arg(path)], path)


def rebase(path: Path, backing: Path | None, backing_fmt: str | None) -> None:
    """Make the qcow2 at path an overlay on `backing` (None: standalone) with the same guest-visible content:
    what differs between its old backing chain and the new one is copied into it first (a safe rebase, the
    offline twin of QEMU's block-stream). Both chains are read by the names in the headers: callers check them.
    A crash half-way leaves path as it was (qemu-img writes the header last)."""
    args = ["rebase", "-q", "-f", "qcow2", "-t", "writeback"]
    if backing is None:
        args += ["-b", ""]
    else:
        if backing_fmt is None:
            raise ValueError("backing_fmt is required: the format of a backing image is never probed")
        args += ["-b", _backing_arg(backing), "-F", _read_fmt(backing_fmt)]
    _qemu_img([*args, _arg(path)], path, timeout_s=None)


def commit(path: Path) -> None:
    """Write the qcow2 overlay at path into its backing image (the one its header names; callers check it)
    and empty it (qemu-img commit; the offline twin of QEMU's block-commit)."""
    _qemu_img(["commit", "-q", "-f", "qcow2", "-t", "writeback", _arg(path)], path, timeout_s=None)


SNAPSHOT_OPS = {"create": "-c", "apply": "-a", "delete": "-d"}


def snapshot(path: Path, op: str, tag: str) -> None:
    """Create, apply (revert the image to) or delete the internal snapshot `tag` of the qcow2 at path, which no
    QEMU may have open. apply leaves the snapshot in place."""
    if op not in SNAPSHOT_OPS:
        raise ValueError(f"unknown snapshot operation {op!r}")
    if not tag or tag.startswith("-") or "\0" in tag:
        raise ValueError(f"invalid snapshot tag {tag!r}")
    # qemu-img snapshot has no -f: the format is given in --image-opts instead (never probed).
    opts = "driver=qcow2,file.driver=file,file.filename=" + os.path.abspath(path).replace(",", ",,")
    _qemu_img(["snapshot", "-q", SNAPSHOT_OPS[op], tag, "--image-opts", opts], path, timeout_s=None)


def snapshot_tags(path: Path) -> dict[str, int]:
    """The internal snapshots of the qcow2 at path: tag → size of the saved VM state (0: disks only)."""
    d = _info_json(path, "qcow2", chain=False)
    return {str(s["name"]): int(s.get("vm-state-size", 0)) for s in d.get("snapshots") or []}


def check(path: Path, fmt: str) -> tuple[bool, str]:
    """(clean, qemu-img's report). Leaked clusters (exit 3: space wasted, no data at risk) count as not
    clean, like corruption (exit 2). Raw images have no metadata to check: always clean."""
    in_fmt = _read_fmt(fmt)
    argv = [*_CHECK_LIMITS, QEMU_IMG, "check", "-f", in_fmt, _arg(path)]
    result = run([*_DIE_WITH_DAEMON, *argv], check=False, env=_ENV, timeout_s=None)
    text = (result.stderr + result.stdout).strip()  # the ERROR lines come on stderr, the summary on stdout
    if result.returncode == 0:
        return True, text
    if result.returncode == 63:  # "This image format does not support checks"
        return True, f"{in_fmt} images have no metadata to check"
    if result.returncode in (2, 3):
        return False, text
    raise _failure(result, path)  # 1: the check could not run


def compare(a: Path, a_fmt: str, b: Path, b_fmt: str) -> bool:
    """Whether the two images hold the same guest-visible content (allocation and format aside; where sizes
    differ, the larger one's tail must be zeros)."""
    args = ["compare", "-U", "-q", "-f", _read_fmt(a_fmt), "-F", _read_fmt(b_fmt), _arg(a), _arg(b)]
    result = run([*_DIE_WITH_DAEMON, QEMU_IMG, *args], check=False, env=_ENV, timeout_s=None)
    if result.returncode in (0, 1):  # identical, different; 2 and up are errors
        return result.returncode == 0
    raise _failure(result, a)
