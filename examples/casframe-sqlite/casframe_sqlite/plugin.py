"""The module casframe loads through this package's entry point: it registers ``sqlite://``
and the ``casframe sqlite-vacuum`` command.

casframe imports it when it first needs its plugins (``casframe plugins``, the first
``open_store``) and calls :func:`casframe_register_backends` when it builds its scheme table.
The factory is given as a ``"module:attribute"`` string, so :mod:`casframe_sqlite.store` is
imported only when a ``sqlite://`` store is opened; the command's module only when the
``casframe`` command starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from casframe import hookimpl

if TYPE_CHECKING:  # for type checkers only: loading this module stays cheap
    import click
    from casframe import BackendRegistry

__all__ = ["casframe_register_backends", "casframe_register_commands"]


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    registry.add(
        "sqlite",
        "casframe_sqlite.store:open_sqlite_store",
        description="one SQLite database file holding blobs and refs",
    )


@hookimpl
def casframe_register_commands(cli: click.Group) -> None:
    from casframe_sqlite.commands import vacuum_command  # click: only the CLI pays for it

    cli.add_command(vacuum_command)
