"""``casframe serve``: the click command that runs a server until SIGTERM or SIGINT.

Cheap to import (click only): the CLI imports this module to list its commands, and the gRPC
machinery is imported only when the command runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

import click

import casframe.server
from casframe.compression import DEFAULT_MAX_WINDOW
from casframe.errors import CasframeError, ConfigError
from casframe.server.lifecycle import (
    SHUTDOWN_GRACE,
    Observers,
    StoreSource,
    call_sinks,
    check_access_log,
    configure_logging,
    metrics_folder,
    serve_metrics,
    serve_until,
)
from casframe.server.settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_THREADS,
    check_listen,
)
from casframe.server.workers import serve_with_workers, worker_count
from casframe.units import parse_size

if TYPE_CHECKING:
    from casframe.store import Store

__all__ = ["SHUTDOWN_GRACE", "main", "serve_command"]


class ByteSize(click.ParamType):
    """A byte count in casframe's one convention (:mod:`casframe.units`): ``4194304``,
    ``4MiB``, ``4M``, ``512KiB``, ``4MB`` (decimal)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ListenAddress(click.ParamType):
    """``HOST:PORT`` with a port from 0 to 65535."""

    name = "address"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_listen(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def _quiet_grpc(level: str | None) -> None:
    """Keep gRPC's native log lines (``E1206 ... add_port.cc:83] ...``) off the terminal
    except at ``--log-level debug``: casframe reports every failure in one line of its own.

    gRPC reads ``GRPC_VERBOSITY`` once, when it is first imported, so this runs before the
    server module imports it; a value the user exported is left alone.
    """
    if level != "debug":
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _store_source(ctx: click.Context, argument: str) -> StoreSource:
    """How to open STORE: through the CLI's configuration when run as ``casframe serve``
    (configured names work then), as a plain URL when run as ``python -m casframe.server``."""
    app = ctx.obj
    if app is not None and callable(getattr(app, "open", None)):
        return StoreSource(argument, use_config=True, config_file=getattr(app, "config_file", None))
    return StoreSource(argument)


def _log_level(level: str | None, ctx: click.Context) -> str:
    if level is None:
        return "debug" if getattr(ctx.obj, "verbose", False) else "info"
    return level


@click.command("serve")
@click.argument("store_url", metavar="STORE")
@click.option("--listen", type=ListenAddress(), default="127.0.0.1:50051", show_default=True,
              metavar="HOST:PORT",
              help="Address to listen on; port 0 picks a free port. Use [::]:PORT or "
                   "0.0.0.0:PORT to accept remote clients.")
@click.option("--instance", "instances", multiple=True, metavar="NAME",
              help="An instance name to serve (repeatable). Default: the empty name only.")
@click.option("--read-only", is_flag=True,
              help="Refuse every write (uploads, action results, refs) with PERMISSION_DENIED.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate chain of the server; enables TLS (needs --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="PEM private key of the server.")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False),
              help="PEM CA certificates; clients must present a certificate they signed "
                   "(mutual TLS).")
@click.option("--max-message-size", type=ByteSize(), default=None, metavar="SIZE",
              help="Largest gRPC message in either direction  [default: 4MiB]. Batch calls "
                   "may carry this minus 1 MiB of blob bytes.")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Server processes sharing the address  [default: the number of cores; 1 "
                   "for memory:// stores and unix: addresses].")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Threads of each process for unary calls and the store work of streams  "
                   "[default: 32].")
@click.option("--max-streams", type=click.IntRange(min=1), default=None, metavar="N",
              help="Streaming calls in progress at once; more are refused with "
                   "RESOURCE_EXHAUSTED  [default: 1000].")
@click.option("--stream-idle-timeout", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="SECONDS",
              help="End a stream without progress for this long with UNAVAILABLE "
                   " [default: 60].")
@click.option("--zstd-max-window", type=ByteSize(), default=None, metavar="SIZE",
              help="Largest decoding window a zstd-compressed upload may ask for; larger "
                   "ones are refused with INVALID_ARGUMENT  [default: 8MiB].")
