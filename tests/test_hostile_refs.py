"""Hostile clients against refs: the server's namespaces, refs shadowing one another, over-long
names and full disks. Every path in is tried: ``casframe serve`` in its own process over
gRPC, the command line and the Python API."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from casframe_local.blobs import LocalBlobStore
from click.testing import CliRunner, Result
from google.rpc import error_details_pb2, status_pb2
from hostile_helpers import ServerProcess, fill_up, serve_process, tmpfs

import casframe
from casframe import Digest, InvalidNameError, RefConflictError, Store, open_store
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.cli import make_cli
from casframe.config import RemoteEntry
from casframe.names import MAX_REF_SEGMENT_LENGTH
from casframe.remotes import Remotes

FILE = b"an output file"
FILE_DIGEST = Digest.of_bytes(FILE)
TREE = re_pb2.Directory(files=[re_pb2.FileNode(name="out", digest=FILE_DIGEST.to_proto())])
TREE_DATA = TREE.SerializeToString(deterministic=True)
TREE_DIGEST = Digest.of_bytes(TREE_DATA)


def upload_tree(server: ServerProcess) -> None:
    reply = server.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=FILE_DIGEST.to_proto(), data=FILE),
        re_pb2.BatchUpdateBlobsRequest.Request(digest=TREE_DIGEST.to_proto(), data=TREE_DATA),
    ]))
    assert [r.status.code for r in reply.responses] == [0, 0]


def call_error(call: object, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)  # type: ignore[operator]
    return caught.value


def set_key(server: ServerProcess, key: str) -> None:
    server.refs.UpdateReference(
        bs_pb2.UpdateReferenceRequest(keys=[key], digest=TREE_DIGEST.to_proto())
    )


def push_ref(server: ServerProcess, name: str) -> None:
    server.push.PushDirectory(ra_pb2.PushDirectoryRequest(
        uris=[f"casframe:ref/{name}"], root_directory_digest=TREE_DIGEST.to_proto()
    ))


def assert_the_action_cache_and_assets_work(server: ServerProcess, label: str) -> None:
    """What a client that may write did break for everyone: the server's own refs."""
    action = Digest.of_bytes(f"action {label}".encode())
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=FILE_DIGEST.to_proto())]
    )
    server.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action.to_proto(), action_result=result)
    )
    got = server.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
    assert got.output_files[0].digest == FILE_DIGEST.to_proto()
    uri = f"https://example.com/{label}.tar"
    server.push.PushBlob(ra_pb2.PushBlobRequest(uris=[uri], blob_digest=FILE_DIGEST.to_proto()))
    server.push.PushDirectory(
        ra_pb2.PushDirectoryRequest(uris=[uri], root_directory_digest=TREE_DIGEST.to_proto())
    )
    fetched = server.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri]))
    assert fetched.status.code == 0 and fetched.blob_digest == FILE_DIGEST.to_proto()


