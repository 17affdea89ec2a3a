"""Commands over single blobs: ``put`` and ``get``."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from typing import TYPE_CHECKING, BinaryIO

import click

from casframe.cli.app import App
from casframe.cli.helpers import (
    binary_stream,
    copy_stream,
    emit_json,
    json_option,
    pass_app,
)
from casframe.digest import Digest

if TYPE_CHECKING:
    pass

__all__ = ["get_command", "put_command"]


@click.command("put")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@json_option
@pass_app
def put_command(app: App, files: tuple[str, ...], as_json: bool) -> None:
    """Store files as blobs.

    Prints each file's digest, one per line, in order. FILE '-' reads stdin.
    """
    store = app.store()
    records = []
    for name in files:
        if name == "-":
            digest = store.put_stream(binary_stream(sys.stdin))
        else:
            digest = store.put_file(name)
        records.append({"path": name, "digest": str(digest)})
        if not as_json:
            click.echo(str(digest))
    if as_json:
        emit_json(records)


@click.command("get")
@click.argument("digest")
@click.option("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
@pass_app
def get_command(app: App, digest: str, output: str | None) -> None:
    """Write a blob to stdout or a file.

    DIGEST is HASH/SIZE, as printed by put. The blob is verified as it is read.
    """
    wanted = Digest.parse(digest)
    with app.store(create=False).open_read(wanted) as stream:
        if output is None or output == "-":
            copy_stream(stream, binary_stream(sys.stdout))
            return
        _write_file_atomically(output, stream)


def _write_file_atomically(output: str, stream: BinaryIO) -> None:
    """Write ``stream`` to ``output`` through a temporary file beside it, renamed into place.

    Corruption is detected at the end of the stream: a failure leaves no half-written file
    and whatever ``output`` held before untouched. Devices and pipes (``/dev/null``,
    ``/dev/stdout``) are written in place, and so is a writable file in a folder this user
    may not write to (a failure then removes it, as nothing else is possible).
    """

    try:
        mode: int | None = os.stat(output).st_mode  # through symlinks and /proc/self/fd links
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with open(output, "wb") as target:
            copy_stream(stream, target)
        return
    path = os.path.realpath(output)  # through a symlink, as open() would write
    try:
        fd, temp = tempfile.mkstemp(
            dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".part"
        )
    except PermissionError as exc:
        if mode is None:
            raise OSError(exc.errno, exc.strerror, output) from None
        _write_in_place(output, stream)
        return
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, output) from None
    try:
        with os.fdopen(fd, "wb") as target:
            copy_stream(stream, target)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)
        else:
            os.chmod(temp, stat.S_IMODE(mode))
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _write_in_place(output: str, stream: BinaryIO) -> None:
    with open(output, "wb") as target:
        try:
            copy_stream(stream, target)
        except BaseException:
            try:
                os.unlink(output)
            except OSError:
                pass
            raise
