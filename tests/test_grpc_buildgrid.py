"""The grpc:// backend against an independent REAPI server: BuildGrid, from PyPI.

BuildGrid carries its own copies of the REAPI protos, which would clash with casframe's in one
process, so it lives in a virtualenv of its own that this module creates on first use and keeps
in the user's cache directory (``$XDG_CACHE_HOME/casframe-tests/``, or the path in
``CASFRAME_BUILDGRID_VENV``); later runs reuse it. ``bgd server start`` then runs a CAS,
ByteStream and Capabilities server on a free loopback port for the whole module.

If the install fails the tests fail, with pip's output: a skip would hide that this peer was
never tried.

BuildGrid's 0.9 releases need Python 3.13: the virtualenv uses the newest Python found (on PATH
or under pyenv) and the BuildGrid release pinned for it (see ``_BUILDGRID_FOR_PYTHON``).
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casframe import (
    EMPTY_DIGEST,
    BlobNotFoundError,
    Digest,
    Store,
    UnsupportedOperationError,
    open_store,
)
from casframe.digest import CHUNK_SIZE
from casframe.testing import LARGE_FILE_SIZE, assert_tree_equal, random_bytes

# The newest BuildGrid release installable on each Python (its Requires-Python). 0.9.x needs
# 3.13; 0.4.4 is the last release that runs on 3.11.
_BUILDGRID_FOR_PYTHON = {(3, 13): "0.9.1", (3, 12): "0.8.16", (3, 11): "0.4.4"}
_INTERPRETERS = ("python3.14", "python3.13", "python3.12", "python3")
# pip's resolver and the wheels' downloads: about a minute on a fresh machine.
_INSTALL_TIMEOUT = 600
_START_TIMEOUT = 60

# One storage per instance: the unnamed instance and "main", so that instance names are seen
# to reach the server and to separate content.
_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
storages:
  - !lru-storage &default-storage
    size: 256MB
  - !lru-storage &main-storage
    size: 64MB
instances:
  - name: ""
    services:
      - !cas
        storage: *default-storage
      - !bytestream
        storage: *default-storage
  - name: main
    services:
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
"""


