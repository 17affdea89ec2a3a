"""Bazel, a real REAPI client, uses ``casframe serve`` as its remote cache.

A small genrule workspace is built twice against the server, each time with a fresh output
base; the second build must take every action from the remote cache. Bazel comes from
Debian's ``bazel-bootstrap``, installed here when missing (the tests' set-up, not a skip).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from casframe import Store, open_store

BUILD = """\
genrule(name = "greeting", outs = ["greeting.txt"], cmd = "echo hello from bazel > $@")
genrule(
    name = "twice",
    srcs = [":greeting"],
    outs = ["twice.txt"],
    cmd = "cat $(location :greeting) $(location :greeting) > $@",
)
genrule(
    name = "count",
    srcs = [":twice"],
    outs = ["count.txt"],
    cmd = "wc -c < $(location :twice) > $@",
)
genrule(
    name = "tool",
    outs = ["tool.sh"],
    cmd = "printf '#!/bin/sh\\\\necho tool\\\\n' > $@ && chmod +x $@",
    executable = True,
)
"""

ACTIONS = 4  # one per genrule above


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    (ws / "WORKSPACE").write_text("")
    (ws / "BUILD").write_text(BUILD)
    return ws


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


def _build(bazel: str, workspace: Path, output_root: Path, cache_url: str) -> str:
    result = subprocess.run(
        [
            bazel,
            "--batch",
            f"--output_user_root={output_root}",
            "build",
            "//:all",
            f"--remote_cache={cache_url}",
            "--remote_timeout=60",
            "--noshow_progress",
            "--spawn_strategy=local",
        ],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _processes(log: str) -> str:
    match = re.search(r"INFO: (\d+) process(?:es)?: ([^\n]*)", log)
    assert match, log[-2000:]
    return match.group(2)


def test_second_build_takes_every_action_from_the_cache(
    bazel: str, workspace: Path, tmp_path: Path, served_store: tuple[Store, str]
) -> None:
    store, url = served_store
    first = _build(bazel, workspace, tmp_path / "out1", url)
    assert "remote cache hit" not in _processes(first)
    action_results = store.list_refs("ac/")
    assert len(action_results) == ACTIONS, [r.name for r in action_results]

    second = _build(bazel, workspace, tmp_path / "out2", url)
    assert f"{ACTIONS} remote cache hit" in _processes(second), _processes(second)
    outputs = workspace / "bazel-bin"
    assert (outputs / "twice.txt").read_text() == "hello from bazel\n" * 2
    assert os.access(outputs / "tool.sh", os.X_OK)


def test_cache_misses_once_an_output_blob_is_gone(
    bazel: str, workspace: Path, tmp_path: Path, served_store: tuple[Store, str]
) -> None:
    store, url = served_store
    _build(bazel, workspace, tmp_path / "out1", url)
    # Remove every file blob of the cache: action results now name missing outputs, so the
    # server must answer NOT_FOUND and Bazel must run the actions again.
    results = {r.digest for r in store.list_refs("ac/")}
    blobs = [info.digest for info in store.blobs.iter_blobs() if info.digest not in results]
    store.blobs.delete_blobs(blobs)
    second = _build(bazel, workspace, tmp_path / "out2", url)
    assert "remote cache hit" not in _processes(second), _processes(second)
