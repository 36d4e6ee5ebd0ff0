"""The one way vmkit runs host programs: an argv list, never a shell string."""

from __future__ import annotations

import codecs
import os
import re
import selectors
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import CommandFailed


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """The child's environment: ours with env's entries on top (None: ours as it is)."""
    return None if env is None else {**os.environ, **env}


def _raise_unless_ok(result: Result) -> None:
    """CommandFailed naming the program and the last line it wrote (stderr first) when it failed."""
    if not result.ok:
        detail = (result.stderr or result.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"exit status {result.returncode}"
        raise CommandFailed(f"{result.argv[0]} failed: {tail}")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = 600,
    input_text: str | None = None,
) -> Result:
    """Run argv to completion and return its Result.

    With check=True a non-zero exit raises CommandFailed carrying the program's stderr, so callers never
    silently continue after a failed step.
    """
    args = tuple(os.fspath(a) for a in argv)
    full_env = _merged_env(env)
    started = time.monotonic()
    try:
        cp = subprocess.run(  # noqa: S603 - argv list, no shell
            args,
            cwd=cwd,
            env=full_env,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandFailed(f"{args[0]}: not installed ({e.strerror})") from e
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"{args[0]}: timed out after {timeout_s} s") from e
    result = Result(args, cp.returncode, cp.stdout, cp.stderr, time.monotonic() - started)
    if check:
        _raise_unless_ok(result)
    return result


_LINE_END = re.compile(r"[\r\n]")


def run_streaming(
    argv: Sequence[str | os.PathLike[str]],
    *,
    on_output: Callable[[str], None],
    timeout_s: float | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
) -> Result:
    """Run argv like run(), calling on_output(piece) for each piece of its stdout as it arrives.

    Pieces are split on \r as well as \n (progress meters such as `qemu-img convert -p` redraw one line
    with \r); empty pieces are skipped. stdout is also collected whole into the Result, stderr only there.
    Both pipes are read from one loop with a selector, so a program filling its stderr pipe cannot stall
    while we wait on stdout. merge_stderr sends stderr into the same pipe (for programs such as debootstrap
    that report progress there); the Result's stderr is then empty. If on_output raises, or timeout_s passes,
    the program is killed and reaped before the exception propagates: no caller is left with a process
    running behind its back.
    """
    args = tuple(os.fspath(a) for a in argv)
    full_env = _merged_env(env)
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=full_env,
        )
    except FileNotFoundError as e:
        raise CommandFailed(f"{args[0]}: not installed ({e.strerror})") from e
    assert proc.stdout is not None and (merge_stderr or proc.stderr is not None)
    out_fd = proc.stdout.fileno()
    err_fd = -1 if proc.stderr is None else proc.stderr.fileno()
    fds = [fd for fd in (out_fd, err_fd) if fd >= 0]
    decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in fds}
    texts: dict[int, list[str]] = {out_fd: [], err_fd: []}
    pending = ""  # stdout text after the last line end, not yet handed to on_output
    sel = selectors.DefaultSelector()
    try:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise CommandFailed(f"{args[0]}: timed out after {timeout_s} s")
            for key, _ in sel.select(wait):
                fd = key.fd
                data = os.read(fd, 65536)
                final = not data
                if final:
                    sel.unregister(fd)
                text = decoders[fd].decode(data, final=final)
                texts[fd].append(text)
                if fd != out_fd:
                    continue
                pieces = _LINE_END.split(pending + text)
                pending = pieces.pop()  # "" when the text ended on a line end
                if final and pending:
                    pieces.append(pending)
                    pending = ""
                for piece in pieces:
                    if piece:
                        on_output(piece)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            returncode = proc.wait(wait)
        except subprocess.TimeoutExpired as e:  # closed its pipes but did not exit
            raise CommandFailed(f"{args[0]}: timed out after {timeout_s} s") from e
    finally:
        sel.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    stdout, stderr = "".join(texts[out_fd]), "".join(texts[err_fd])
    result = Result(args, returncode, stdout, stderr, time.monotonic() - started)
    if check:
        _raise_unless_ok(result)
    return result
