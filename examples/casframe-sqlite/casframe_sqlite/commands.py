"""``casframe sqlite-vacuum``: the command this plugin adds to casframe's command line.

It is built from :mod:`casframe.cli.helpers`, the toolkit casframe's own commands use, so that
it takes ``--json``, prints sizes and fails exactly as they do. Imported when the ``casframe``
command starts (it needs click, which the command line has loaded already); the backend module
is imported only when the command runs.
"""

from __future__ import annotations

import os

import click
from casframe import ConfigError
from casframe.cli.helpers import App, emit_json, format_size, json_option, pass_app

__all__ = ["vacuum_command"]


@click.command("sqlite-vacuum")
@json_option
@pass_app
def vacuum_command(app: App, as_json: bool) -> None:
    """Give the space of deleted blobs back to the file system.

    SQLite keeps the pages that prune and gc free for later writes; this rewrites the database
    of the sqlite:// store given with --store without them. It waits for other writers as any
    write does, and they wait for it.
    """
    from casframe_sqlite.store import SQLiteBlobStore

    store = app.store(create=False)
    if not isinstance(store.blobs, SQLiteBlobStore):
        raise ConfigError(
            f"sqlite-vacuum compacts sqlite:// stores; {store.url} is not one "
            "(name one with --store)"
        )
    db = store.blobs.db
    before = os.path.getsize(db.path)
    db.vacuum()
    after = os.path.getsize(db.path)
    if as_json:
        emit_json({"database": db.path, "bytes_before": before, "bytes_after": after})
    else:
        click.echo(
            f"{db.url}: {format_size(before)} -> {format_size(after)} "
            f"({format_size(before - after)} given back)"
        )
