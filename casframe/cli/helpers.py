"""Helpers for ``casframe`` commands, built-in and plugin-added alike: the one way to print
JSON, write bytes, show times, sizes and counts, and report errors and warnings.

A plugin command (``casframe_register_commands``) that uses these looks and fails like the
built-in ones: ``@pass_app`` gives it the invocation's :class:`App` (``app.store()``,
``app.progress()``), ``@json_option`` its ``--json`` flag. Cheap to import: click and the
standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import click

from casframe.cli.app import App
from casframe.lazy import lazy_module
from casframe.units import format_count, format_size, parse_size

if TYPE_CHECKING:
    import json
else:  # only --json output needs it
    json = lazy_module("json")

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "PROG",
    "App",
    "binary_stream",
    "copy_stream",
    "describe_error",
    "emit_json",
    "emit_json_lines",
    "parse_with",
    "positive_size",
    "error_line",
    "format_count",
    "format_size",
    "iso_time",
    "json_option",
    "pass_app",
    "warning_line",
]

PROG = "casframe"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by ^C

_COPY_CHUNK = 1 << 20  # same bounded chunk the core streams with

#: ``--json``: the command prints one JSON document instead of text (parameter ``as_json``).
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
#: Passes the invocation's :class:`App` as the command's first argument.
pass_app = click.make_pass_decorator(App)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def emit_json_lines(items: Iterator[Any]) -> None:
    """A JSON array printed as :func:`emit_json` prints it, one item at a time."""
    first = True
    for item in items:
        body = json.dumps(item, indent=2).replace("\n", "\n  ")
        click.echo(("[\n  " if first else ",\n  ") + body, nl=False)
        first = False
    click.echo("[]" if first else "\n]")


def binary_stream(stream: IO[Any]) -> BinaryIO:
    """The byte stream under a standard text stream (flushed first, to keep output order)."""
    stream.flush()
    return cast(BinaryIO, getattr(stream, "buffer", stream))


def copy_stream(source: BinaryIO, target: BinaryIO) -> None:
    while chunk := source.read(_COPY_CHUNK):
        target.write(chunk)
    target.flush()


def iso_time(seconds: float, utc: bool = False) -> str:
    if utc:
        return datetime.fromtimestamp(seconds, tz=UTC).isoformat()
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def describe_error(exc: BaseException) -> str:
    """One line for an error: ``path: problem`` for OSErrors, the message otherwise."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            filename = exc.filename
            name = os.fsdecode(filename) if isinstance(filename, str | bytes) else str(filename)
            text = f"{name}: {text}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.splitlines()).strip()


def error_line(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)


def warning_line(message: str) -> None:
    """``casframe: warning: MESSAGE`` on stderr."""
    click.echo(f"{PROG}: warning: {message}", err=True)


def parse_with(parse: Any) -> Any:
    """A click callback turning a parser's ValueError into a usage error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def positive_size(value: str) -> int:
    """A size (:mod:`casframe.units`) that must be more than 0, for ``parse_with``."""
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"invalid size {value!r}: must be positive")
    return size
