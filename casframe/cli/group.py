"""The ``casframe`` click group: commands loaded by name on first use, plugin commands added
through ``casframe_register_commands``, and every error turned into one line.

Built-in commands are listed here as ``"module:attribute"`` strings (click's lazy-group
pattern): ``casframe ref list`` imports :mod:`casframe.cli.refs` and nothing of the other
commands, so each command pays only for what it uses.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from casframe import __version__
from casframe.cli.app import App
from casframe.cli.helpers import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    describe_error,
    error_line,
)
from casframe.errors import CasframeError
from casframe.lazy import lazy_module

if TYPE_CHECKING:
    import traceback

    from casframe import plugins
else:  # pluggy and the entry points load once a command is looked up, never for --version
    plugins = lazy_module("casframe.plugins")
    traceback = lazy_module("traceback")  # for --debug's tracebacks only

__all__ = [
    "BUILTIN_COMMANDS",
    "BUILTIN_SUMMARIES",
    "CasframeGroup",
    "DuplicateCommandError",
    "PluginCommandError",
    "main",
    "make_cli",
]

#: Every built-in command, by name: where it lives.
BUILTIN_COMMANDS = {
    "import": "casframe.cli.trees:import_command",
    "checkout": "casframe.cli.trees:checkout_command",
    "diff": "casframe.cli.trees:diff_command",
    "ls": "casframe.cli.trees:ls_command",
    "cat": "casframe.cli.trees:cat_command",
    "put": "casframe.cli.blobs:put_command",
    "get": "casframe.cli.blobs:get_command",
    "ref": "casframe.cli.refs:ref_group",
    "push": "casframe.cli.transfer:push_command",
    "pull": "casframe.cli.transfer:pull_command",
    "plugins": "casframe.cli.plugins:plugins_command",
    "serve": "casframe.server.command:serve_command",
    "prune": "casframe.cli.maintenance:prune_command",
    "gc": "casframe.cli.maintenance:gc_command",
    "fsck": "casframe.cli.maintenance:fsck_command",
    "du": "casframe.cli.maintenance:du_command",
}

#: The first paragraph of each built-in command's help, as ``casframe --help`` lists it: the
#: listing shows these instead of importing every command module (a test keeps them equal).
BUILTIN_SUMMARIES = {
    "import": "Store a directory as a tree.",
    "checkout": "Write a tree into a directory.",
    "diff": "Show what changed between two trees.",
    "ls": "List the entries of a tree.",
    "cat": "Print a file of a tree.",
    "put": "Store files as blobs.",
    "get": "Write a blob to stdout or a file.",
    "ref": "Manage refs (names for trees).",
    "push": "Copy a tree from this store to other stores.",
    "pull": "Copy a tree from other stores into this one.",
    "plugins": "List installed plugins.",
    "serve": "Serve STORE (a URL or a configured store name) to REAPI clients over gRPC.",
    "prune": "Delete blobs that no ref reaches.",
    "gc": "Keep the store under a quota: expire least recently used refs, then prune.",
    "fsck": "Check every blob's content and every ref's tree.",
    "du": "Show the store's size, and per ref its total and exclusive size.",
}


class DuplicateCommandError(CasframeError):
    """A plugin tried to add a command whose name is already taken."""

    reason = "duplicate-command"


class PluginCommandError(CasframeError):
    """A plugin's ``casframe_register_commands`` hook failed."""

    reason = "plugin-commands"


