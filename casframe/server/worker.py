"""One worker process of ``casframe serve --workers N`` (``python -m casframe.server.worker``).

Started by the supervisor (:mod:`casframe.server.workers`), never by hand: it reads its
:class:`~casframe.server.workers.WorkerSpec` from the first line of stdin, opens the store,
serves it on the shared port and writes ``ready`` on its status pipe, or ``error`` and what
went wrong. It stops gracefully on SIGTERM or SIGINT, and also when stdin ends: the
supervisor is gone, and a worker must never outlive it. Its log lines name it
(``worker 1 (pid 4242): ...``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from typing import Any

from casframe.errors import CasframeError
from casframe.server.app import Server
from casframe.server.lifecycle import SHUTDOWN_GRACE, call_sinks, configure_logging, serve_until
from casframe.server.workers import WorkerSpec

log = logging.getLogger("casframe.server")

# After its supervisor is gone, how long a worker that is still finishing calls may take before
# it ends itself: its grace and room for a loaded machine.
_ORPHAN_DEADLINE = SHUTDOWN_GRACE + 10.0
_STDIN = 0


def _read_spec() -> WorkerSpec:
    """The first line of stdin, read without buffering past it."""
    line = b""
    while not line.endswith(b"\n"):
        data = os.read(_STDIN, 1)
        if not data:
            raise SystemExit("casframe.server.worker is started by casframe serve --workers")
        line += data
    return WorkerSpec.from_json(line)


def _watch_supervisor(stop: threading.Event) -> None:
    """Stop when stdin ends (the supervisor exited or was killed); end the process if stopping
    takes far longer than the grace."""
    while os.read(_STDIN, 4096):  # unbuffered: a daemon thread must not hold stdin's lock
        pass
    if stop.is_set():
        return  # already stopping on a signal; the supervisor waits for that
    log.warning("the supervising casframe serve process is gone: stopping")
    stop.set()
    threading.Event().wait(_ORPHAN_DEADLINE)
    os._exit(1)


def _error_line(exc: BaseException) -> bytes:
    error: dict[str, Any] = {"message": str(exc)}
    if isinstance(exc, OSError) and not isinstance(exc, CasframeError):
        error.update(errno=exc.errno, strerror=exc.strerror, filename=exc.filename)
    return b"error " + json.dumps(error).encode() + b"\n"


def main() -> int:
    spec = _read_spec()
    configure_logging(
        spec.log_level,
        f"%(asctime)s %(name)s %(levelname)s worker {spec.index} (pid %(process)d): %(message)s",
    )
    stop = threading.Event()
    threading.Thread(target=_watch_supervisor, args=(stop,), name="casframe-lifeline",
                     daemon=True).start()
    # Not passed on to any process this one starts: its end-of-file tells the supervisor that
    # this worker has exited.
    os.set_inheritable(spec.status_fd, False)
    status = os.fdopen(spec.status_fd, "wb", buffering=0)
    serving = False

    def ready() -> None:
        nonlocal serving
        status.write(b"ready\n")
        serving = True

    try:
        store = spec.store_source().open(create=False)  # the supervisor created it
        try:
            with contextlib.ExitStack() as stack:
                server = Server(store, **{**spec.server,
                                          "instance_names": tuple(spec.server["instance_names"])},
                                worker_index=spec.index, worker_count=spec.count,
                                call_sinks=call_sinks(stack, store, spec.observing()))
                serve_until(server, ready, stop)
        finally:
            store.close()
    except (CasframeError, OSError) as exc:
        if serving:
            log.error("%s", exc)
        else:
            status.write(_error_line(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