@pytest.fixture(params=["file", "memory"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    url = f"file://{tmp_path / 'store'}" if request.param == "file" else "memory://"
    with serve_process(url) as running:
        upload_tree(running)
        yield running


# -- the server's namespaces ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ac", "asset", "ac/x", "asset/blob", "asset/directory/k"])
def test_no_client_can_set_a_ref_in_the_server_namespaces(
    server: ServerProcess, name: str
) -> None:
    for attempt in (set_key, push_ref):
        error = call_error(lambda _, a=attempt: a(server, name), None)  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert f"ref name {name!r} is reserved" in (error.details() or "")
    assert_the_action_cache_and_assets_work(server, name.replace("/", "-"))


@pytest.mark.parametrize("name", ["ac", "asset", "ac/release", "asset/x"])
def test_the_command_line_and_the_api_refuse_the_server_namespaces(
    tmp_path: Path, name: str
) -> None:
    store_path = tmp_path / "store"
    build = tmp_path / "build"
    build.mkdir()
    (build / "f").write_bytes(b"built")
    run = CliRunner()
    cli = ["--store", str(store_path)]
    imported = run.invoke(make_cli(), [*cli, "import", str(build), "--ref", "build/1"])
    assert imported.exit_code == 0, imported.stderr
    commands = (
        ["import", str(build), "--ref", name],
        ["ref", "set", name, "build/1"],
        ["ref", "cp", "build/1", name],
        ["push", "build/1", "--to", str(tmp_path / "other"), "--ref", name],
    )
    for args in commands:
        result: Result = run.invoke(make_cli(), [*cli, *args])
        assert result.exit_code == 1, (args, result.stderr)
        assert f"casframe: error: ref name {name!r} is reserved" in result.stderr, args
    with open_store(f"file://{store_path}") as store:
        tree = store.get_ref("build/1")
        with pytest.raises(InvalidNameError, match="is reserved"):
            store.set_ref(name, tree)
        with pytest.raises(InvalidNameError, match="is reserved"):
            store.copy_ref("build/1", name)
        if "/" not in name:  # the bare names are no ref of the server's either
            with pytest.raises(InvalidNameError, match="is reserved"):
                store.set_ref(name, tree, check_complete=False)
        assert [r.name for r in store.list_refs()] == ["build/1"]


@pytest.mark.parametrize("name", ["ac", "asset/blob/k"])
def test_configured_remotes_refuse_the_server_namespaces_before_any_remote(
    tmp_path: Path, name: str
) -> None:
    remote = tmp_path / "remote"
    remotes = Remotes([RemoteEntry("team", f"file://{remote}", push=True)])
    with open_store(f"file://{tmp_path / 'store'}") as store:
        store.put_bytes(FILE)
        store.set_ref("build/1", store.put_bytes(TREE_DATA))
        with pytest.raises(InvalidNameError, match=f"ref name {name!r} is reserved"):
            remotes.push(store, "build/1", ref=name)
        with pytest.raises(InvalidNameError, match=f"ref name {name!r} is reserved"):
            remotes.pull(store, "build/1", ref=name)
    assert not remote.exists(), "no remote was contacted"


# -- refs shadowing one another ---------------------------------------------------------------


def _conflict(error: grpc.RpcError) -> dict[str, str]:
    """The names the ErrorInfo of a FAILED_PRECONDITION status carries."""
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for packed in status.details:
                info = error_details_pb2.ErrorInfo()
                if packed.Unpack(info):
                    assert (info.domain, info.reason) == ("casframe", "REF_CONFLICT")
                    return dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {error}")


@pytest.mark.parametrize(
    ("first", "second"), [("team/a", "team/a/b"), ("team/a/b", "team/a")], ids=repr
)
def test_a_ref_that_shadows_another_is_refused_naming_both(
    server: ServerProcess, first: str, second: str
) -> None:
    set_key(server, first)
    for attempt in (set_key, push_ref):
        error = call_error(lambda _, a=attempt: a(server, second), None)  # type: ignore[misc]
        assert _conflict(error) == {"ref": second, "existing": first}
        details = error.details() or ""
        assert f"ref {second!r} conflicts with an existing ref" in details
        assert repr(first) in details
        assert "file://" not in details and "memory://" not in details
    got = server.refs.GetReference(bs_pb2.GetReferenceRequest(key=first))
    assert got.digest == TREE_DIGEST.to_proto()
    error = call_error(server.refs.GetReference, bs_pb2.GetReferenceRequest(key=second))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_the_grpc_client_gets_a_typed_conflict(server: ServerProcess) -> None:
    set_key(server, "team/a/b")
    with open_store(f"grpc://{server.address}") as remote:
        with pytest.raises(RefConflictError) as caught:
            remote.set_ref("team/a", TREE_DIGEST)
    assert (caught.value.name, caught.value.existing) == ("team/a", "team/a/b")


# -- over-long names --------------------------------------------------------------------------


def test_a_ref_name_segment_over_255_bytes_is_refused_everywhere(tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    long_segment = "x" * (MAX_REF_SEGMENT_LENGTH + 1)
    multibyte = "é" * 128  # 128 characters, 256 bytes
    with serve_process(f"file://{store_path}") as server:
        upload_tree(server)
        for name in (long_segment, f"team/{long_segment}/x", f"team/{multibyte}"):
            for attempt in (set_key, push_ref):
                error = call_error(lambda _, a=attempt, n=name: a(server, n), None)  # type: ignore[misc]
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                assert "bytes long, over the limit of 255" in (error.details() or "")
            error = call_error(server.refs.GetReference, bs_pb2.GetReferenceRequest(key=name))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        at_the_limit = "team/" + "é" * 127  # 254 bytes: a valid name
        set_key(server, at_the_limit)
        push_ref(server, "y" * MAX_REF_SEGMENT_LENGTH)
    assert os.listdir(store_path / "tmp") == [], "a refused name leaves no temp file"

    result = CliRunner().invoke(
        make_cli(), ["--store", str(store_path), "ref", "set", long_segment, str(TREE_DIGEST)]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("casframe: error: invalid ref name 'xxxx")
    assert "is 256 bytes long, over the limit of 255" in result.stderr
    with open_store(f"file://{store_path}") as store:
        with pytest.raises(InvalidNameError, match="over the limit of 255"):
            store.set_ref(long_segment, TREE_DIGEST, check_complete=False)
        assert store.get_ref(at_the_limit) == TREE_DIGEST
    assert os.listdir(store_path / "tmp") == []


# -- full disks -------------------------------------------------------------------------------


def _no_temp_left(store_path: Path) -> None:
    assert os.listdir(store_path / "tmp") == [], "a failed write left a temp file"


@pytest.mark.parametrize("temp_files", ["unnamed", "named"])
def test_no_failed_write_on_a_full_disk_leaves_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temp_files: str
) -> None:
    if temp_files == "named":  # as on a file system without O_TMPFILE (NFS, many FUSE ones)
        monkeypatch.setattr(LocalBlobStore, "_probe_anonymous_temp", lambda self: False)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        store_path = disk / "store"
        with open_store(f"file://{store_path}") as store:
            store.put_bytes(FILE)
            store.put_bytes(TREE_DATA)
            store.set_ref("kept", TREE_DIGEST)
            fill_up(disk)

            for write in (
                lambda: store.set_ref("new/ref", TREE_DIGEST),
                lambda: store.set_ref("kept", TREE_DIGEST),  # replacing needs room too
                lambda: store.put_bytes(os.urandom(64 << 10)),
                lambda: store.put_many([(Digest.of_bytes(b := os.urandom(8192)), b)]),
                lambda: store.import_directory(_tree_of(tmp_path / "build"), stat_cache=False),
            ):
                with pytest.raises(OSError) as caught:
                    write()
                assert caught.value.errno == errno.ENOSPC, caught.value
                _no_temp_left(store_path)
            assert store.get_ref("kept") == TREE_DIGEST, "a failed replace keeps the old ref"

        with serve_process(f"file://{store_path}") as server:
            for attempt in (
                lambda: set_key(server, "over/grpc"),
                lambda: push_ref(server, "over/asset"),
                lambda: _write_stream(server, os.urandom(3 << 20)),
            ):
                with pytest.raises(grpc.RpcError) as failed:
                    attempt()
                assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value
                _no_temp_left(store_path)
            data = os.urandom(256 << 10)
            reply = server.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=Digest.of_bytes(data).to_proto(), data=data)
            ]))
            assert reply.responses[0].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            _no_temp_left(store_path)


