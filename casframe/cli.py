"""The ``casframe`` command line.

This module parses arguments, opens stores through :mod:`casframe.config`, renders results,
progress bars and errors, and nothing else: every storage operation is a :class:`Store` call.
Each failure a user can cause ends as one line on stderr (``casframe: error: ...``) and a
non-zero exit status; ``-v`` adds the traceback. Importing this module must stay cheap (only
click at module level); json, tqdm, configuration and plugins load when a command runs.
"""

from __future__ import annotations

import functools
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
from casframe.units import format_count, format_size, parse_size

if TYPE_CHECKING:
    from casframe.config import Config
    from casframe.remotes import RemoteOutcome, Remotes
    from casframe.store import Store
    from casframe.transfer import TransferResult
    from casframe.tree import TreeEntry

__all__ = [
    "App",
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
        with self._lock:
            self._close_bar()
            self._bar = _bar_class()(
                total=total,
                desc=task,
                unit=unit,
                bar_format=_bar_format(total is not None, unit == "B"),
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


def _bar_format(total: bool, in_bytes: bool) -> str:
    """Numbers as everywhere else in casframe: ``20,441 files``, ``16.5 KiB``, the unit spaced."""
    amount = "{n_text} / {total_text}" if total else "{n_text}"
    if not in_bytes:
        amount += " {unit}"
    if total:
        return f"{{desc}}: {{percentage:3.0f}}%|{{bar}}| {amount} [{{elapsed}}<{{remaining}}, " \
            "{rate_text}]"
    return "{desc}: " + amount + " [{elapsed}, {rate_text}]"


@functools.cache
def _bar_class() -> Any:
    """tqdm's bar, numbered in casframe's own format (tqdm is imported on first use)."""
    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[misc, type-arg]
        @property
        def format_dict(self) -> dict[str, Any]:
            values: dict[str, Any] = super().format_dict
            in_bytes = values["unit"] == "B"
            show = format_size if in_bytes else (lambda n: f"{int(n):,}")
            values["n_text"] = show(values["n"])
            values["total_text"] = show(values["total"]) if values["total"] else "?"
            elapsed = values["elapsed"]
            rate = values["rate"] or (values["n"] / elapsed if elapsed else 0)
            values["rate_text"] = (
                f"{format_size(rate)}/s" if in_bytes else f"{rate:,.0f} {values['unit']}/s"
            )
            return values

    return Bar


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


# -- per-invocation state -----------------------------------------------------------------------


class App:
    """Global options and the stores opened by one invocation (closed when it ends).

    Commands, plugin commands included, receive it as click's context object
    (``@click.pass_obj``): :meth:`store`, :meth:`open` and :meth:`config` are public API.
    """

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

    def store(self, *, create: bool = True) -> Store:
        """The store named by ``--store`` (or the default store).

        Commands that only read pass ``create=False``: a store that does not exist is then an
        error (:class:`~casframe.StoreNotFoundError`), not a new empty store.
        """
        if self._store is None:
            self._store = self.open(self.store_choice, create=create)
        return self._store

    def open(self, name_or_url: str | None, *, create: bool = True) -> Store:
        """Open another store given as a URL, a configured name or a path."""
        from casframe.config import open_configured_store

        store = open_configured_store(name_or_url, config=self.config(), create=create)
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
_pass_app = click.make_pass_decorator(App)


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
        extra["obj"] = app = App()
        code = _run(self, app, args, prog_name or PROG, complete_var, extra)
        if standalone_mode:
            sys.exit(code)
        return code


def _run(
    group: CasframeGroup,
    app: App,
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
        app = ctx.ensure_object(App)
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
        prune_command,
        gc_command,
        fsck_command,
        du_command,
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
    app: App, directory: str, ref_name: str | None, no_stat_cache: bool, as_json: bool
) -> None:
    """Store a directory as a tree.

    Prints the root digest of DIRECTORY's tree (HASH/SIZE). Files already in the store are not
    written again. Files unchanged since the last import of DIRECTORY (same inode, size and
    time stamps) are not read again: their digests come from a cache in the user cache
    directory (set $CASFRAME_STAT_CACHE to another folder, or to "off").
    """
    from casframe.names import writable_ref_name

    if ref_name is not None:
        writable_ref_name(ref_name)  # before the long part, not after it
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
def checkout_command(app: App, tree: str, dest: str, copy: bool, link: bool) -> None:
    """Write a tree into a directory.

    DEST must be absent or empty. By default files are hardlinked from a local store on the
    same file system (they are read-only) and copied otherwise.
    """
    if copy and link:
        raise click.UsageError("--copy and --link cannot be used together")
    mode = True if link else False if copy else None
    with app.progress() as progress:
        app.store(create=False).checkout(tree, dest, link=mode, progress=progress)


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--subdir", default="", metavar="PATH", help="Compare only this subdirectory.")
@_json_option
@_pass_app
def diff_command(app: App, a: str, b: str, subdir: str, as_json: bool) -> None:
    """Show what changed between two trees.

    Prints one line per path added (A), removed (D) or modified (M) from tree A to tree B.
    """
    changes = app.store(create=False).diff(a, b, subdir=subdir)
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
def ls_command(app: App, tree: str, path: str, recursive: bool, as_json: bool) -> None:
    """List the entries of a tree.

    Lists the directory PATH of TREE (default: its root). Columns: mode, kind, size, digest,
    path (paths are relative to the tree's root).
    """
    from casframe.names import split_tree_path

    store = app.store(create=False)
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
def cat_command(app: App, tree: str, path: str) -> None:
    """Print a file of a tree.

    Writes the content of the file PATH of TREE to stdout, byte for byte.
    """
    with app.store(create=False).open_file(tree, path) as stream:
        _copy_stream(stream, _binary(sys.stdout))


@click.command("put")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_json_option
@_pass_app
def put_command(app: App, files: tuple[str, ...], as_json: bool) -> None:
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
def get_command(app: App, digest: str, output: str | None) -> None:
    """Write a blob to stdout or a file.

    DIGEST is HASH/SIZE, as printed by put. The blob is verified as it is read.
    """
    from casframe.digest import Digest

    wanted = Digest.parse(digest)
    with app.store(create=False).open_read(wanted) as stream:
        if output is None or output == "-":
            _copy_stream(stream, _binary(sys.stdout))
            return
        _write_file_atomically(output, stream)


def _write_file_atomically(output: str, stream: BinaryIO) -> None:
    """Write ``stream`` to ``output`` through a temporary file beside it, renamed into place.

    Corruption is detected at the end of the stream: a failure leaves no half-written file
    and whatever ``output`` held before untouched. Devices and pipes (``/dev/null``,
    ``/dev/stdout``) are written in place, and so is a writable file in a folder this user
    may not write to (a failure then removes it, as nothing else is possible).
    """
    import stat
    import tempfile

    try:
        mode: int | None = os.stat(output).st_mode  # through symlinks and /proc/self/fd links
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with open(output, "wb") as target:
            _copy_stream(stream, target)
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
            _copy_stream(stream, target)
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
            _copy_stream(stream, target)
        except BaseException:
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
def ref_set(app: App, name: str, tree: str) -> None:
    """Point a ref at a tree.

    TREE is a digest or another ref; it must be completely stored.
    """
    store = app.store()
    store.set_ref(name, store.resolve(tree))


@ref_group.command("get")
@click.argument("name")
@_json_option
@_pass_app
def ref_get(app: App, name: str, as_json: bool) -> None:
    """Print the digest a ref points at.

    This counts as a use of NAME for least-recently-used order.
    """
    digest = app.store(create=False).get_ref(name)
    if as_json:
        _emit_json({"name": name, "digest": str(digest)})
    else:
        click.echo(str(digest))


@ref_group.command("list")
@click.argument("prefix", default="", required=False)
@_json_option
@_pass_app
def ref_list(app: App, prefix: str, as_json: bool) -> None:
    """List refs, least recently used first.

    Prints last-access time, digest and name of every ref starting with PREFIX.
    """
    refs = app.store(create=False).list_refs(prefix)
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
def ref_rm(app: App, name: str) -> None:
    """Delete a ref (the tree stays stored)."""
    app.store().delete_ref(name)


@ref_group.command("cp")
@click.argument("src")
@click.argument("dest")
@_pass_app
def ref_cp(app: App, src: str, dest: str) -> None:
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
        what = f"already present ({format_count(result.blobs_total, 'blob')})"
    else:
        what = (
            f"copied {result.blobs_sent:,} of {format_count(result.blobs_total, 'blob')} "
            f"({format_size(result.bytes_sent)})"
        )
    ref = f"; ref {result.ref} set" if result.ref else ""
    click.echo(f"{verb} {result.root} {where}: {what}{ref}")


_remote_option = click.option(
    "--remote",
    "remote_names",
    multiple=True,
    metavar="NAME",
    help="Use only this configured remote (repeatable).",
)
_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds each remote has to answer (default: its own 'timeout', else 10).",
)


def _single_store_only(option: str, remote_names: tuple[str, ...], timeout: float | None) -> None:
    if remote_names or timeout is not None:
        raise click.UsageError(f"{option} names one store: --remote and --timeout do not apply")


def _configured_remotes(app: App, names: tuple[str, ...]) -> Remotes:
    from casframe.remotes import Remotes

    remotes = Remotes.from_config(app.config())
    return remotes.select(names) if names else remotes


def _outcome_line(outcome: RemoteOutcome) -> str:
    """One human line per remote: what was sent, why it was skipped, what went wrong."""
    from casframe.remotes import RemoteStatus

    status, name, result = outcome.status, outcome.name, outcome.transfer
    if status is RemoteStatus.MISSING:
        return f"skipped {name}: {outcome.message}"
    if status is RemoteStatus.UNREACHABLE:
        return f"unreachable {name}: {outcome.message}"
    if status is RemoteStatus.READ_ONLY:
        return f"read-only {name}: not pushed ({outcome.message})"
    if status is RemoteStatus.FAILED or result is None:
        return f"failed {name}: {outcome.message}"
    ref_note = f"; ref {outcome.ref} set" if outcome.ref_set else ""
    if status is RemoteStatus.UP_TO_DATE:
        kept = f", ref {outcome.ref}" if outcome.ref else ""
        blobs = format_count(result.blobs_total, "blob")
        return f"up to date {name}: already has it ({blobs}{kept})"
    sent = f"{format_count(result.blobs_sent, 'blob')}, {format_size(result.bytes_sent)}"
    if result.blobs_sent == 0:
        sent = f"0 blobs, all {result.blobs_total:,} already there"
    verb = "pulled from" if status is RemoteStatus.PULLED else "pushed to"
    return f"{verb} {name}: {sent}{ref_note}"


def _through_remotes(
    app: App,
    operation: str,
    tree: str,
    ref_name: str | None,
    remote_names: tuple[str, ...],
    timeout: float | None,
    as_json: bool,
) -> None:
    """Pull from or push to the configured remotes; one line per remote as each ends."""
    remotes = _configured_remotes(app, remote_names)
    store = app.store()

    def show(outcome: RemoteOutcome) -> None:
        if not as_json:
            click.echo(_outcome_line(outcome))

    run = remotes.pull if operation == "pull" else remotes.push
    with app.progress(as_json) as progress:
        report = run(
            store, tree, ref=ref_name, timeout=timeout, progress=progress, on_outcome=show,
            check=False,
        )
    if as_json:
        _emit_json(report.as_dict())
    report.raise_for_failure()


@click.command("push")
@click.argument("tree")
@click.option("--to", "destination", metavar="URL|NAME", help="Copy to this one store only.")
@click.option(
    "--ref", "ref_name", metavar="NAME", help="Ref to set there (default: TREE if a ref)."
)
@_remote_option
@_timeout_option
@_json_option
@_pass_app
def push_command(
    app: App,
    tree: str,
    destination: str | None,
    ref_name: str | None,
    remote_names: tuple[str, ...],
    timeout: float | None,
    as_json: bool,
) -> None:
    """Copy a tree from this store to other stores.

    Copies only the blobs a destination lacks, then sets the ref there last. Without --to,
    every configured remote with push = true gets TREE; each is reported on its own line, and
    the exit status is 0 only when every one of them got it or already had it.
    """
    if destination is None:
        _through_remotes(app, "push", tree, ref_name, remote_names, timeout, as_json)
        return
    _single_store_only("--to", remote_names, timeout)
    source = app.store(create=False)
    dest = app.open(destination)
    with app.progress(as_json) as progress:
        result = source.push(dest, tree, ref=ref_name, progress=progress)
    _report_transfer(result, "pushed", source, dest, as_json)


@click.command("pull")
@click.argument("tree")
@click.option("--from", "origin", metavar="URL|NAME", help="Copy from this one store only.")
@click.option("--ref", "ref_name", metavar="NAME", help="Ref to set here (default: TREE if a ref).")
@_remote_option
@_timeout_option
@_json_option
@_pass_app
def pull_command(
    app: App,
    tree: str,
    origin: str | None,
    ref_name: str | None,
    remote_names: tuple[str, ...],
    timeout: float | None,
    as_json: bool,
) -> None:
    """Copy a tree from other stores into this one.

    TREE is a digest or a ref of the other store. Copies only the blobs this store lacks, then
    sets the ref last. Without --from, the configured remotes are tried in order and the first
    that has TREE is pulled from; the exit status is 0 when one of them delivered it.
    """
    if origin is None:
        _through_remotes(app, "pull", tree, ref_name, remote_names, timeout, as_json)
        return
    _single_store_only("--from", remote_names, timeout)
    dest = app.store()
    source = app.open(origin, create=False)
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


# -- maintenance ----------------------------------------------------------------------------


def _parse_with(parse: Any) -> Any:
    """A click callback turning a parser's ValueError into a usage error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _duration(value: str) -> float:
    from casframe.maintenance import parse_duration

    return parse_duration(value)


def _size(value: str) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"invalid size {value!r}: must be positive")
    return size


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"invalid fraction {value!r}: e.g. 0.8") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"invalid fraction {value!r}: must be in (0, 1]")
    return fraction


_grace_option = click.option(
    "--grace",
    "grace_period",
    default="1h",
    show_default=True,
    metavar="DURATION",
    callback=_parse_with(_duration),
    help="Spare blobs younger than this (30s, 10m, 1h, 2d or 0), so that writers still "
    "uploading before they set a ref lose nothing.",
)
_dry_run_option = click.option(
    "-n", "--dry-run", is_flag=True, help="Delete nothing; report what would go."
)


def _objects(count: int, size: int) -> str:
    return f"{format_count(count, 'object')} ({format_size(size)})"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}".replace(".0", "")
    return f"{seconds:g}s"


def _warn_ref_problems(problems: Sequence[Any]) -> None:
    for problem in problems:
        click.echo(
            f"{PROG}: warning: ref {problem.ref}: {problem.kind} {problem.digest}: "
            f"{problem.detail}",
            err=True,
        )


def _ref_table(usage: Sequence[Any], *, extra: str = "") -> None:
    """One line per ref: its total and exclusive size and when it was last used."""
    if not usage:
        return
    rows = [
        (
            u.name,
            format_size(u.total_bytes),
            format_size(u.exclusive_bytes),
            _iso_time(u.accessed) if u.accessed else "-",
        )
        for u in usage
    ]
    header = ("REF", "TOTAL", "EXCLUSIVE", "LAST USED")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        click.echo(
            f"{row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  "
            f"{row[2].rjust(widths[2])}  {row[3]}{extra}".rstrip()
        )


def _prune_summary(report: Any) -> str:
    verb = "would free" if report.dry_run else "freed"
    text = (
        f"{verb} {_objects(report.objects_freed, report.bytes_freed)} of "
        f"{_objects(report.objects_scanned, report.bytes_scanned)} scanned; "
        f"kept {report.objects_reachable:,} reachable from "
        f"{format_count(report.refs_checked, 'ref')}"
    )
    if report.objects_kept_young:
        text += (
            f" and {_objects(report.objects_kept_young, report.bytes_kept_young)} younger "
            f"than {_age(report.grace_period)}"
        )
    if report.temp_files_removed:
        verb = "would remove" if report.dry_run else "removed"
        text += f"; {verb} {report.temp_files_removed:,} leftover(s) of interrupted uploads"
    return text


@click.command("prune")
@_grace_option
@_dry_run_option
@_json_option
@_pass_app
def prune_command(app: App, grace_period: float, dry_run: bool, as_json: bool) -> None:
    """Delete blobs that no ref reaches.

    Marks everything reachable from every ref (through Directory trees, action results and
    asset refs), then deletes the rest unless it is younger than the grace period. With
    --dry-run, also shows per ref the bytes it alone keeps alive: what deleting it would free.
    """
    store = app.store()
    with app.progress(as_json) as progress:
        report = store.prune(grace_period=grace_period, dry_run=dry_run, progress=progress)
    if as_json:
        _emit_json(report.to_dict())
        return
    _warn_ref_problems(report.problems)
    if dry_run:
        _ref_table(report.refs)
    click.echo(_prune_summary(report))


@click.command("gc")
@click.option(
    "--max-size",
    required=True,
    metavar="SIZE",
    callback=_parse_with(_size),
    help="Quota for the store: 500M, 10GiB, 1.5T (binary: K = KiB = 1024), or 20kB, 10GB "
    "(decimal).",
)
@click.option(
    "--low-watermark",
    default="0.8",
    show_default=True,
    metavar="FRACTION",
    callback=_parse_with(_fraction),
    help="Once over the quota, expire refs until the store would fall to this fraction of it.",
)
@click.option(
    "--keep",
    multiple=True,
    metavar="PATTERN",
    help="Never expire refs matching this shell pattern (e.g. 'release/*'); repeatable.",
)
@_grace_option
@_dry_run_option
@_json_option
@_pass_app
@click.pass_context
def gc_command(
    ctx: click.Context,
    app: App,
    max_size: int,
    low_watermark: float,
    keep: tuple[str, ...],
    grace_period: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Keep the store under a quota: expire least recently used refs, then prune.

    When the store holds more than --max-size, refs are deleted least recently used first
    (never one matching --keep) until what would remain after pruning fits under
    --low-watermark × --max-size; then prune runs. Exits with status 1 when the target cannot
    be reached (only protected refs or young data are left).
    """
    store = app.store()
    with app.progress(as_json) as progress:
        report = store.gc(
            max_size=max_size, low_watermark=low_watermark, keep=keep,
            grace_period=grace_period, dry_run=dry_run, progress=progress,
        )
    if as_json:
        _emit_json(report.to_dict())
    else:
        state = "over" if report.over_quota else "within"
        click.echo(
            f"store holds {_objects(report.objects_before, report.bytes_before)}: {state} the "
            f"quota of {format_size(report.max_size)}"
        )
        verb = "would expire" if dry_run else "expired"
        for usage in report.refs_deleted:
            last = _iso_time(usage.accessed) if usage.accessed else "never"
            click.echo(
                f"{verb} ref {usage.name} (last used {last}; alone keeps "
                f"{format_size(usage.exclusive_bytes)})"
            )
        for name in report.refs_kept:
            click.echo(f"kept ref {name} (matches --keep)")
        if report.prune is not None:
            _warn_ref_problems(report.prune.problems)
            click.echo(_prune_summary(report.prune))
        click.echo(
            f"{'would hold' if dry_run else 'now holds'} {format_size(report.predicted_bytes)}"
            f" (target {format_size(report.target_bytes)})"
        )
    if not report.reached_target:
        # Only the reasons that the options given can cause.
        reasons = ["refs matching --keep"] if keep else []
        if grace_period > 0:
            reasons.append(f"blobs younger than --grace {_age(grace_period)}")
        why = f": what is left is kept by {' or '.join(reasons)}" if reasons else ""
        click.echo(
            f"{PROG}: warning: cannot get under {format_size(report.target_bytes)}{why}",
            err=True,
        )
        ctx.exit(EXIT_ERROR)


@click.command("fsck")
@click.option(
    "--repair",
    is_flag=True,
    help="Delete corrupt blobs (nothing healthy is touched) and name the refs left incomplete.",
)
@_json_option
@_pass_app
@click.pass_context
def fsck_command(ctx: click.Context, app: App, repair: bool, as_json: bool) -> None:
    """Check every blob's content and every ref's tree.

    Verifies the hash and size of every stored blob, that every ref's tree is complete and
    that every Directory is canonical and safe. Prints one line per problem with its digest
    and the refs concerned; exits with status 1 when there is any.
    """
    store = app.store(create=False)
    with app.progress(as_json) as progress:
        report = store.fsck(repair=repair, progress=progress)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for problem in report.problems:
            refs = f" (refs: {', '.join(problem.refs)})" if problem.refs else ""
            click.echo(f"{problem.kind} {problem.digest}: {problem.detail}{refs}")
        for digest in report.deleted:
            click.echo(f"deleted corrupt blob {digest}")
        for name in report.incomplete_refs:
            click.echo(f"incomplete ref {name}")
        scope = "" if report.listed else " reachable from refs (this backend cannot list)"
        found = len(report.problems)
        click.echo(
            f"checked {_objects(report.blobs_checked, report.bytes_checked)}{scope}, "
            f"{format_count(report.refs_checked, 'ref')}, "
            f"{format_count(report.directories_checked, 'directory', 'directories')}: "
            + (format_count(found, "problem") if found else "no problems")
        )
    if not report.ok:
        ctx.exit(EXIT_ERROR)


@click.command("du")
@_json_option
@_pass_app
def du_command(app: App, as_json: bool) -> None:
    """Show the store's size, and per ref its total and exclusive size.

    A ref's exclusive size is what no other ref keeps alive: what deleting it would free.
    Refs are listed most exclusive bytes first.
    """
    store = app.store(create=False)
    with app.progress(as_json) as progress:
        report = store.du(progress=progress)
    if as_json:
        _emit_json(report.to_dict())
        return
    _warn_ref_problems(report.problems)
    _ref_table(report.refs)
    click.echo(
        f"total {_objects(report.total_objects, report.total_bytes)}: "
        f"{_objects(report.reachable_objects, report.reachable_bytes)} reachable from refs, "
        f"{_objects(report.unreachable_objects, report.unreachable_bytes)} unreachable"
    )
