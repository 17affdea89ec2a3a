"""``casframe ref``: names for trees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from casframe.cli.app import App
from casframe.cli.helpers import (
    emit_json,
    iso_time,
    json_option,
    pass_app,
)

if TYPE_CHECKING:
    pass

__all__ = ["ref_group"]


@click.group("ref")
def ref_group() -> None:
    """Manage refs (names for trees)."""


@ref_group.command("set")
@click.argument("name")
@click.argument("tree")
@pass_app
def ref_set(app: App, name: str, tree: str) -> None:
    """Point a ref at a tree.

    TREE is a digest or another ref; it must be completely stored.
    """
    store = app.store()
    store.set_ref(name, store.resolve(tree))


@ref_group.command("get")
@click.argument("name")
@json_option
@pass_app
def ref_get(app: App, name: str, as_json: bool) -> None:
    """Print the digest a ref points at.

    This counts as a use of NAME for least-recently-used order.
    """
    digest = app.store(create=False).get_ref(name)
    if as_json:
        emit_json({"name": name, "digest": str(digest)})
    else:
        click.echo(str(digest))


@ref_group.command("list")
@click.argument("prefix", default="", required=False)
@json_option
@pass_app
def ref_list(app: App, prefix: str, as_json: bool) -> None:
    """List refs, least recently used first.

    Prints last-access time, digest and name of every ref starting with PREFIX.
    """
    refs = app.store(create=False).list_refs(prefix)
    if as_json:
        emit_json(
            [
                {"name": r.name, "digest": str(r.digest), "accessed": iso_time(r.accessed, True)}
                for r in refs
            ]
        )
        return
    for r in refs:
        click.echo(f"{iso_time(r.accessed)}  {r.digest}  {r.name}")


@ref_group.command("rm")
@click.argument("name")
@pass_app
def ref_rm(app: App, name: str) -> None:
    """Delete a ref (the tree stays stored)."""
    app.store().delete_ref(name)


@ref_group.command("cp")
@click.argument("src")
@click.argument("dest")
@pass_app
def ref_cp(app: App, src: str, dest: str) -> None:
    """Copy a ref: point DEST at the tree SRC points at."""
    app.store().copy_ref(src, dest)
