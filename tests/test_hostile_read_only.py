"""Stores that may only be read: a read-only mount (a tmpfs remounted ``ro``), a store of another
user read by a process without write access to it, and ``casframe serve --read-only``, which
must never write its store at all. Every read works in each case, by ref name as by digest."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from hostile_helpers import (
    OTHER_GID,
    OTHER_UID,
    WITHOUT_PRIVILEGES,
    ServerProcess,
    remount,
    serve_process,
    tmpfs,
)

from casframe import (
    Capability,
    Digest,
    PermissionDeniedError,
    UnsupportedOperationError,
    open_store,
)
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.cli import make_cli
from casframe.readonly import read_only_view
from casframe.server.names import action_ref_name
from casframe.testing import TREE_FILES, assert_tree_equal, write_tree

# Every object and ref gets this time before the store is read, so that any refresh shows.
OLD = 1_000_000_000
ACTION = Digest.of_bytes(b"an action")
CAT_PATH = "src/pkg/module.py"


@dataclass
class Populated:
    path: Path
    source: Path
    tree: Digest
    other: Digest
    result: Digest


def populate(store_path: Path, work: Path) -> Populated:
    """A store with two tree refs and an action result, every time set to :data:`OLD`."""
    source = write_tree(work / "source")
    with open_store(f"file://{store_path}") as store:
        tree = store.import_directory(source, stat_cache=False)
        store.set_ref("build/1", tree)
        (source / "README.txt").write_bytes(b"changed\n")
        other = store.import_directory(source, stat_cache=False)
        store.set_ref("build/2", other)
        result = re_pb2.ActionResult(output_directories=[
            re_pb2.OutputDirectory(path="out", root_directory_digest=tree.to_proto())
        ])
        result_digest = store.put_bytes(result.SerializeToString(deterministic=True))
        store.set_ref(action_ref_name("", ACTION), result_digest, check_complete=False)
    (source / "README.txt").write_bytes(TREE_FILES["README.txt"])
    for folder in ("objects", "refs"):
        for dirpath, _, filenames in os.walk(store_path / folder):
            for name in filenames:
                os.utime(os.path.join(dirpath, name), (OLD, OLD))
    return Populated(store_path, source, tree, other, result_digest)


def snapshot(store_path: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry of the store with its modification time, size and mode."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(store_path):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            seen[os.path.relpath(path, store_path)] = (st.st_mtime_ns, st.st_size, st.st_mode)
    return seen


def read_everything(server: ServerProcess, store: Populated) -> None:
    """Every read call a client makes, each answered in full."""
    got = server.refs.GetReference(bs_pb2.GetReferenceRequest(key="build/1"))
    assert Digest.from_proto(got.digest) == store.tree
    absent = Digest.of_bytes(b"never stored")
    missing = server.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[store.tree.to_proto(), store.other.to_proto(), absent.to_proto()]
    ))
    assert list(missing.missing_blob_digests) == [absent.to_proto()]
    result = server.ac.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=ACTION.to_proto())
    )
    assert result.output_directories[0].root_directory_digest == store.tree.to_proto()
    batch = server.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[store.tree.to_proto()])
    )
    assert Digest.of_bytes(batch.responses[0].data) == store.tree
    pages = list(server.cas.GetTree(re_pb2.GetTreeRequest(root_digest=store.tree.to_proto())))
    assert sum(len(p.directories) for p in pages) > 5
    read = server.bytestream.Read(
        byte_pb2.ReadRequest(resource_name=f"blobs/{store.tree.hash}/{store.tree.size}")
    )
    assert Digest.of_bytes(b"".join(r.data for r in read)) == store.tree
    fetched = server.fetch.FetchDirectory(
        ra_pb2.FetchDirectoryRequest(uris=["casframe:ref/build/2"])
    )
    assert fetched.status.code == 0 and fetched.root_directory_digest == store.other.to_proto()


def refused_writes(server: ServerProcess, store: Populated) -> list[grpc.StatusCode]:
    """The status of each write call a client may try."""
    data = b"a new blob"
    digest = Digest.of_bytes(data)
    calls = (
        lambda: server.refs.UpdateReference(bs_pb2.UpdateReferenceRequest(
            keys=["build/3"], digest=store.tree.to_proto())),
        lambda: server.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=digest.to_proto(), action_result=re_pb2.ActionResult())),
        lambda: server.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)])),
        lambda: server.bytestream.Write(iter([byte_pb2.WriteRequest(
            resource_name=f"uploads/u1/blobs/{digest.hash}/{digest.size}", data=data,
            finish_write=True)])),
        lambda: server.push.PushDirectory(ra_pb2.PushDirectoryRequest(
            uris=["casframe:ref/build/4"], root_directory_digest=store.tree.to_proto())),
    )
    codes = []
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        codes.append(caught.value.code())
    return codes


def cli_reads(store: Populated, dest: Path) -> list[list[str]]:
    return [
        ["ls", "build/1"],
        ["ls", "-r", "build/1"],
        ["cat", "build/1", CAT_PATH],
        ["checkout", "build/1", str(dest)],
        ["ref", "get", "build/1"],
        ["ref", "list"],
        ["diff", "build/1", "build/2"],
        ["get", str(store.tree), "-o", str(dest.parent / "root.bin")],
        ["du"],
        ["fsck"],
    ]


# -- a read-only mount ------------------------------------------------------------------------


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Populated]:
    with tmpfs(tmp_path / "mnt", "64m") as mount:
        store = populate(mount / "store", tmp_path)
        remount(mount, "ro")
        with pytest.raises(OSError) as caught:
            (store.path / "tmp" / "probe").write_bytes(b"")
        assert caught.value.errno == errno.EROFS, "the mount must really be read-only"
        yield store


def test_every_command_reads_a_store_on_a_read_only_mount(
    read_only_mount: Populated, tmp_path: Path
) -> None:
    store = read_only_mount
    before = snapshot(store.path)
    dest = tmp_path / "checkout"
    for args in cli_reads(store, dest):
        result = CliRunner().invoke(make_cli(), ["--store", str(store.path), *args])
        assert result.exit_code == 0, (args, result.stderr)
        if args[0] == "cat":
            assert result.stdout_bytes == TREE_FILES[CAT_PATH]
        if args[:2] == ["ref", "get"]:
            assert result.stdout.strip() == str(store.tree)
    assert_tree_equal(dest, store.source)
    with open_store(f"file://{store.path}") as opened:
        assert opened.find_missing([store.tree, store.other], freshen=True) == set()
    assert snapshot(store.path) == before


@pytest.mark.parametrize("read_only", [True, False], ids=["--read-only", "writable"])
def test_a_server_reads_a_store_on_a_read_only_mount(
    read_only_mount: Populated, read_only: bool
) -> None:
    store = read_only_mount
    options = ("--read-only",) if read_only else ()
    with serve_process(f"file://{store.path}", *options) as server:
        read_everything(server, store)
        if read_only:
            assert refused_writes(server, store) == [grpc.StatusCode.PERMISSION_DENIED] * 5


# -- a read-only server over a store it could write -------------------------------------------


def test_a_read_only_server_never_writes_its_store(tmp_path: Path) -> None:
    store = populate(tmp_path / "store", tmp_path)
    before = snapshot(store.path)
    with serve_process(f"file://{store.path}", "--read-only") as server:
        read_everything(server, store)
        assert refused_writes(server, store) == [grpc.StatusCode.PERMISSION_DENIED] * 5
        read_everything(server, store)
    assert snapshot(store.path) == before, "no access time, no temp file, nothing"


# -- a store of another user ------------------------------------------------------------------


@pytest.fixture
def others_store(tmp_path: Path) -> Populated:
    """A store owned by another user: this test's unprivileged processes may only read it."""
    store = populate(tmp_path / "store", tmp_path)
    for dirpath, dirnames, filenames in os.walk(store.path):
        for name in [*dirnames, *filenames, ""]:
            os.chown(os.path.join(dirpath, name), OTHER_UID, OTHER_GID, follow_symlinks=False)
    return store


