"""Bazel, a real REAPI client, uses ``casframe serve`` as its remote cache.

A small genrule workspace is built twice against the server, each time with a fresh output
base; the second build must take every action from the remote cache. Bazel comes from
Debian's ``bazel-bootstrap``, installed by ``scripts/test-prereqs``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bazel_helpers import ACTIONS, build, process_summary, write_workspace

from casframe import Store, open_store


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return write_workspace(tmp_path / "workspace")


@pytest.fixture(params=["file", "s3"])
def served_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """``casframe serve`` over a file:// store, or over s3:// on moto's HTTP server."""
    from casframe.server import Server

    if request.param == "s3":
        store = request.getfixturevalue("s3_server_store")
    else:
        store = open_store(f"file://{tmp_path}/cache")
        request.addfinalizer(store.close)
    with Server(store, listen="127.0.0.1:0") as server:
        yield store, f"grpc://127.0.0.1:{server.port}"


def test_second_build_takes_every_action_from_the_cache(
    bazel: str, workspace: Path, tmp_path: Path, served_store: tuple[Store, str]
) -> None:
    store, url = served_store
    first = build(bazel, workspace, tmp_path / "out1", url)
    assert "remote cache hit" not in process_summary(first)
    action_results = store.list_refs("ac/")
    assert len(action_results) == ACTIONS, [r.name for r in action_results]

    second = build(bazel, workspace, tmp_path / "out2", url)
    assert f"{ACTIONS} remote cache hit" in process_summary(second), process_summary(second)
    outputs = workspace / "bazel-bin"
    assert (outputs / "twice.txt").read_text() == "hello from bazel\n" * 2
    assert os.access(outputs / "tool.sh", os.X_OK)


def test_cache_misses_once_an_output_blob_is_gone(
    bazel: str, workspace: Path, tmp_path: Path, served_store: tuple[Store, str]
) -> None:
    store, url = served_store
    build(bazel, workspace, tmp_path / "out1", url)
    # Remove every file blob of the cache: action results now name missing outputs, so the
    # server must answer NOT_FOUND and Bazel must run the actions again.
    results = {r.digest for r in store.list_refs("ac/")}
    blobs = [info.digest for info in store.blobs.iter_blobs() if info.digest not in results]
    store.blobs.delete_blobs(blobs)
    second = build(bazel, workspace, tmp_path / "out2", url)
    assert "remote cache hit" not in process_summary(second), process_summary(second)