def _write_stream(server: ServerProcess, data: bytes) -> None:
    digest = Digest.of_bytes(data)
    name = f"uploads/full-disk/blobs/{digest.hash}/{digest.size}"
    chunks = [data[start : start + (1 << 20)] for start in range(0, len(data), 1 << 20)]
    server.bytestream.Write(iter(
        byte_pb2.WriteRequest(resource_name=name, write_offset=index << 20, data=chunk,
                              finish_write=index == len(chunks) - 1)
        for index, chunk in enumerate(chunks)
    ))


def _tree_of(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "big").write_bytes(os.urandom(256 << 10))
    return folder


def test_a_file_store_names_the_conflicting_ref_and_clears_empty_folders(
    local_store: Store,
) -> None:
    """The file system itself refuses ``a/b`` under a ref file ``a/b/c``: the error still
    names both; and a folder left empty (by a writer killed between making it and renaming
    its ref into it) is no ref, so it stands in nobody's way."""
    tree = local_store.put_directory(re_pb2.Directory())
    local_store.set_ref("a/b/c", tree)
    with pytest.raises(casframe.RefConflictError, match=r"'a/b/c' is under 'a/b/'"):
        local_store.refs.set_ref("a/b", tree)  # past the core's check: raced by another writer
    refdir = Path(local_store.refs.root) / "refs" / "heads"  # type: ignore[attr-defined]
    (refdir / "left" / "empty" / "folders").mkdir(parents=True)
    local_store.set_ref("left", tree)
    local_store.delete_ref("a/b/c")
    local_store.set_ref("a", tree)
    assert sorted(r.name for r in local_store.list_refs()) == ["a", "left"]
    assert os.listdir(refdir.parent.parent / "tmp") == []


@pytest.mark.parametrize("scheme", ["file", "memory", "sqlite"])
def test_two_writers_racing_never_leave_a_ref_and_one_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """The core's check and the backend's set are two steps; the backend closes the gap.

    Each round, both writers pass the core's check before either sets its ref (they wait for
    each other right after it), which is the worst interleaving, made certain.
    """
    url = {"file": f"file://{tmp_path / 'store'}", "memory": "memory://",
           "sqlite": f"sqlite://{tmp_path / 'refs.db'}"}[scheme]
    with open_store(url) as store:
        tree = store.put_directory(re_pb2.Directory())
        check = store.refs.conflicting_ref
        for round_ in range(20):
            names = (f"r{round_}/a", f"r{round_}/a/b")
            both_checked = threading.Barrier(2)
            waiting = [2]  # the core's two checks wait; a backend's own later ones do not
            lock = threading.Lock()

            def check_then_wait(name: str, barrier: threading.Barrier = both_checked,
                                left: list[int] = waiting, guard: threading.Lock = lock
                                ) -> str | None:
                found = check(name)
                with guard:
                    wait = left[0] > 0
                    left[0] -= 1
                if wait:
                    barrier.wait(timeout=60)
                return found

            monkeypatch.setattr(store.refs, "conflicting_ref", check_then_wait)
            failures: list[BaseException] = []

            def set_one(name: str, errors: list[BaseException] = failures) -> None:
                try:
                    store.set_ref(name, tree)
                except (RefConflictError, OSError) as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=set_one, args=(n,)) for n in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert [type(f) for f in failures] == [RefConflictError], failures
            assert sum(store.has_ref(n) for n in names) == 1, f"both {names} were set"