def _casframe_without_privileges(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [*WITHOUT_PRIVILEGES, sys.executable, "-c",
               "import sys; from casframe.cli import main; main(sys.argv[1:])", *args]
    return subprocess.run(command, capture_output=True, timeout=120, check=False)


def test_a_user_without_write_access_reads_another_users_store(
    others_store: Populated, tmp_path: Path
) -> None:
    store = others_store
    probe = _casframe_without_privileges("--store", str(store.path), "ref", "set", "x", "build/1")
    assert probe.returncode == 1 and b"Permission denied" in probe.stderr, probe.stderr
    before = snapshot(store.path)
    dest = tmp_path / "checkout"
    for args in cli_reads(store, dest):
        result = _casframe_without_privileges("--store", str(store.path), *args)
        assert result.returncode == 0, (args, result.stderr)
    assert_tree_equal(dest, store.source)
    for options in (("--read-only",), ()):
        with serve_process(
            f"file://{store.path}", *options, prefix=WITHOUT_PRIVILEGES
        ) as server:
            read_everything(server, store)
    assert snapshot(store.path) == before


# -- the read-only view itself ----------------------------------------------------------------


def test_the_read_only_view_passes_reads_and_refuses_every_write(tmp_path: Path) -> None:
    store = populate(tmp_path / "store", tmp_path)
    before = snapshot(store.path)
    with read_only_view(open_store(f"file://{store.path}")) as view:
        assert view.get_ref("build/1") == store.tree
        assert view.find_missing([store.tree], freshen=True) == set()
        assert view.read_bytes(store.result) and view.ls("build/2")
        assert [r.name for r in view.list_refs("build/")] == ["build/1", "build/2"]
        assert not view.has(Capability.TOUCH) and not view.has(Capability.DELETE)
        data = b"refused"
        writes = (
            lambda: view.put_bytes(data),
            lambda: view.put_stream(io.BytesIO(data)),
            lambda: view.put_file(store.source / "README.txt"),
            lambda: view.open_upload(Digest.of_bytes(data)),
            lambda: view.set_ref("build/3", store.tree),
            lambda: view.set_ref("build/3", store.tree, check_complete=False),
            lambda: view.copy_ref("build/1", "build/3"),
            lambda: view.delete_ref("build/1"),
            lambda: view.blobs.touch_blobs([store.tree]),
            lambda: view.blobs.delete_blobs([store.tree]),
            lambda: view.blobs.clean_temp(time.time() + 3600),
            lambda: view.check_writable(),
        )
        for write in writes:
            with pytest.raises(PermissionDeniedError, match="is opened read-only: cannot"):
                write()
        with pytest.raises(UnsupportedOperationError, match="cannot delete blobs"):
            view.prune(grace_period=0)
        assert view.prune(grace_period=0, dry_run=True).objects_freed == 0  # nothing unreachable
    assert snapshot(store.path) == before
