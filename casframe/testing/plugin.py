"""casframe's pytest plugin: store fixtures and tree helpers for casframe and its plugins.

Loaded automatically through the ``pytest11`` entry point wherever casframe is installed, so it
must be cheap to import: it imports the ``casframe`` package, whose names load on first use,
so casframe's modules are imported when a fixture first uses them.

Fixtures:

``memory_store``
    a fresh, empty ``memory://`` store.
``local_store``
    a fresh ``file://`` store in the test's temporary directory.
``make_tree``
    ``make_tree(name=None, *, large=False) -> Path`` writes a realistic tree (see
    :func:`casframe.testing.write_tree`) under the test's temporary directory.
``s3_mock``, ``s3_store``, ``moto_server``, ``s3_server_bucket``, ``s3_server_store``,
``fake_aws_credentials``
    S3 against moto, in process or over HTTP on a free loopback port
    (:mod:`casframe.testing.s3`; needs ``casframe[s3]`` and moto).
``cas_server``
    ``cas_server(store, **settings) -> "grpc://127.0.0.1:PORT"`` serves any store with an
    in-process ``casframe serve`` on a free loopback port (:mod:`casframe.testing.server`).

docs/testing.md describes them all, with examples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import casframe
from casframe.testing import write_tree

if TYPE_CHECKING:
    from casframe.store import Store

# The conformance suite is plain asserts; let pytest explain them when a backend fails one.
pytest.register_assert_rewrite("casframe.testing.conformance")

# S3 fixtures (s3_mock, s3_store, moto_server, s3_server_bucket, s3_server_store,
# fake_aws_credentials) and the server fixture (cas_server). moto, boto3 and grpc are imported
# inside the fixtures, so this costs nothing.
pytest_plugins = ["casframe.testing.s3", "casframe.testing.server"]


@pytest.fixture
def memory_store() -> Iterator[Store]:
    """A fresh, empty ``memory://`` store."""
    store = casframe.open_store("memory://")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[Store]:
    """A fresh ``file://`` store under the test's temporary directory (``tmp_path/store``)."""
    store = casframe.open_store(f"file://{tmp_path / 'store'}")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """A factory writing a realistic directory tree under ``tmp_path``; returns its path."""
    numbers = itertools.count()

    def factory(name: str | None = None, *, large: bool = False) -> Path:
        return write_tree(tmp_path / (name or f"tree{next(numbers)}"), large=large)

    return factory
