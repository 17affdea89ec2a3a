"""The state of one ``casframe`` invocation: global options and the stores it opened."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from casframe.cli.progressbar import TqdmProgress
from casframe.lazy import lazy_module
from casframe.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from casframe import config, plugins
    from casframe.config import Config
    from casframe.store import Store
else:  # loaded when a command first opens a store: --version and --help never pay for them
    config = lazy_module("casframe.config")
    plugins = lazy_module("casframe.plugins")

__all__ = ["App"]

def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class App:
    """Global options and the stores opened by one invocation (closed when it ends).

    Commands, plugin commands included, receive it as click's context object
    (``@click.pass_obj``): :meth:`store`, :meth:`open` and :meth:`config` are public API.
    """

    def __init__(self) -> None:
        self.store_choice: str | None = None
        self.config_file: str | None = None
        self.verbose = False
        #: ``--digest-function``: the function of every store this invocation opens.
        self.digest_function: str | None = None
        self._config: Config | None = None
        self._store: Store | None = None
        self._opened: list[Store] = []

    def config(self) -> Config:
        if self._config is None:
            self._config = config.load_config(self.config_file)
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
        """Open another store given as a URL, a configured name or a path (with the
        invocation's ``--digest-function``, when given)."""
        store = plugins.open_configured_store(
            name_or_url, config=self.config(), create=create,
            digest_function=self.digest_function,
        )
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
