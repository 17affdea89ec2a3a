"""Kernel copies of a local file into a ``file://`` upload, hashed by the core as they arrive.

:meth:`LocalBlobStore.begin_write_copy` copies the first window of the file before it returns
(so that a file the kernel cannot copy is declined at once, and a file of one window needs no
thread), then the rest on a thread of its own, window after window, while the core hashes the
windows already in the upload's temp file (:meth:`CopiedStream.wait_copied`, used by
:meth:`casframe.Digest.of_own_file`). ``copy_file_range`` and hashing both run without the
interpreter lock, so a large file takes about the longer of the two instead of their sum.

What this module must never do: let its thread touch a file descriptor after the upload gave
it up. The upload stops and joins the thread before it closes its temp file, and the caller's
source file is closed only after the upload is committed or aborted.
"""

from __future__ import annotations

import errno
import io
import os
import threading

from casframe import CasframeError, UnsupportedOperationError

__all__ = ["WINDOW", "CopiedStream", "KernelCopy"]

# Bytes per copy_file_range call: the core hashes one window while the next is copied. Large
# enough that the hand-over between the two threads costs nothing next to the copy (~4 ms at
# 4 GB/s), small enough that hashing starts early; the same as Digest.of_own_file's memory map
# window, so each window the core maps is whole when it maps it.
WINDOW = 16 << 20
# copy_file_range errors meaning "not between these files": stream the content instead.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
)


class KernelCopy:
    """The copy of ``source`` (from offset ``start`` to its end) into the new file ``target``.

    ``reserved``: the bytes reserved in ``target`` beforehand (0 if none); when the copy ends
    at another size (the file changed meanwhile), ``target`` is cut to what was copied.
    """

    def __init__(self, source: int, start: int, target: int, reserved: int, where: str) -> None:
        self._source, self._start, self._target = source, start, target
        self._reserved = reserved
        self._where = where
        self._changed = threading.Condition()
        #: Bytes copied so far; they stay as copied.
        self.copied = 0
        self._ended = False
        self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """Copy the first window here; continue on a thread if there is more.

        Raises :class:`UnsupportedOperationError` when the kernel cannot copy this file (or
        copies nothing of a file that reads fine, as procfs and some FUSE file systems do).
        """
        try:
            n = self._step()
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            raise UnsupportedOperationError(
                f"{self._where} cannot copy this file in the kernel: {exc}"
            ) from None
        if not n:
            raise UnsupportedOperationError(
                f"{self._where} copied nothing of this file: read it instead"
            )
        self.copied = n
        if n < WINDOW:  # the whole file (a short count only at its end): make sure of it here
            self._run()
            return
        self._thread = threading.Thread(target=self._run, name="casframe-copy", daemon=True)
        self._thread.start()

    def _step(self) -> int:
        copied = self.copied
        return os.copy_file_range(
            self._source, self._target, WINDOW, self._start + copied, copied
        )

    def _run(self) -> None:
        try:
            while True:
                if self._stopping:  # a reader still waiting must not take this for the end
                    raise CasframeError(f"{self._where}: the copy was stopped, its upload aborted")
                n = self._step()
                if not n:
                    if self._reserved and self.copied != self._reserved:
                        os.ftruncate(self._target, self.copied)  # changed size meanwhile
                    break
                with self._changed:
                    self.copied += n
                    self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised to the reader and the upload
            self._error = exc
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_copied(self, end: int) -> int:
        """Wait until ``end`` bytes are copied or the copy ended; the bytes there are up to
        ``end``. Raises the copy's error when it failed before ``end``."""
        with self._changed:
            while self.copied < end and not self._ended:
                self._changed.wait()
            if self.copied < end and self._error is not None:
                raise self._error
            return min(self.copied, end)

    def finish(self) -> None:
        """Wait for the end of the copy (the upload is about to be committed); raise its error."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop the copy after the window under way and wait for the thread (an abort)."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join()


class CopiedStream(io.RawIOBase):
    """The content of an upload's temp file (``fd``, its own descriptor) as ``copy`` fills it:
    reads wait for the bytes they return. :meth:`wait_copied` and :meth:`fileno` let the core
    hash the file in place, window by window."""

    def __init__(self, fd: int, copy: KernelCopy) -> None:
        super().__init__()
        self._fd = fd
        self._copy = copy
        self._position = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def wait_copied(self, end: int) -> int:
        return self._copy.wait_copied(end)

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        available = self._copy.wait_copied(self._position + len(view)) - self._position
        if available <= 0:
            return 0
        n = os.preadv(self._fd, [view[:available]], self._position)
        self._position += n
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()
