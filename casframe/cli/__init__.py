"""The ``casframe`` command line.

The package parses arguments, opens stores through :mod:`casframe.config`, renders results,
progress bars and errors, and nothing else: every storage operation is a :class:`Store` call.
Each failure a user can cause ends as one line on stderr (``casframe: error: ...``) and a
non-zero exit status; ``-v`` adds the traceback.

Start-up must stay cheap: this package imports click and nothing heavy; each command's module
(:mod:`casframe.cli.trees`, ``blobs``, ``refs``, ``transfer``, ``plugins``, ``maintenance``,
and :mod:`casframe.server.command`) is imported by name when that command runs
(:data:`casframe.cli.group.BUILTIN_COMMANDS`; ``--help`` lists them from
:data:`~casframe.cli.group.BUILTIN_SUMMARIES` without importing them), and gRPC, protobuf,
boto3 and tqdm only by the code that uses them. :mod:`casframe.cli.helpers` is the public
toolkit for plugin commands.
"""

from __future__ import annotations

from casframe.cli.app import App
from casframe.cli.group import (
    CasframeGroup,
    DuplicateCommandError,
    PluginCommandError,
    main,
    make_cli,
)
from casframe.cli.progressbar import TqdmProgress

__all__ = [
    "App",
    "CasframeGroup",
    "DuplicateCommandError",
    "PluginCommandError",
    "TqdmProgress",
    "main",
    "make_cli",
]
