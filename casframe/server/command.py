"""``casframe serve``: the click command that runs a server until SIGTERM or SIGINT.

The CLI imports this module by name only when ``serve`` runs (``casframe --help`` lists it
without importing it). The server, and gRPC with it, load when the command reaches
``casframe.server.Server`` (the package's names load on first use): gRPC reads its log level
once, on import, and the command sets it from ``--log-level`` first.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

import casframe.server
from casframe.errors import CasframeError, ConfigError
from casframe.plugins import open_store
from casframe.server.settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_WORKERS,
    check_listen,
)
from casframe.units import parse_size

__all__ = ["SHUTDOWN_GRACE", "main", "serve_command"]

# Seconds running calls get to finish after SIGTERM/SIGINT: long enough for a batch call or the
# rest of a typical upload, short enough for a service manager's stop timeout (90 s systemd).
SHUTDOWN_GRACE = 10.0

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
    command first uses ``casframe.server.Server``; a value the user exported is left alone.
    """
    if level != "debug":
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _open_store(ctx: click.Context, url: str, *, create: bool) -> tuple[Any, bool]:
    """Open STORE_URL through the CLI's opener when there is one (configured names work then);
    return the store and whether this command must close it. A read-only server does not
    create a missing store (``create=False``)."""
    for attribute in ("open_store", "open"):
        opener = getattr(ctx.obj, attribute, None)
        if callable(opener):
            return opener(url, create=create), False
    return open_store(url, create=create), True


def _configure_logging(level: str | None, ctx: click.Context) -> None:
    if level is None:
        level = "debug" if getattr(ctx.obj, "verbose", False) else "info"
    logger = logging.getLogger("casframe")
    logger.setLevel(level.upper())
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


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
              help="Threads for unary calls and the store work of streams  [default: 32].")
@click.option("--max-streams", type=click.IntRange(min=1), default=None, metavar="N",
              help="Streaming calls in progress at once; more are refused with "
                   "RESOURCE_EXHAUSTED  [default: 1000].")
@click.option("--stream-idle-timeout", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="SECONDS",
              help="End a stream without progress for this long with UNAVAILABLE "
                   " [default: 60].")
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
    max_streams: int | None,
    stream_idle_timeout: float | None,
    log_level: str | None,
) -> None:
    """Serve STORE (a URL or a configured store name) to REAPI clients over gRPC.

    Offers Capabilities, ContentAddressableStorage, ByteStream, ActionCache, Remote Asset
    Fetch/Push, BuildStream ReferenceStorage and the gRPC health service. Stops gracefully on
    SIGTERM or SIGINT.
    """
    _configure_logging(log_level, ctx)
    if log_level is None and getattr(ctx.obj, "verbose", False):
        log_level = "debug"
    _quiet_grpc(log_level)
    store, owned = _open_store(ctx, store_url, create=not read_only)
    try:
        server = casframe.server.Server(
            store,
            listen=listen,
            instance_names=instances or ("",),
            read_only=read_only,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            max_message_bytes=max_message_size or DEFAULT_MAX_MESSAGE_BYTES,
            max_workers=workers or DEFAULT_WORKERS,
            max_streams=max_streams or DEFAULT_MAX_STREAMS,
            stream_idle_timeout=stream_idle_timeout or DEFAULT_STREAM_IDLE_TIMEOUT,
        )
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: object) -> None:
            stop_requested.set()

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            server.start()
            click.echo(f"casframe: serving {store.url} on {server.address}")
            sys.stdout.flush()
            while not stop_requested.wait(1.0):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.stop(SHUTDOWN_GRACE)
    finally:
        if owned:
            store.close()


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
