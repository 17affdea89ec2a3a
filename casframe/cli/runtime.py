"""What a command needs once it runs, and ``casframe --version`` never does: the configuration
file, stores opened through the plugins, and the plugin manager that adds plugin commands.

:func:`casframe.cli.app.runtime` loads this module by name the first time a command asks for
one of these, as the group loads the command modules (:data:`~casframe.cli.group.
BUILTIN_COMMANDS`): the version and the help stay cheap to print.
"""

from __future__ import annotations

from casframe.config import Config, load_config, open_configured_store
from casframe.plugins import get_plugin_manager

__all__ = ["Config", "get_plugin_manager", "load_config", "open_configured_store"]
