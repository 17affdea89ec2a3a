"""What a command needs once it runs, and ``casframe --version`` and ``--help`` never do: the
configuration file and stores opened through the plugins.

:func:`casframe.cli.app.runtime` loads this module by name the first time a command asks for
one of these, as the group loads the command modules (:data:`~casframe.cli.group.
BUILTIN_COMMANDS`): the version and the help stay cheap to print.
"""

from __future__ import annotations

from casframe.config import Config, load_config, open_configured_store

__all__ = ["Config", "load_config", "open_configured_store"]
