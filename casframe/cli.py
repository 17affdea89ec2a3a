"""The ``casframe`` command line.

This module parses arguments, opens stores through :mod:`casframe.config`, renders results,
progress bars and errors, and nothing else: every storage operation is a :class:`Store` call.
Each failure a user can cause ends as one line on stderr (``casframe: error: ...``) and a
non-zero exit status; ``-v`` adds the traceback. Importing this module must stay cheap (only
click at module level); json, tqdm, configuration and plugins load when a command runs.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import click

from casframe.errors import CasframeError
from casframe.progress import NO_PROGRESS, Progress
from casframe.server import serve_command

if TYPE_CHECKING:
    from casframe.config import Config
    from casframe.store import Store
    from casframe.transfer import TransferResult
    from casframe.tree import TreeEntry

__all__ = [
    "CasframeGroup",
    "DuplicateCommandError",
    "PluginCommandError",
    "TqdmProgress",
    "main",
    "make_cli",
]

PROG = "casframe"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by ^C

_COPY_CHUNK = 1 << 20  # same bounded chunk the core streams with


class DuplicateCommandError(CasframeError):
    """A plugin tried to add a command whose name is already taken."""

    reason = "duplicate-command"


class PluginCommandError(CasframeError):
    """A plugin's ``casframe_register_commands`` hook failed."""

    reason = "plugin-commands"


# -- progress -----------------------------------------------------------------------------------


class TqdmProgress(Progress):
    """A tqdm bar on stderr; thread-safe, since workers report from several threads."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._bar: Any = None

    def start(self, task: str, total: int | None = None, unit: str = "files") -> None:
        from tqdm import tqdm

        with self._lock:
            self._close_bar()
            self._bar = tqdm(
                total=total,
                desc=task,
                unit=unit,
                unit_scale=unit == "B",
                file=self._file if self._file is not None else sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def advance(self, amount: int = 1) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(amount)

    def finish(self) -> None:
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


# -- per-invocation state -----------------------------------------------------------------------


class _App:
    """Global options and the stores opened by one invocation (closed when it ends)."""

    def __init__(self) -> None:
        self.store_choice: str | None = None
        self.config_file: str | None = None
        self.verbose = False
        self._config: Config | None = None
        self._store: Store | None = None
        self._opened: list[Store] = []

    def config(self) -> Config:
        if self._config is None:
            from casframe.config import load_config

            self._config = load_config(self.config_file)
        return self._config

    def store(self) -> Store:
        """The store named by ``--store`` (or the default store)."""
        if self._store is None:
            self._store = self.open(self.store_choice)
        return self._store

    def open(self, name_or_url: str | None) -> Store:
        """Open another store given as a URL, a configured name or a path."""
        from casframe.plugins import open_store

        url, options = self.config().resolve_store(name_or_url)
        store = open_store(url, options)
        self._opened.append(store)
        return store

    def close(self) -> None:
        while self._opened:
            self._opened.pop().close()

    @contextmanager
    def progress(self, quiet: bool = False) -> Iterator[Progress]:
        """A progress bar when stderr is a terminal and output is not JSON."""
        if quiet or not _stderr_is_terminal():
            yield NO_PROGRESS
            return
        bar = TqdmProgress()
        try:
            yield bar
        finally:
            bar.finish()  # also clears a bar left by a failed phase


# -- output helpers -----------------------------------------------------------------------------


def _emit_json(value: Any) -> None:
    import json

    click.echo(json.dumps(value, indent=2))


def _binary(stream: IO[Any]) -> BinaryIO:
    """The byte stream under a standard text stream (flushed first, to keep output order)."""
    stream.flush()
    return cast(BinaryIO, getattr(stream, "buffer", stream))


def _copy_stream(source: BinaryIO, target: BinaryIO) -> None:
    while chunk := source.read(_COPY_CHUNK):
        target.write(chunk)
    target.flush()


def _human_bytes(count: int) -> str:
    """Decimal units, like the progress bar."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"


def _iso_time(seconds: float, utc: bool = False) -> str:
    from datetime import UTC, datetime

    if utc:
        return datetime.fromtimestamp(seconds, tz=UTC).isoformat()
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _describe(exc: BaseException) -> str:
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


