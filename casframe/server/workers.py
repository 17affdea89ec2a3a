"""``casframe serve --workers N``: N server processes on one address, and their supervisor.

The multi-process pattern grpcio documents for Python servers: each process runs a server of
its own, every one bound to the same port with ``SO_REUSEPORT``, and the kernel spreads the
incoming connections over them (a connection, and so every call on it, stays with one worker).
The supervisor (the ``casframe serve`` process) binds the address first, without listening on
it: that finds a free port for ``HOST:0``, reports a port in use in one line, and keeps the
port while a worker restarts.

The supervisor never forks and never serves. Workers are new interpreters
(``sys.executable -m casframe.server.worker``) given their settings on stdin; stdin stays open
for as long as the supervisor lives, so a worker whose supervisor is gone, even killed with
SIGKILL, sees end-of-file and stops. Each worker answers on a pipe of its own: ``ready`` once
it serves, or the error that kept it from serving; the pipe's end-of-file tells the supervisor
the worker has exited. A worker that exits while the others serve is reported and started
again after a back-off that doubles while it keeps failing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from casframe.errors import CasframeError, ConfigError
from casframe.lazy import lazy_module
from casframe.server.lifecycle import SHUTDOWN_GRACE, Observers, StoreSource
from casframe.server.tls import check_key_pair

if TYPE_CHECKING:
    from casframe.server import metrics
else:
    metrics = lazy_module("casframe.server.metrics")  # with prometheus_client: only if asked

__all__ = [
    "RESTART_DELAY_MAX",
    "RESTART_DELAY_MIN",
    "STABLE_AFTER",
    "STOP_TIMEOUT",
    "available_cores",
    "reserve_address",
    "serve_with_workers",
    "worker_count",
]

log = logging.getLogger("casframe.server.workers")

# The first restart of a worker that died waits this long (seconds); each further death within
# STABLE_AFTER of its start doubles the wait, up to RESTART_DELAY_MAX, so a worker that cannot
# start (a full disk, a broken plugin) costs a start every 30 s, not a spinning core.
RESTART_DELAY_MIN = 0.5
RESTART_DELAY_MAX = 30.0
# A worker that served this long (seconds) before dying starts again after RESTART_DELAY_MIN.
STABLE_AFTER = 60.0
# After SIGTERM, how long workers get to finish their calls and exit before they are killed:
# their own grace plus room for a loaded machine to run the shutdown itself.
STOP_TIMEOUT = SHUTDOWN_GRACE + 20.0
# Attempts at finding a free port for HOST:0 (another process may take the port found
# between the probe and the reservation).
_PORT_ATTEMPTS = 20

_WORKER_MODULE = "casframe.server.worker"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _single_process_reason(store_url: str, listen: str) -> str | None:
    if store_url.startswith("memory:"):
        return "a memory:// store lives in one process, so each worker would serve its own"
    if listen.startswith(("unix:", "unix-abstract:")):
        return "processes cannot share a unix: socket (SO_REUSEPORT shares TCP ports)"
    return None


def worker_count(requested: int | None, store_url: str, listen: str) -> int:
    """How many processes serve: ``requested`` (``--workers``), or by default one per core;
    one where processes could not share the store or the address."""
    reason = _single_process_reason(store_url, listen)
    if requested is None:
        return 1 if reason else available_cores()
    if requested > 1 and reason:
        raise ConfigError(f"--workers {requested}: {reason}; use --workers 1")
    return requested


# -- the address ---------------------------------------------------------------------------------


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _cannot_listen(exc: OSError, listen: str) -> OSError:
    """The error ``casframe serve`` reports for an address it cannot bind, as a lone server."""
    return OSError(exc.errno or errno.EADDRNOTAVAIL,
                   f"cannot listen ({(exc.strerror or str(exc)).strip()})", listen)


def _bind(family: int, address: tuple[Any, ...], *, shared: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def reserve_address(listen: str) -> tuple[list[socket.socket], str]:
    """Bind ``HOST:PORT`` (a free port for port 0) with ``SO_REUSEPORT``, without listening,
    for workers to share; return the sockets (close them when the workers are gone) and the
    address with its real port.

    Each address is first bound without ``SO_REUSEPORT``: that fails when anything holds the
    port, another ``casframe serve --workers`` included, which would otherwise share it
    silently. Raises the same ``OSError`` ("cannot listen (Address already in use)") as a
    server of one process.
    """
    host, port = _split(listen)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise _cannot_listen(exc, listen) from None
    targets = list(dict.fromkeys((info[0], info[4]) for info in infos))
    for _ in range(_PORT_ATTEMPTS):
        chosen, held = port, []
        try:
            for family, address in targets:
                address = (address[0], chosen, *address[2:])
                with _bind(family, address, shared=False) as probe:
                    chosen = probe.getsockname()[1]
                held.append(_bind(family, (address[0], chosen, *address[2:]), shared=True))
        except OSError as exc:
            for sock in held:
                sock.close()
            if port != 0 or exc.errno != errno.EADDRINUSE:
                raise _cannot_listen(exc, listen) from None
            continue  # the port found was taken meanwhile: find another
        head, _, _ = listen.rpartition(":")
        return held, f"{head}:{chosen}"
    raise OSError(errno.EADDRINUSE, "cannot listen (no free port found)", listen)


# -- the workers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is given on stdin (one JSON line): its number, the store and the
    ``Server`` keyword arguments (``listen`` with the real port), the log level, the file
    descriptor of the pipe it answers on, and what it records (:class:`Observers`)."""

    index: int
    count: int
    store: dict[str, Any]
    server: dict[str, Any]
    log_level: str
    status_fd: int
    observers: dict[str, Any]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes | str) -> WorkerSpec:
        return cls(**json.loads(line))

    def store_source(self) -> StoreSource:
        return StoreSource(**self.store)

    def observing(self) -> Observers:
        return Observers(**self.observers)


