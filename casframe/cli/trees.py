"""Commands over whole trees: ``import``, ``checkout``, ``diff``, ``ls``, ``cat``."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click

from casframe.cli.app import App
from casframe.cli.helpers import (
    binary_stream,
    copy_stream,
    emit_json,
    emit_json_lines,
    json_option,
    parse_with,
    pass_app,
    positive_size,
)
from casframe.names import split_tree_path
from casframe.refkinds import writable_ref_name

if TYPE_CHECKING:
    from casframe.tree import TreeEntry

__all__ = ["import_command", "checkout_command", "diff_command", "ls_command", "cat_command"]


_jobs_option = click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    metavar="N",
    help="Processes for a large tree in a file:// store (default: the store's jobs option, "
    "else one per core).",
)


@click.command("import")
@click.argument("directory", type=click.Path(path_type=str))
@click.option("--ref", "ref_name", metavar="NAME", help="Also point this ref at the tree.")
@click.option(
    "--no-stat-cache",
    is_flag=True,
    help="Read and hash every file, even those unchanged since DIRECTORY was last imported.",
)
@_jobs_option
@json_option
@pass_app
def import_command(
    app: App, directory: str, ref_name: str | None, no_stat_cache: bool, jobs: int | None,
    as_json: bool,
) -> None:
    """Store a directory as a tree.

    Prints the root digest of DIRECTORY's tree (HASH/SIZE). Files already in the store are not
    written again. Files unchanged since the last import of DIRECTORY (same inode, size and
    time stamps) are not read again: their digests come from a cache in the user cache
    directory (set $CASFRAME_STAT_CACHE to another folder, or to "off").
    """
    if ref_name is not None:
        writable_ref_name(ref_name)  # before the long part, not after it
    os.stat(directory)  # a missing directory reports "No such file or directory"
    store = app.store()
    with app.progress(as_json) as progress:
        root = store.import_directory(
            directory, progress=progress, stat_cache=not no_stat_cache, jobs=jobs
        )
    if ref_name is not None:
        # The import stored every blob, children before parents: the tree is complete.
        store.set_ref(ref_name, root, check_complete=False)
    if as_json:
        emit_json({"digest": str(root), "ref": ref_name})
    else:
        click.echo(str(root))


_max_tree_entries_option = click.option(
    "--max-tree-entries",
    type=click.IntRange(min=0),
    metavar="N",
    help="Refuse a tree that expands to more entries (default: the store's, 10,000,000).",
)


@click.command("checkout")
@click.argument("tree")
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--copy", is_flag=True, help="Always copy files.")
@click.option("--link", is_flag=True, help="Always hardlink files (fail if impossible).")
@_max_tree_entries_option
@click.option(
    "--max-tree-bytes",
    metavar="SIZE",
    callback=parse_with(positive_size),
    help="Refuse a tree whose files add up to more (default: the store's, 1T).",
)
@_jobs_option
@pass_app
def checkout_command(
    app: App, tree: str, dest: str, copy: bool, link: bool,
    max_tree_entries: int | None, max_tree_bytes: int | None, jobs: int | None,
) -> None:
    """Write a tree into a directory.

    DEST must be absent or empty. By default files are hardlinked from a local store on the
    same file system (they are read-only) and copied otherwise. A failed checkout removes
    what it wrote (and DEST, if it created it).
    """
    if copy and link:
        raise click.UsageError("--copy and --link cannot be used together")
    mode = True if link else False if copy else None
    with app.progress() as progress:
        app.store(create=False).checkout(
            tree, dest, link=mode, progress=progress,
            max_tree_entries=max_tree_entries, max_tree_bytes=max_tree_bytes, jobs=jobs,
        )


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--subdir", default="", metavar="PATH", help="Compare only this subdirectory.")
@_max_tree_entries_option
@json_option
@pass_app
def diff_command(
    app: App, a: str, b: str, subdir: str, max_tree_entries: int | None, as_json: bool
) -> None:
    """Show what changed between two trees.

    Prints one line per path added (A), removed (D) or modified (M) from tree A to tree B.
    """
    store = app.store(create=False)
    if as_json:
        changes = store.diff(a, b, subdir=subdir, max_tree_entries=max_tree_entries)
        emit_json(
            {"added": changes.added, "removed": changes.removed, "modified": changes.modified}
        )
        return
    for letter, path in store.iter_diff(a, b, subdir=subdir, max_tree_entries=max_tree_entries):
        click.echo(f"{letter} {path}")


_MODES = {"file": "100644", "executable": "100755", "directory": "040000", "symlink": "120000"}


def _entry_record(entry: TreeEntry, prefix: str) -> dict[str, Any]:
    kind = "executable" if entry.kind == "file" and entry.is_executable else entry.kind
    return {
        "path": prefix + entry.path,
        "kind": entry.kind,
        "mode": _MODES[kind],
        "executable": entry.is_executable,
        "size": entry.digest.size if entry.kind == "file" and entry.digest else None,
        "digest": str(entry.digest) if entry.digest is not None else None,
        "target": entry.target if entry.kind == "symlink" else None,
    }


@click.command("ls")
@click.argument("tree")
@click.argument("path", default="", required=False)
@click.option("-r", "--recursive", is_flag=True, help="List everything below PATH.")
@_max_tree_entries_option
@json_option
@pass_app
def ls_command(
    app: App, tree: str, path: str, recursive: bool, max_tree_entries: int | None,
    as_json: bool,
) -> None:
    """List the entries of a tree.

    Lists the directory PATH of TREE (default: its root). Columns: mode, kind, size, digest,
    path (paths are relative to the tree's root).
    """
    store = app.store(create=False)
    # Tree order: each directory followed by its contents, names sorted at every level.
    entries = (
        store.walk(tree, path, max_tree_entries=max_tree_entries)
        if recursive
        else store.ls(tree, path)
    )
    segments = split_tree_path(path)
    prefix = "/".join(segments) + "/" if segments else ""
    records = (_entry_record(entry, prefix) for entry in entries)
    if as_json:
        emit_json_lines(records)
        return
    for record in records:
        size = "-" if record["size"] is None else str(record["size"])
        shown = record["path"]
        if record["target"] is not None:
            shown += f" -> {record['target']}"
        click.echo(
            f"{record['mode']} {record['kind']:<9} {size:>10} {record['digest'] or '-'}  {shown}"
        )


@click.command("cat")
@click.argument("tree")
@click.argument("path")
@pass_app
def cat_command(app: App, tree: str, path: str) -> None:
    """Print a file of a tree.

    Writes the content of the file PATH of TREE to stdout, byte for byte.
    """
    with app.store(create=False).open_file(tree, path) as stream:
        copy_stream(stream, binary_stream(sys.stdout))