class CasframeGroup(click.Group):
    """The top-level group: adds plugin commands once, and turns every error into one line."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Commands known by name, imported from "module:attribute" on first use.
        self._lazy = dict(lazy_commands or {})
        self._owners: dict[str, str] = dict.fromkeys(self._lazy, PROG)
        self._registering: str | None = None
        self._plugin_commands_loaded = False
        self._listing = False  # formatting the help's list of commands

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name or ""
        owner = f"plugin {self._registering!r}" if self._registering else PROG
        if name in self.commands or name in self._lazy:
            raise DuplicateCommandError(
                f"{owner} cannot add command {name!r}: "
                f"the name is already taken by {self._owners.get(name, PROG)}"
            )
        super().add_command(cmd, name)
        self._owners[name] = owner

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return sorted({*self.commands, *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # Plugins are asked for their commands once any command is looked up (not for
        # --version), before the name is resolved: a clash fails whatever command was asked.
        self.load_plugin_commands()
        target = self._lazy.get(cmd_name)
        if target is not None and cmd_name not in self.commands:
            if self._listing and cmd_name in BUILTIN_SUMMARIES:
                # Listed in --help, not run: a stand-in with the summary, no import.
                return click.Command(cmd_name, help=BUILTIN_SUMMARIES[cmd_name])
            module, _, attribute = target.partition(":")
            command = getattr(importlib.import_module(module), attribute)
            click.Group.add_command(self, command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def load_plugin_commands(self) -> None:
        """Call every plugin's ``casframe_register_commands`` once, in registration order.

        Each plugin is called on its own so that a clash names the plugin responsible; the
        earlier plugin keeps the name.
        """
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        hooks = plugins.each_plugin(plugins.get_plugin_manager(), "casframe_register_commands")
        for plugin, call in hooks:
            self._registering = plugin
            try:
                call(cli=self)
            except CasframeError:
                raise
            except Exception as exc:
                raise PluginCommandError(
                    f"plugin {plugin!r} failed to add its commands: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._registering = None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command; return the exit status, or exit with it in standalone mode."""
        extra["obj"] = app = App()
        # Every context inherits the root's width: click measures the terminal with shutil,
        # whose import (bz2, lzma, fnmatch) costs `casframe --help` 7 M instructions.
        extra.setdefault("terminal_width", help_width())
        code = _run(self, app, args, prog_name or PROG, complete_var, extra)
        if standalone_mode:
            sys.exit(code)
        return code


def help_width() -> int:
    """The width click formats help to, as its ``HelpFormatter`` computes it (at most 78
    columns, at least 50; what a test runner forces), without importing :mod:`shutil`:
    ``shutil.get_terminal_size``'s reading of ``$COLUMNS``, then of standard output."""
    forced = click.formatting.FORCED_WIDTH
    if forced is not None:
        return forced
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return max(min(columns or 80, 80) - 2, 50)


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
        error_line(message)

    try:
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
        report(exc, describe_error(exc))
        return EXIT_ERROR
    except Exception as exc:
        hint = "" if app.verbose else " (run with -v for the traceback)"
        report(exc, f"internal error: {type(exc).__name__}: {describe_error(exc)}{hint}")
        return EXIT_ERROR


def make_cli() -> CasframeGroup:
    """A fresh ``casframe`` command; plugin commands are added when it first runs."""

    @click.group(
        cls=CasframeGroup,
        lazy_commands=BUILTIN_COMMANDS,
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
    @click.option(
        "--digest-function",
        metavar="NAME",
        envvar="CASFRAME_DIGEST_FUNCTION",
        help="Digest function of every store the command opens, remotes included: sha256 "
        "(default), sha384, sha512 or blake3. Default: $CASFRAME_DIGEST_FUNCTION, else the "
        "store's digest_function option, else sha256.",
    )
    @click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
    # The version as a string: asking importlib.metadata would cost more than the rest.
    @click.version_option(version=__version__, prog_name=PROG)
    @click.pass_context
    def cli(
        ctx: click.Context,
        store: str | None,
        config_file: str | None,
        digest_function: str | None,
        verbose: bool,
    ) -> None:
        """Content-addressed artifact storage in the REAPI v2 data model.

        TREE arguments take a digest (HASH/SIZE) or a ref name.
        """
        app = ctx.ensure_object(App)
        app.store_choice = store
        app.config_file = config_file
        app.digest_function = digest_function or None
        app.verbose = verbose
        ctx.call_on_close(app.close)

    return cli


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line and exit with its status (the console script enters through
    :func:`casframe.__main__.main`)."""
    sys.exit(make_cli().main(args=argv, prog_name=PROG, standalone_mode=False))