def describe_exit(status: int) -> str:
    """``exited with status 3`` / ``was killed by SIGKILL``, from a ``Popen.returncode``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


class _Worker:
    """One worker slot: the process in it, the pipe it answers on, its back-off."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.status_fd: int | None = None
        self.answer = b""
        self.ready = False
        self.started = 0.0
        self.delay = RESTART_DELAY_MIN
        self.restart_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def failure(self) -> str | None:
        """The error the worker reported instead of serving, if it did."""
        kind, _, detail = self.answer.partition(b" ")
        return detail.decode(errors="replace") if kind == b"error" else None


class Supervisor:
    """Starts ``count`` workers on one address, restarts those that die, stops them all."""

    def __init__(self, source: StoreSource, server_options: dict[str, Any], count: int,
                 log_level: str, observers: Observers | None = None) -> None:
        self.source = source
        self.observers = observers or Observers()
        self.options = dict(server_options)
        self.count = count
        self.log_level = log_level
        self.workers = [_Worker(index) for index in range(count)]
        self.selector = selectors.DefaultSelector()
        self.stopping = False

    # -- one worker

    def _spawn(self, worker: _Worker) -> None:
        read_end, write_end = os.pipe()
        spec = WorkerSpec(worker.index, self.count, asdict(self.source), self.options,
                          self.log_level, write_end, asdict(self.observers))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", _WORKER_MODULE], stdin=subprocess.PIPE,
                pass_fds=(write_end,),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        assert process.stdin is not None
        try:
            process.stdin.write(spec.to_json())
            process.stdin.flush()  # and kept open: the worker's lifeline
        except BrokenPipeError:
            pass  # it died at once; its status pipe tells
        os.set_blocking(read_end, False)
        self.selector.register(read_end, selectors.EVENT_READ, worker)
        worker.process, worker.status_fd = process, read_end
        worker.answer, worker.ready, worker.started = b"", False, time.monotonic()
        worker.restart_at = None

    def _read(self, worker: _Worker) -> bool:
        """Take what the worker wrote on its pipe; False once it has exited."""
        assert worker.status_fd is not None
        try:
            data = os.read(worker.status_fd, 4096)
        except BlockingIOError:
            return True
        if data:
            worker.answer += data
            worker.ready = worker.answer.startswith(b"ready\n")
            return True
        self.selector.unregister(worker.status_fd)
        os.close(worker.status_fd)
        worker.status_fd = None
        assert worker.process is not None
        if worker.process.stdin is not None:
            with contextlib.suppress(OSError):
                worker.process.stdin.close()
        worker.process.wait()
        if self.observers.metrics:
            metrics.process_exited(worker.process.pid)  # its live gauges no longer count
        return False

    def _start_error(self, worker: _Worker) -> Exception:
        assert worker.process is not None
        detail = worker.failure()
        if detail is None:
            return CasframeError(
                f"server worker {worker.index} {describe_exit(worker.process.returncode)} "
                "before serving"
            )
        error = json.loads(detail)
        if error.get("errno") is not None:
            return OSError(error["errno"], error["strerror"], error["filename"])
        return ConfigError(error["message"])

    # -- all of them

    def run(self, announce: Callable[[str], None]) -> None:
        """Serve until SIGTERM or SIGINT: reserve the address, start every worker, call
        ``announce(address)`` once all serve, keep them serving, then stop them all."""
        sockets, listen = reserve_address(self.options["listen"])
        self.options["listen"] = listen
        with self._signals(), contextlib.ExitStack() as held:
            for sock in sockets:
                held.callback(sock.close)
            held.callback(self._stop_all)
            for worker in self.workers:
                self._spawn(worker)
            if not self._wait_until_serving():
                return
            announce(listen)
            log.info("%d workers serving on %s (pids %s)", self.count, listen,
                     ", ".join(str(w.pid) for w in self.workers))
            self._supervise()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT set ``stopping`` and wake the selector."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)

        def request_stop(signum: int, frame: object) -> None:
            self.stopping = True

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        self.selector.register(wake_read, selectors.EVENT_READ, None)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.selector.unregister(wake_read)
            os.close(wake_read)
            os.close(wake_write)

    def _events(self, timeout: float | None) -> list[_Worker]:
        """The workers whose pipe has news, after waiting up to ``timeout`` seconds."""
        ready = []
        for key, _ in self.selector.select(timeout):
            if key.data is None:  # the signal wake-up pipe
                with contextlib.suppress(BlockingIOError):
                    while os.read(key.fd, 512):
                        pass
            else:
                ready.append(key.data)
        return ready

    def _wait_until_serving(self) -> bool:
        """True once every worker serves; False if stopped first. Raises the error of a worker
        that could not start (the others are stopped on the way out)."""
        while not self.stopping and not all(w.ready for w in self.workers):
            for worker in self._events(None):
                if not self._read(worker):
                    raise self._start_error(worker)
        return not self.stopping

    def _supervise(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else None
            for worker in self._events(timeout):
                was_ready = worker.ready
                if self._read(worker):
                    if worker.ready and not was_ready:
                        log.info("worker %d restarted (pid %d)", worker.index, worker.pid)
                    continue
                self._schedule_restart(worker)
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now and \
                        not self.stopping:
                    self._spawn(worker)

    def _schedule_restart(self, worker: _Worker) -> None:
        """Report a worker that exited and set when it starts again: after RESTART_DELAY_MIN,
        and twice as long each time it dies again before serving STABLE_AFTER seconds."""
        assert worker.process is not None
        if worker.ready and time.monotonic() - worker.started >= STABLE_AFTER:
            worker.delay = RESTART_DELAY_MIN
        wait, worker.delay = worker.delay, min(RESTART_DELAY_MAX, worker.delay * 2)
        failure = worker.failure()
        reason = f" ({json.loads(failure)['message']})" if failure else ""
        log.error("worker %d (pid %d) %s%s; starting it again in %g s", worker.index,
                  worker.pid, describe_exit(worker.process.returncode), reason, wait)
        worker.restart_at = time.monotonic() + wait

    def _stop_all(self) -> None:
        """SIGTERM every worker (each lets its calls finish), then wait; kill what is left."""
        running = [w for w in self.workers if w.process is not None and w.status_fd is not None]
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(w.status_fd is not None for w in running):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for worker in self._events(left):
                self._read(worker)
        for worker in running:
            if worker.status_fd is not None:
                assert worker.process is not None
                log.error("worker %d (pid %d) did not stop in %g s; killing it",
                          worker.index, worker.pid, STOP_TIMEOUT)
                worker.process.kill()
                while self._read(worker):
                    self._events(1.0)
        log.info("all %d workers stopped", self.count)


def serve_with_workers(source: StoreSource, store_url: str, server_options: dict[str, Any],
                       count: int, log_level: str, observers: Observers | None = None,
                       *, extra_line: str | None = None) -> None:
    """Run ``count`` worker processes serving the store on ``server_options["listen"]``; print
    the serving line (and ``extra_line``) once they all serve; return after SIGTERM or SIGINT
    stopped them."""
    cert, key = server_options.get("tls_cert"), server_options.get("tls_key")
    if cert is not None and key is not None:
        check_key_pair(cert, key)  # once, here, rather than once per worker
    cores = available_cores()
    if count > cores:
        log.warning("%d worker processes on %d cores: --workers counts processes; the threads "
                    "of each are --threads", count, cores)
    options = {**server_options, "instance_names": list(server_options["instance_names"])}

    def announce(address: str) -> None:
        print(f"casframe: serving {store_url} on {address}", flush=extra_line is None)
        if extra_line is not None:
            print(extra_line, flush=True)

    Supervisor(source, options, count, log_level, observers).run(announce)
