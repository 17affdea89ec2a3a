"""``casframe plugins``: what is installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from casframe.cli.helpers import (
    emit_json,
    json_option,
)
from casframe.plugins import list_plugins, reset_plugin_manager

if TYPE_CHECKING:
    pass

__all__ = ["plugins_command"]


@click.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List installed plugins.

    Shows each plugin's name, distribution, version and URL schemes; blocked ones are marked.
    Reads the installed distributions afresh (other commands may use the entry points
    remembered in the user cache directory).
    """
    reset_plugin_manager()
    infos = list_plugins()
    if as_json:
        emit_json(
            [
                {
                    "name": info.name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "schemes": list(info.schemes),
                    "blocked": info.blocked,
                }
                for info in infos
            ]
        )
        return
    rows = [
        (
            info.name,
            info.distribution,
            info.version or "-",
            ", ".join(f"{s}://" for s in info.schemes) or "-",
            "(blocked)" if info.blocked else "",
        )
        for info in infos
    ]
    header = ("NAME", "DISTRIBUTION", "VERSION", "SCHEMES", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4]))
        click.echo(f"{line}  {row[4]}".rstrip())