def _interpreter() -> tuple[str, tuple[int, int]]:
    """The newest Python here that runs (on PATH or under pyenv), with its version.

    pyenv's shims exist for versions that are installed but not selected, and fail when run:
    each candidate is asked for its version, and one that cannot answer is passed over.
    """
    candidates = [sys.executable]
    candidates += [p for name in _INTERPRETERS if (p := shutil.which(name))]
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv"))
    candidates += [str(p) for p in pyenv_root.glob("versions/3.*/bin/python3")]
    best: tuple[tuple[int, int], str] | None = None
    for candidate in dict.fromkeys(candidates):
        try:
            answer = subprocess.run(
                [candidate, "-c", "import sys, venv; print(*sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if answer.returncode == 0:
            major, minor = map(int, answer.stdout.split())
            if best is None or (major, minor) > best[0]:
                best = ((major, minor), candidate)
    assert best is not None  # sys.executable answers
    return best[1], best[0]


def _requirement(version: tuple[int, int]) -> str:
    for needed in sorted(_BUILDGRID_FOR_PYTHON, reverse=True):
        if version >= needed:
            return f"buildgrid=={_BUILDGRID_FOR_PYTHON[needed]}"
    pytest.fail(f"BuildGrid needs Python 3.11 or newer; this is {version}")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "casframe-tests"


def _install_buildgrid() -> tuple[Path, str]:
    """Create (once) the virtualenv holding BuildGrid; return its ``bgd`` and requirement."""
    python, version = _interpreter()
    requirement = _requirement(version)
    override = os.environ.get("CASFRAME_BUILDGRID_VENV")
    venv = Path(override) if override else (
        _cache_root() / f"buildgrid-{requirement.split('==')[1]}-py{version[0]}.{version[1]}"
    )
    bgd = venv / "bin" / "bgd"
    stamp = venv / ".casframe-installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time (parallel test runs)
        if stamp.exists() and stamp.read_text() == requirement and bgd.exists():
            return bgd, requirement
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [python, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", requirement],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True,
                                      timeout=_INSTALL_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                pytest.fail(f"installing BuildGrid timed out after {_INSTALL_TIMEOUT}s: {step}")
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.fail(
                    f"cannot install {requirement} into {venv} (needed to test grpc:// against "
                    f"an independent REAPI server); {' '.join(step)} said:\n"
                    f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
                )
        if not bgd.exists():
            pytest.fail(f"{requirement} installed into {venv} but has no bin/bgd")
        stamp.write_text(requirement)
    return bgd, requirement


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_serving(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    import grpc

    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as reapi
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as reapi_grpc,
    )

    deadline = time.monotonic() + _START_TIMEOUT
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reapi_grpc.CapabilitiesStub(channel)
        while True:
            if process.poll() is not None:
                pytest.fail(f"bgd server exited with {process.returncode}:\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            try:
                stub.GetCapabilities(reapi.GetCapabilitiesRequest(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    pytest.fail(f"bgd server did not answer within {_START_TIMEOUT}s:\n"
                                f"{log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.2)


class BuildGrid:
    """A running ``bgd server`` and what it was started with."""

    def __init__(self, port: int, requirement: str, config: str) -> None:
        self.port = port
        self.requirement = requirement
        self.config = config

    def url(self, instance: str = "") -> str:
        return f"grpc://127.0.0.1:{self.port}/{instance}"


@pytest.fixture(scope="module")
def buildgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildGrid]:
    bgd, requirement = _install_buildgrid()
    workdir = tmp_path_factory.mktemp("buildgrid")
    port = _free_port()
    config = _CONFIG.format(port=port)
    (workdir / "bgd.yml").write_text(config)
    log = workdir / "bgd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(bgd), "server", "start", "bgd.yml"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_serving(process, port, log)
        yield BuildGrid(port, requirement, config)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def store(buildgrid: BuildGrid) -> Iterator[Store]:
    with open_store(buildgrid.url()) as opened:
        yield opened


def test_capabilities_set_the_batch_limit(store: Store) -> None:
    # BuildGrid advertises 4 MiB minus 1 KiB; the backend keeps room for message framing.
    assert 3 << 20 < store.blobs.batch_limit < 4 << 20  # type: ignore[attr-defined]
    assert store.blobs.max_batch_bytes < store.blobs.batch_limit  # type: ignore[attr-defined]
    assert store.blobs.capabilities == frozenset()


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1])
def test_blob_round_trip(store: Store, size: int) -> None:
    data = random_bytes(size, seed=size + 100)
    digest = store.put_bytes(data)
    assert digest == Digest.of_bytes(data)
    assert store.find_missing([digest]) == set()
    assert store.read_bytes(digest) == data
    with store.open_read(digest) as stream:
        assert stream.read() == data
    assert store.put_bytes(data) == digest  # storing again is success


def test_find_missing_in_thousands(store: Store) -> None:
    stored = [store.put_bytes(b"buildgrid blob %d" % i) for i in range(200)]
    absent = [Digest.of_bytes(b"buildgrid absent %d" % i) for i in range(5000)]
    wrong_size = [Digest(d.hash, d.size + 1) for d in stored[:20]]
    assert store.find_missing([*stored, *absent, *wrong_size, EMPTY_DIGEST]) == {
        *absent, *wrong_size
    }


def test_read_many_batches(store: Store) -> None:
    blobs = {store.put_bytes(random_bytes(50_000, seed=i)): i for i in range(120)}  # ~6 MB
    got = dict(store.read_many(blobs))
    assert got.keys() == blobs.keys()
    absent = Digest.of_bytes(b"not in buildgrid")
    with pytest.raises(BlobNotFoundError) as caught:
        list(store.read_many([next(iter(blobs)), absent]))
    assert caught.value.digests == (absent,)


def test_large_blob_through_bytestream_with_offsets(store: Store) -> None:
    data = random_bytes(LARGE_FILE_SIZE, seed=7)
    digest = store.put_stream(io.BytesIO(data))
    assert store.find_missing([digest]) == set()
    with store.open_read(digest) as stream:
        assert stream.read() == data
    for offset in (1, CHUNK_SIZE + 7, len(data) - 1, len(data)):
        with store.open_read(digest, offset) as stream:
            assert stream.read() == data[offset:]
    absent = Digest(digest.hash, digest.size + 1)
    with pytest.raises(BlobNotFoundError):
        store.open_read(absent).read()


def test_import_and_checkout_a_tree(store: Store, make_tree, tmp_path: Path) -> None:
    source = make_tree(large=True)
    root = store.import_directory(source)
    store.checkout(root, tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")
    assert store.import_directory(source) == root


def test_transfer_file_to_buildgrid_to_file(store: Store, make_tree, tmp_path: Path) -> None:
    source = make_tree(large=True)
    (source / "unique.txt").write_text(f"not yet in the shared server: {tmp_path}")
    with open_store(f"file://{tmp_path / 'a'}") as first, \
            open_store(f"file://{tmp_path / 'b'}") as last:
        root = first.import_directory(source)
        sent = first.push(store, root)
        assert sent.blobs_sent > 0
        pulled = last.pull(store, root, ref="from-buildgrid")
        assert pulled.blobs_sent == sent.blobs_total
        last.checkout("from-buildgrid", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")


def test_instance_names_separate_content(buildgrid: BuildGrid, store: Store) -> None:
    data = b"only in the instance called main"
    with open_store(buildgrid.url("main")) as main:
        digest = main.put_bytes(data)
        assert main.read_bytes(digest) == data
        big = main.put_bytes(random_bytes(LARGE_FILE_SIZE, seed=9))
        assert main.find_missing([digest, big]) == set()
    assert store.find_missing([digest, big]) == {digest, big}


def test_refs_are_refused_clearly(store: Store) -> None:
    # BuildGrid offers neither ReferenceStorage nor a Remote Asset server.
    with pytest.raises(UnsupportedOperationError, match="neither BuildStream's ReferenceStorage"):
        store.set_ref("some/ref", EMPTY_DIGEST)
    with pytest.raises(UnsupportedOperationError, match="cannot read refs"):
        store.get_ref("some/ref")
    with pytest.raises(UnsupportedOperationError, match="cannot list refs: REAPI has no such"):
        store.list_refs()

