"""Progress reporting for long operations, independent of any terminal library.

Algorithms call a :class:`Progress` object; the CLI passes one that draws a progress bar, the
Python API passes nothing (:data:`NO_PROGRESS`). Implementations must be thread-safe: workers
report from several threads.
"""

from __future__ import annotations

__all__ = ["NO_PROGRESS", "Progress"]


class Progress:
    """Receives progress; the base class ignores everything."""

    def start(self, task: str, total: int | None = None, unit: str = "files") -> None:
        """A new phase begins; ``total`` is the amount of work when known."""

    def advance(self, amount: int = 1) -> None:
        """``amount`` more units of the current phase are done."""

    def finish(self) -> None:
        """The current phase is over."""


NO_PROGRESS = Progress()
