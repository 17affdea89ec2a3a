"""Running one server until told to stop: what ``casframe serve`` and each of its worker
processes (:mod:`casframe.server.worker`) do alike.

:class:`StoreSource` says how the STORE argument of ``casframe serve`` is opened (a URL, or a
name in the CLI's configuration), in a form a worker process can be given; :func:`serve_until`
starts a :class:`~casframe.server.app.Server`, reports it serving, and stops it gracefully on
SIGTERM or SIGINT (or when ``stop`` is set). :class:`Observers` says what every serving
process records besides serving (metrics, an access log), and :func:`call_sinks` opens those
records for one process. Importing this module costs no gRPC and no prometheus_client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casframe.config import load_config
from casframe.errors import ConfigError
from casframe.lazy import lazy_module
from casframe.plugins import open_configured_store, open_store

if TYPE_CHECKING:
    from casframe.server import accesslog, metrics
    from casframe.server.app import Server
    from casframe.server.observe import CallSink
    from casframe.store import Store
else:
    accesslog = lazy_module("casframe.server.accesslog")
    # Imported (with prometheus_client) only after metrics_folder set PROMETHEUS_MULTIPROC_DIR.
    metrics = lazy_module("casframe.server.metrics")

__all__ = [
    "LOG_FORMAT",
    "SHUTDOWN_GRACE",
    "Observers",
    "StoreSource",
    "call_sinks",
    "check_access_log",
    "configure_logging",
    "metrics_folder",
    "serve_metrics",
    "serve_until",
]

# Seconds running calls get to finish after SIGTERM/SIGINT: long enough for a batch call or the
# rest of a typical upload, short enough for a service manager's stop timeout (90 s systemd).
SHUTDOWN_GRACE = 10.0

#: How ``casframe serve`` formats its log lines on stderr (a worker adds its number and pid).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

log = logging.getLogger("casframe.server")


@dataclass(frozen=True)
class StoreSource:
    """The STORE argument and how to resolve it: through the CLI's configuration (a configured
    name, a path, a URL with the configured options) when ``use_config``, else as a plain URL.
    ``config_file`` is the CLI's ``--config`` (``None``: the default file)."""

    argument: str
    use_config: bool = False
    config_file: str | None = None

    def open(self, *, create: bool) -> Store:
        if self.use_config:
            config = load_config(self.config_file)
            return open_configured_store(self.argument, config=config, create=create)
        return open_store(self.argument, create=create)


def configure_logging(level: str, fmt: str = LOG_FORMAT) -> None:
    """Send casframe's log lines at ``level`` and above to stderr, unless the embedding program
    (or a test) configured logging itself."""
    logger = logging.getLogger("casframe")
    logger.setLevel(level.upper())
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)


def serve_until(
    server: Server,
    on_serving: Callable[[], None],
    stop: threading.Event | None = None,
) -> None:
    """Start ``server``, call ``on_serving``, and serve until SIGTERM, SIGINT or ``stop``;
    then let running calls finish for :data:`SHUTDOWN_GRACE` seconds. Call from the main
    thread (it installs the signal handlers, and restores the previous ones at the end)."""
    stop = stop or threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        on_serving()
        while not stop.wait(1.0):
            pass
        log.info("stopping: calls in progress get up to %g s to finish", SHUTDOWN_GRACE)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop(SHUTDOWN_GRACE)


@dataclass(frozen=True)
class Observers:
    """What each serving process records besides serving: metrics (added up over the
    processes through :func:`metrics_folder`), and an access log (a path, or ``-``)."""

    metrics: bool = False
    access_log: str | None = None


def metrics_folder(stack: contextlib.ExitStack, *, make: bool = True) -> None:
    """Make sure ``PROMETHEUS_MULTIPROC_DIR`` names a folder before prometheus_client is first
    imported (it decides then), in this process and the workers it starts: metrics are kept in
    files there, so that every process's add up. A folder made here is removed when ``stack``
    closes; one given in the environment is used and left alone. With ``make`` false (one
    process serves, and keeps its metrics in its own memory), a given folder is only checked."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given is not None and not os.path.isdir(given):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR is {given!r}, which is not a folder: create it (empty), "
            "or unset it and casframe serve makes one of its own"
        )
    if given is None and make:
        folder = tempfile.mkdtemp(prefix="casframe-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        stack.callback(os.environ.pop, "PROMETHEUS_MULTIPROC_DIR", None)


def call_sinks(stack: contextlib.ExitStack, store: Store, observers: Observers) -> list[CallSink]:
    """The access log and metrics of this process, open until ``stack`` closes."""
    sinks: list[CallSink] = []
    if observers.access_log is not None:
        sinks.append(stack.enter_context(accesslog.AccessLog.open(observers.access_log)))
    if observers.metrics:
        stack.callback(metrics.process_exited, os.getpid())
        sinks.append(metrics.ServerMetrics(store))
    return sinks


def check_access_log(target: str) -> None:
    """Open and close the access log ``target``: an error that would stop every worker is
    then one line of the supervisor's."""
    accesslog.AccessLog(target).close()  # opens the file; no writer thread is started


@contextlib.contextmanager
def serve_metrics(listen: str, sinks: Sequence[CallSink] = ()) -> Iterator[str]:
    """Serve the sum of every process's metrics (see :func:`metrics_folder`), or those of the
    one process serving (the metrics among ``sinks``), over HTTP on ``listen`` while the block
    runs; yields the URL to scrape."""
    own = next((sink for sink in sinks if isinstance(sink, metrics.ServerMetrics)), None)
    with metrics.serve_metrics(listen, own) as url:
        yield url