def _error_line(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
_pass_app = click.make_pass_decorator(_App)


# -- the group ----------------------------------------------------------------------------------


class CasframeGroup(click.Group):
    """The top-level group: adds plugin commands once, and turns every error into one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owners: dict[str, str] = {}
        self._registering: str | None = None
        self._plugin_commands_loaded = False

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name or ""
        owner = f"plugin {self._registering!r}" if self._registering else PROG
        if name in self.commands:
            raise DuplicateCommandError(
                f"{owner} cannot add command {name!r}: "
                f"the name is already taken by {self._owners.get(name, PROG)}"
            )
        super().add_command(cmd, name)
        self._owners[name] = owner

    def load_plugin_commands(self) -> None:
        """Call every plugin's ``casframe_register_commands`` once, in registration order.

        Each implementation is called on its own (as the backend registry does) so that a
        clash names the plugin responsible; the earlier plugin keeps the name.
        """
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        from casframe.plugins import get_plugin_manager

        hook = get_plugin_manager().hook.casframe_register_commands
        for impl in hook.get_hookimpls():  # oldest registration first (pluggy calls LIFO)
            if impl.hookwrapper or impl.wrapper:
                continue
            self._registering = impl.plugin_name
            try:
                impl.function(**({"cli": self} if "cli" in impl.argnames else {}))
            except CasframeError:
                raise
            except Exception as exc:
                raise PluginCommandError(
                    f"plugin {impl.plugin_name!r} failed to add its commands: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._registering = None

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command; return the exit status, or exit with it in standalone mode."""
        extra["obj"] = app = _App()
        code = _run(self, app, args, prog_name or PROG, complete_var, extra)
        if standalone_mode:
            sys.exit(code)
        return code


def _run(
    group: CasframeGroup,
    app: _App,
    args: Sequence[str] | None,
    prog_name: str,
    complete_var: str | None,
    extra: dict[str, Any],
) -> int:
    def report(exc: BaseException, message: str) -> None:
        if app.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        _error_line(message)

    try:
        group.load_plugin_commands()
        # click's own main, never standalone, so that errors come back here.
        result = click.Group.main(
            group, args, prog_name, complete_var, standalone_mode=False, **extra
        )
        # Non-standalone click returns the exit status of ctx.exit(), else the callback's value.
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        report(exc, "aborted")
        return EXIT_ERROR
    except KeyboardInterrupt:
        click.echo(err=True)  # end the terminal's ^C line
        return EXIT_INTERRUPTED
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        report(exc, exc.format_message() + hint)
        return EXIT_USAGE
    except click.ClickException as exc:
        report(exc, exc.format_message())
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`casframe cat ... | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # stdout is not a file descriptor (embedded use); nothing to silence
        return EXIT_ERROR
    except (CasframeError, OSError) as exc:
        report(exc, _describe(exc))
        return EXIT_ERROR
    except Exception as exc:
        hint = "" if app.verbose else " (run with -v for the traceback)"
        report(exc, f"internal error: {type(exc).__name__}: {_describe(exc)}{hint}")
        return EXIT_ERROR


def make_cli() -> CasframeGroup:
    """A fresh ``casframe`` command; plugin commands are added when it first runs."""

    @click.group(
        cls=CasframeGroup,
        name=PROG,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    @click.option(
        "--store",
        metavar="URL|NAME",
        help="Store to use: a URL, a store named in the config file, or a directory. "
        "Default: $CASFRAME_STORE, else the config's default_store, else file:// "
        "under the user cache directory.",
    )
    @click.option(
        "--config",
        "config_file",
        metavar="PATH",
        help="Configuration file (default: $CASFRAME_CONFIG, else config.toml in the user "
        "config directory).",
    )
    @click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
    @click.version_option(package_name="casframe", prog_name=PROG)
    @click.pass_context
    def cli(ctx: click.Context, store: str | None, config_file: str | None, verbose: bool) -> None:
        """Content-addressed artifact storage in the REAPI v2 data model.

        TREE arguments take a digest (HASH/SIZE) or a ref name.
        """
        app = ctx.ensure_object(_App)
        app.store_choice = store
        app.config_file = config_file
        app.verbose = verbose
        ctx.call_on_close(app.close)

    for command in (
        import_command,
        checkout_command,
        diff_command,
        ls_command,
        cat_command,
        put_command,
        get_command,
        ref_group,
        push_command,
        pull_command,
        plugins_command,
        serve_command,
    ):
        cli.add_command(command)
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    sys.exit(make_cli().main(args=argv, prog_name=PROG, standalone_mode=False))


# -- commands -----------------------------------------------------------------------------------


@click.command("import")
@click.argument("directory", type=click.Path(path_type=str))
@click.option("--ref", "ref_name", metavar="NAME", help="Also point this ref at the tree.")
@click.option(
    "--no-stat-cache",
    is_flag=True,
    help="Read and hash every file, even those unchanged since DIRECTORY was last imported.",
)
@_json_option
@_pass_app
def import_command(
    app: _App, directory: str, ref_name: str | None, no_stat_cache: bool, as_json: bool
) -> None:
    """Store a directory as a tree.

    Prints the root digest of DIRECTORY's tree (HASH/SIZE). Files already in the store are not
    written again. Files unchanged since the last import of DIRECTORY (same inode, size and
    time stamps) are not read again: their digests come from a cache in the user cache
    directory (set $CASFRAME_STAT_CACHE to another folder, or to "off").
    """
    from casframe.names import validate_ref_name

    if ref_name is not None:
        validate_ref_name(ref_name)  # before the long part, not after it
    os.stat(directory)  # a missing directory reports "No such file or directory"
    store = app.store()
    with app.progress(as_json) as progress:
        root = store.import_directory(
            directory, progress=progress, stat_cache=not no_stat_cache
        )
    if ref_name is not None:
        # The import stored every blob, children before parents: the tree is complete.
        store.set_ref(ref_name, root, check_complete=False)
    if as_json:
        _emit_json({"digest": str(root), "ref": ref_name})
    else:
        click.echo(str(root))


@click.command("checkout")
@click.argument("tree")
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--copy", is_flag=True, help="Always copy files.")
@click.option("--link", is_flag=True, help="Always hardlink files (fail if impossible).")
@_pass_app
def checkout_command(app: _App, tree: str, dest: str, copy: bool, link: bool) -> None:
    """Write a tree into a directory.

    DEST must be absent or empty. By default files are hardlinked from a local store on the
    same file system (they are read-only) and copied otherwise.
    """
    if copy and link:
        raise click.UsageError("--copy and --link cannot be used together")
    mode = True if link else False if copy else None
    with app.progress() as progress:
        app.store().checkout(tree, dest, link=mode, progress=progress)


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--subdir", default="", metavar="PATH", help="Compare only this subdirectory.")
@_json_option
@_pass_app
def diff_command(app: _App, a: str, b: str, subdir: str, as_json: bool) -> None:
    """Show what changed between two trees.

    Prints one line per path added (A), removed (D) or modified (M) from tree A to tree B.
    """
    changes = app.store().diff(a, b, subdir=subdir)
    if as_json:
        _emit_json(
            {"added": changes.added, "removed": changes.removed, "modified": changes.modified}
        )
        return
    lines = [(path, "A") for path in changes.added]
    lines += [(path, "D") for path in changes.removed]
    lines += [(path, "M") for path in changes.modified]
    for path, letter in sorted(lines):
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
@_json_option
@_pass_app
def ls_command(app: _App, tree: str, path: str, recursive: bool, as_json: bool) -> None:
    """List the entries of a tree.

    Lists the directory PATH of TREE (default: its root). Columns: mode, kind, size, digest,
    path (paths are relative to the tree's root).
    """
    from casframe.names import split_tree_path

    store = app.store()
    entries = store.walk(tree, path) if recursive else store.ls(tree, path)
    segments = split_tree_path(path)
    prefix = "/".join(segments) + "/" if segments else ""
    records = [_entry_record(entry, prefix) for entry in entries]
    # Tree order: each directory followed by its contents, names sorted at every level.
    records.sort(key=lambda record: record["path"].split("/"))
    if as_json:
        _emit_json(records)
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
@_pass_app
def cat_command(app: _App, tree: str, path: str) -> None:
    """Print a file of a tree.

    Writes the content of the file PATH of TREE to stdout, byte for byte.
    """
    with app.store().open_file(tree, path) as stream:
        _copy_stream(stream, _binary(sys.stdout))


@click.command("put")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_json_option
@_pass_app
def put_command(app: _App, files: tuple[str, ...], as_json: bool) -> None:
    """Store files as blobs.

    Prints each file's digest, one per line, in order. FILE '-' reads stdin.
    """
    store = app.store()
    records = []
    for name in files:
        if name == "-":
            digest = store.put_stream(_binary(sys.stdin))
        else:
            digest = store.put_file(name)
        records.append({"path": name, "digest": str(digest)})
        if not as_json:
            click.echo(str(digest))
    if as_json:
        _emit_json(records)


@click.command("get")
@click.argument("digest")
@click.option("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
@_pass_app
def get_command(app: _App, digest: str, output: str | None) -> None:
    """Write a blob to stdout or a file.

    DIGEST is HASH/SIZE, as printed by put. The blob is verified as it is read.
    """
    from casframe.digest import Digest

    wanted = Digest.parse(digest)
    with app.store().open_read(wanted) as stream:
        if output is None or output == "-":
            _copy_stream(stream, _binary(sys.stdout))
            return
        try:
            with open(output, "wb") as target:
                _copy_stream(stream, target)
        except BaseException:
            # Corruption is detected at the end of the stream: leave no half-written file.
            try:
                os.unlink(output)
            except OSError:
                pass
            raise


# -- refs -----------------------------------------------------------------------------------


@click.group("ref")
def ref_group() -> None:
    """Manage refs (names for trees)."""


@ref_group.command("set")
@click.argument("name")
@click.argument("tree")
@_pass_app
def ref_set(app: _App, name: str, tree: str) -> None:
    """Point a ref at a tree.

    TREE is a digest or another ref; it must be completely stored.
    """
    store = app.store()
    store.set_ref(name, store.resolve(tree))


@ref_group.command("get")
@click.argument("name")
@_json_option
@_pass_app
def ref_get(app: _App, name: str, as_json: bool) -> None:
    """Print the digest a ref points at.

    This counts as a use of NAME for least-recently-used order.
    """
    digest = app.store().get_ref(name)
    if as_json:
        _emit_json({"name": name, "digest": str(digest)})
    else:
        click.echo(str(digest))


@ref_group.command("list")
@click.argument("prefix", default="", required=False)
@_json_option
@_pass_app
def ref_list(app: _App, prefix: str, as_json: bool) -> None:
    """List refs, least recently used first.

    Prints last-access time, digest and name of every ref starting with PREFIX.
    """
    refs = app.store().list_refs(prefix)
    if as_json:
        _emit_json(
            [
                {"name": r.name, "digest": str(r.digest), "accessed": _iso_time(r.accessed, True)}
                for r in refs
            ]
        )
        return
    for r in refs:
        click.echo(f"{_iso_time(r.accessed)}  {r.digest}  {r.name}")


@ref_group.command("rm")
@click.argument("name")
@_pass_app
def ref_rm(app: _App, name: str) -> None:
    """Delete a ref (the tree stays stored)."""
    app.store().delete_ref(name)


@ref_group.command("cp")
@click.argument("src")
@click.argument("dest")
@_pass_app
def ref_cp(app: _App, src: str, dest: str) -> None:
    """Copy a ref: point DEST at the tree SRC points at."""
    app.store().copy_ref(src, dest)


# -- transfer -------------------------------------------------------------------------------


def _report_transfer(
    result: TransferResult, verb: str, source: Store, dest: Store, as_json: bool
) -> None:
    if as_json:
        _emit_json(
            {
                "root": str(result.root),
                "ref": result.ref,
                "source": source.url,
                "destination": dest.url,
                "blobs_total": result.blobs_total,
                "blobs_sent": result.blobs_sent,
                "bytes_sent": result.bytes_sent,
                "already_present": result.already_present,
            }
        )
        return
    where = f"to {dest.url}" if verb == "pushed" else f"from {source.url}"
    if result.already_present:
        what = f"already present ({result.blobs_total} blobs)"
    else:
        what = (
            f"copied {result.blobs_sent} of {result.blobs_total} blobs "
            f"({_human_bytes(result.bytes_sent)})"
        )
    ref = f"; ref {result.ref} set" if result.ref else ""
    click.echo(f"{verb} {result.root} {where}: {what}{ref}")


@click.command("push")
@click.argument("tree")
@click.option("--to", "destination", required=True, metavar="URL|NAME", help="Store to copy to.")
@click.option(
    "--ref", "ref_name", metavar="NAME", help="Ref to set there (default: TREE if a ref)."
)
@_json_option
@_pass_app
def push_command(
    app: _App, tree: str, destination: str, ref_name: str | None, as_json: bool
) -> None:
    """Copy a tree from this store to another.

    Copies only the blobs the other store lacks, then sets the ref there last.
    """
    source = app.store()
    dest = app.open(destination)
    with app.progress(as_json) as progress:
        result = source.push(dest, tree, ref=ref_name, progress=progress)
    _report_transfer(result, "pushed", source, dest, as_json)


@click.command("pull")
@click.argument("tree")
@click.option("--from", "origin", required=True, metavar="URL|NAME", help="Store to copy from.")
@click.option("--ref", "ref_name", metavar="NAME", help="Ref to set here (default: TREE if a ref).")
@_json_option
@_pass_app
def pull_command(app: _App, tree: str, origin: str, ref_name: str | None, as_json: bool) -> None:
    """Copy a tree from another store into this one.

    TREE is a digest or a ref of the other store. Copies only the blobs this store lacks, then
    sets the ref last.
    """
    dest = app.store()
    source = app.open(origin)
    with app.progress(as_json) as progress:
        result = dest.pull(source, tree, ref=ref_name, progress=progress)
    _report_transfer(result, "pulled", source, dest, as_json)


# -- plugins --------------------------------------------------------------------------------


@click.command("plugins")
@_json_option
def plugins_command(as_json: bool) -> None:
    """List installed plugins.

    Shows each plugin's name, distribution, version and URL schemes; blocked ones are marked.
    """
    from casframe.plugins import list_plugins

    infos = list_plugins()
    if as_json:
        _emit_json(
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
