"""Fixtures for the ``sqlite://`` backend's tests.

casframe's own pytest plugin (loaded through its ``pytest11`` entry point wherever casframe is
installed) adds ``make_tree``, ``memory_store`` and the rest; these are this backend's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from casframe import Store, open_store


@pytest.fixture
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of a database file that does not exist yet.

    It is kept out of ``tmp_path``: some conformance tests check that nothing there changes,
    and SQLite's shared-memory file changes with every transaction.
    """
    return f"sqlite://{tmp_path_factory.mktemp('sqlite') / 'cas.db'}"


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[Store]:
    """A fresh ``sqlite://`` store, opened through casframe's plugin registry."""
    store = open_store(sqlite_url)
    try:
        yield store
    finally:
        store.close()
