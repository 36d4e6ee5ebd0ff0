"""The one way vmkit runs host programs: an argv list, never a shell string."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
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
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
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
    if check and not result.ok:
        detail = (cp.stderr or cp.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"exit status {cp.returncode}"
        raise CommandFailed(f"{args[0]} failed: {tail}")
    return result
