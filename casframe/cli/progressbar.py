"""The progress bar of the command line: tqdm on stderr, numbered like every other output.

tqdm is imported when the first bar starts, never when the CLI starts.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import IO, Any

from casframe.progress import Progress
from casframe.units import format_size

__all__ = ["TqdmProgress"]


class TqdmProgress(Progress):
    """A tqdm bar on stderr; thread-safe, since workers report from several threads."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._bar: Any = None

    def start(self, task: str, total: int | None = None, unit: str = "files") -> None:
        with self._lock:
            self._close_bar()
            self._bar = _bar_class()(
                total=total,
                desc=task,
                unit=unit,
                bar_format=_bar_format(total is not None, unit == "B"),
                file=self._file if self._file is not None else sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def advance(self, amount: int = 1) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(amount)

    def finish(self) -> None:
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _bar_format(total: bool, in_bytes: bool) -> str:
    """Numbers as everywhere else in casframe: ``20,441 files``, ``16.5 KiB``, the unit spaced."""
    amount = "{n_text} / {total_text}" if total else "{n_text}"
    if not in_bytes:
        amount += " {unit}"
    if total:
        return f"{{desc}}: {{percentage:3.0f}}%|{{bar}}| {amount} [{{elapsed}}<{{remaining}}, " \
            "{rate_text}]"
    return "{desc}: " + amount + " [{elapsed}, {rate_text}]"


@functools.cache
def _bar_class() -> Any:
    """tqdm's bar, numbered in casframe's own format (tqdm is imported on first use)."""
    from tqdm import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self) -> dict[str, Any]:
            values: dict[str, Any] = super().format_dict
            in_bytes = values["unit"] == "B"
            show = format_size if in_bytes else (lambda n: f"{int(n):,}")
            values["n_text"] = show(values["n"])
            values["total_text"] = show(values["total"]) if values["total"] else "?"
            elapsed = values["elapsed"]
            rate = values["rate"] or (values["n"] / elapsed if elapsed else 0)
            values["rate_text"] = (
                f"{format_size(rate)}/s" if in_bytes else f"{rate:,.0f} {values['unit']}/s"
            )
            return values

    return Bar
