"""Tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h).upper() for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    sys.stdout.write(table(headers, rows))


def emit(a: Any, data: Any, text: str) -> int:
    """Print data as JSON with --json (a.json), else the sentence for people."""
    if a.json:
        print_json(data)
    else:
        print(text)
    return 0


def human_size(n: int | None) -> str:
    """Bytes in binary units, as qemu-img prints them: 512 B, 64 MiB, 1.5 GiB."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return str(n)


def kv(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        sys.stdout.write(f"{k + ':':<{width + 1}} {'-' if v is None or v == '' else v}\n")


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._last = ""

    def update(self, fraction: float, message: str = "") -> None:
        if not self.tty:
            if message and message != self._last:
                sys.stderr.write(f"{self.label}: {int(fraction * 100):3d}% {message}\n")
                self._last = message
            return
        width = 30
        filled = int(width * max(0.0, min(1.0, fraction)))
        line = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {int(fraction * 100):3d}% {message[:40]}"
        sys.stderr.write(line.ljust(len(self._last)))
        self._last = line
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and self._last:
            sys.stderr.write("\n")
