"""Crash points for tests: the daemon kills itself (SIGKILL, like `kill -9`) at a named step of multi-step work
when VMKIT_CRASH_AT names that step, so tests can check that the next start finishes or undoes it."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def crashpoint(step: str) -> None:
    if os.environ.get("VMKIT_CRASH_AT") == step:
        log.warning("VMKIT_CRASH_AT=%s: killing the daemon here", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
