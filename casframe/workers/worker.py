"""The helper program: ``python -m casframe.workers.worker FACTORY URL PARENT_PID``.

Started by :class:`casframe.workers.pool.WorkerPool`, never by hand. It opens the store
``FACTORY`` (a ``module:function`` taking a :class:`~casframe.StoreURL`) makes of ``URL``,
greets its parent with ``(True, pid)`` (or the error that kept the store from opening), then
answers each ``(task, payload)`` read from its standard input with the task's result or error
on its standard output (:mod:`casframe.workers.protocol`), until the input is closed.

It runs only the tasks listed in :data:`TASKS`. It exits when its parent dies: its input then
ends, and on Linux the kernel also sends it SIGKILL (``PR_SET_PDEATHSIG``), which stops it even
in the middle of a batch. It ignores SIGINT: Ctrl-C in a terminal reaches every process of
the foreground group, and it is the parent that decides to stop.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from casframe.errors import WorkerError
from casframe.registry import StoreURL
from casframe.workers.protocol import describe_error, read_message, write_message
from casframe.workers.tasks import copy_files, import_files, link_files

__all__ = ["TASKS", "main"]

#: What a parent may ask a helper to do, by ``module:name``: each takes (store, payload).
TASKS: dict[str, Callable[[Any, Any], Any]] = {
    f"{task.__module__}:{task.__qualname__}": task
    for task in (import_files, link_files, copy_files)
}

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGKILL when the parent dies; exit now if it is already gone.

    Strictly, the signal comes when the parent's *thread* that started this process ends: a
    pool of helpers lives within one import or checkout call, on the thread that made it.
    """
    if sys.platform.startswith("linux"):
        # The interpreter's own symbols, libc's among them: no library search (ctypes.util
        # would load subprocess, shutil and tempfile to start every helper).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # died before the request above: no signal will come
        os._exit(1)


def _channels() -> tuple[BinaryIO, BinaryIO]:
    """The pipes to the parent, moved off fds 0 and 1 so that nothing printed by accident
    (a library's warning) can corrupt a message: fd 1 then writes to standard error."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return requests, replies


def _open(factory: str, url: str) -> Any:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)(StoreURL.parse(url))


def serve(store: Any, requests: BinaryIO, replies: BinaryIO) -> None:
    while True:
        try:
            name, payload = read_message(requests)
        except EOFError:
            return
        task = TASKS.get(name)
        try:
            if task is None:
                raise WorkerError(f"helper process has no task {name!r}")
            reply = (True, task(store, payload))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the parent
            reply = (False, describe_error(exc))
        write_message(replies, reply)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    factory, url, parent = argv
    _die_with_parent(int(parent))
    requests, replies = _channels()
    try:
        store = _open(factory, url)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which raises it
        write_message(replies, (False, describe_error(exc)))
        return 1
    try:
        write_message(replies, (True, os.getpid()))
        serve(store.verified, requests, replies)  # the tasks work on verified blobs
    except BrokenPipeError:
        return 1  # the parent is gone
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
