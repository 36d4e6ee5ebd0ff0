"""Undo stack for multi-step changes (Incus's Reverter): register an undo after each step that succeeded;
on failure they run in reverse order; `success()` keeps the change."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Reverter:
    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def add(self, fn: Callable[[], object]) -> None:
        self._undo.append(fn)

    def success(self) -> None:
        self._undo.clear()

    def __enter__(self) -> Reverter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        for fn in reversed(self._undo):
            with contextlib.suppress(Exception):
                fn()
        self._undo.clear()