@click.option("--metrics-listen", type=ListenAddress(), default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics; port 0 picks a "
                   "free port.")
@click.option("--access-log", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              metavar="PATH|-",
              help="Append one JSON line per request to PATH (created if missing; - for "
                   "standard error).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default=None, help="Server log level; debug logs every request  [default: info].")
@click.pass_context
def serve_command(
    ctx: click.Context,
    store_url: str,
    listen: str,
    instances: tuple[str, ...],
    read_only: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    max_message_size: int | None,
    workers: int | None,
    threads: int | None,
    max_streams: int | None,
    stream_idle_timeout: float | None,
    zstd_max_window: int | None,
    metrics_listen: str | None,
    access_log: str | None,
    log_level: str | None,
) -> None:
    """Serve STORE (a URL or a configured store name) to REAPI clients over gRPC.

    Offers Capabilities, ContentAddressableStorage, ByteStream, ActionCache, Remote Asset
    Fetch/Push, BuildStream ReferenceStorage and the gRPC health service. Stops gracefully on
    SIGTERM or SIGINT.
    """
    level = _log_level(log_level, ctx)
    configure_logging(level)
    _quiet_grpc(level)
    source = _store_source(ctx, store_url)
    server_options: dict[str, Any] = {
        "listen": listen,
        "instance_names": instances or ("",),
        "read_only": read_only,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_client_ca": tls_client_ca,
        "max_message_bytes": max_message_size or DEFAULT_MAX_MESSAGE_BYTES,
        "max_workers": threads or DEFAULT_THREADS,
        "max_streams": max_streams or DEFAULT_MAX_STREAMS,
        "stream_idle_timeout": stream_idle_timeout or DEFAULT_STREAM_IDLE_TIMEOUT,
        "zstd_max_window_bytes": zstd_max_window or DEFAULT_MAX_WINDOW,
    }
    observers = Observers(metrics=metrics_listen is not None, access_log=access_log)
    with contextlib.ExitStack() as stack:
        store = source.open(create=not read_only)
        try:
            count = worker_count(workers, store.url, listen)
            if count == 1:
                # One process keeps its metrics in its own memory, with no files to add up
                # (a PROMETHEUS_MULTIPROC_DIR given is used, as prometheus_client does).
                if observers.metrics:
                    metrics_folder(stack, make=False)
                _serve_in_this_process(stack, store, server_options, observers, metrics_listen)
                return
            url = store.url
        finally:
            store.close()  # the workers open the store themselves
        if observers.metrics:
            metrics_folder(stack)  # before prometheus_client is imported, here or in a worker
        if access_log is not None:
            check_access_log(access_log)  # once, here, rather than once per worker
        metrics_url = None if metrics_listen is None else stack.enter_context(
            serve_metrics(metrics_listen)  # the sum of the workers' metrics
        )
        serve_with_workers(source, url, server_options, count, level, observers,
                           extra_line=_metrics_line(metrics_url))


def _metrics_line(metrics_url: str | None) -> str | None:
    return None if metrics_url is None else f"casframe: metrics on {metrics_url}"


def _serve_in_this_process(stack: contextlib.ExitStack, store: Store,
                           server_options: dict[str, Any], observers: Observers,
                           metrics_listen: str | None) -> None:
    sinks = call_sinks(stack, store, observers)
    metrics_url = None if metrics_listen is None else stack.enter_context(
        serve_metrics(metrics_listen, sinks)
    )
    server = casframe.server.Server(store, **server_options, call_sinks=sinks)

    def announce() -> None:
        click.echo(f"casframe: serving {store.url} on {server.address}")
        line = _metrics_line(metrics_url)
        if line:
            click.echo(line)
        sys.stdout.flush()

    serve_until(server, announce)


def main(argv: list[str] | None = None) -> int:
    """Run ``serve`` on its own (``python -m casframe.server STORE ...``)."""
    try:
        serve_command.main(args=argv, prog_name="casframe serve", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (CasframeError, OSError) as exc:
        click.echo(f"casframe serve: error: {exc}", err=True)
        return 1
    return 0
