"""Many ``casframe serve`` processes over one S3 bucket are one cache: each claim of
docs/scaling.md on its own, then all of them at once.

Three servers share one bucket on moto's server, as they would on three machines: ``direct``
serves the s3:// store itself, ``near`` and ``far`` each put a cache:// with a directory of their
own in front of it. A fourth machine (this process opening the bucket, or a ``casframe``
command) runs gc, prune and fsck.

Ages are set, never waited for: what must be old is stored while moto's clock is set back two
hours (:func:`stored_long_ago`) and maintenance runs with a grace period of one hour, so old and
new are told apart however long anything takes on a busy machine.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from bazel_helpers import ACTIONS, build, process_summary, write_workspace
from server_processes import ClientStubs, serve_process

from casframe import (
    BlobNotFoundError,
    Digest,
    RefNotFoundError,
    Store,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe.server.names import action_ref_name
from casframe.testing import random_bytes
from casframe.testing.s3 import S3TestBucket
from casframe.tree import missing_in_tree

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("direct", "near", "far")
GRACE = "1h"
# Bazel's (the empty name), the clients' of the test of the whole, and the old content's.
INSTANCES = ("--instance", "", "--instance", "work", "--instance", "seed")
# Hang guard for each client and maintenance command; never what a test asserts.
HANG_GUARD = 300.0


@contextlib.contextmanager
def stored_long_ago(hours: float = 2.0) -> Iterator[None]:
    """Objects stored (or copied onto themselves) on moto's server meanwhile are stamped
    ``hours`` ago: moto's server runs in this process (the ``moto_server`` fixture)."""
    import moto.s3.models as s3_models

    real = s3_models.utcnow
    s3_models.utcnow = lambda: real() - datetime.timedelta(hours=hours)
    try:
        yield
    finally:
        s3_models.utcnow = real


class Stubs(ClientStubs):
    def __init__(self, channel: grpc.Channel) -> None:
        self.attach_stubs(channel)


@dataclass
class Cluster:
    """The bucket and the three servers over it."""

    bucket: S3TestBucket
    #: server name -> ``grpc://127.0.0.1:PORT``
    urls: dict[str, str]
    logs: dict[str, Path]
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def bucket_store(self) -> Store:
        """The bucket opened directly, as the fourth machine opens it."""
        return self.opened(self.bucket.store_url)

    def client(self, server: str) -> Store:
        """A client's store on ``server`` (a grpc:// store, closed with the cluster)."""
        return self.opened(self.urls[server])

    def opened(self, url: str) -> Store:
        """``open_store(url)``, closed with the cluster."""
        return self._stack.enter_context(open_store(url))

    def stubs(self, server: str) -> Stubs:
        channel = grpc.insecure_channel(self.urls[server].removeprefix("grpc://"))
        self._stack.callback(channel.close)
        return Stubs(channel)

    def server_logs(self) -> str:
        return "\n".join(f"--- {name}:\n{path.read_text()[-3000:]}"
                         for name, path in self.logs.items())


@pytest.fixture
def cluster(s3_server_bucket: S3TestBucket, tmp_path: Path) -> Iterator[Cluster]:
    bucket = s3_server_bucket
    remote = bucket.store_url
    remote_shown = f"s3://{bucket.name}/{bucket.prefix}"  # the store's URL, without options
    urls: dict[str, str] = {}
    logs: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        for name in SERVERS:
            if name == "direct":
                url, shown = remote, remote_shown
            else:
                local = tmp_path / f"{name}-cache"
                url = f"cache://?local={quote(str(local), safe='')}&remote={quote(remote, safe='')}"
                shown = f"cache://?local=file://{local}&remote={remote_shown}"
            logs[name] = tmp_path / f"{name}.log"
            log = stack.enter_context(open(logs[name], "w"))
            _, port = stack.enter_context(serve_process(
                url, *INSTANCES, stderr=log, announces=shown))
            urls[name] = f"grpc://127.0.0.1:{port}"
        running = Cluster(bucket, urls, logs)
        with running._stack:
            yield running


def _proto(digest: Digest) -> re_pb2.Digest:
    return digest.to_proto()


def _action_result(output: Digest, note: str) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/result.bin", digest=_proto(output))],
        exit_code=0,
        execution_metadata=re_pb2.ExecutedActionMetadata(worker=note),
    )


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# -- each claim on its own ------------------------------------------------------------------------


def test_what_one_server_stores_every_server_serves(cluster: Cluster) -> None:
    """S3 is strongly consistent and the caches fill from it: a blob stored through any server
    (BatchUpdateBlobs for small ones, ByteStream for large ones) is found and read through
    every server at once, the cached ones included."""
    clients = {name: cluster.client(name) for name in SERVERS}
    for number, (writer, store) in enumerate(clients.items()):
        small_data = f"small blob stored through {writer}".encode()
        large_data = random_bytes(5 << 20, seed=number)  # above a batch: a ByteStream Write
        small = store.put_bytes(small_data)
        large = store.put_bytes(large_data)
        for reader, other in clients.items():
            assert other.find_missing([small, large]) == set(), (writer, reader)
            assert other.read_bytes(small) == small_data, (writer, reader)
            assert other.read_bytes(large) == large_data, (writer, reader)
    assert cluster.bucket_store().find_missing(
        [Digest.of_bytes(f"small blob stored through {w}".encode()) for w in SERVERS]
    ) == set()


def test_refs_and_action_results_are_the_last_written_through_any_server(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Refs and action results live in the bucket alone (a cache:// never keeps them): what was
    set last, through whichever server, is what every server answers at once."""
    clients = {name: cluster.client(name) for name in SERVERS}
    workstation = cluster.opened(f"file://{tmp_path / 'workstation'}")
    first = workstation.import_directory(
        _write_tree(tmp_path / "v1", {"app/main.py": b"print(1)\n", "README": b"v1\n"}))
    second = workstation.import_directory(
        _write_tree(tmp_path / "v2", {"app/main.py": b"print(2)\n", "README": b"v2\n"}))
    workstation.push(clients["near"], first, ref="team/app")
    assert {name: c.get_ref("team/app") for name, c in clients.items()} == dict.fromkeys(
        SERVERS, first)
    workstation.push(clients["far"], second, ref="team/app")
    assert {name: c.get_ref("team/app") for name, c in clients.items()} == dict.fromkeys(
        SERVERS, second)

    stubs = {name: cluster.stubs(name) for name in SERVERS}
    action = clients["direct"].put_bytes(b"an Action message")
    results = []
    for writer in ("direct", "far", "near"):
        output = clients[writer].put_bytes(f"output written through {writer}".encode())
        result = _action_result(output, writer)
        stubs[writer].ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=_proto(action), action_result=result))
        results.append(result)
        for reader in SERVERS:
            got = stubs[reader].ac.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=_proto(action)))
            assert got == result, (writer, reader)
    assert len({r.SerializeToString(deterministic=True) for r in results}) == 3


@pytest.mark.parametrize("server", ["direct", "near"])
def test_prune_elsewhere_spares_an_old_blob_a_client_was_told_is_stored(
    cluster: Cluster, server: str
) -> None:
    """A client asks FindMissingBlobs, is told an old unreferenced blob is stored, and so does
    not send it; a prune of the bucket from another machine runs before the client's
    UpdateActionResult. The answer freshened the blob in the bucket, so the prune keeps it and
    the action result works through every server (a cache:// server asks the bucket, not only
    its local copy)."""
    data = b"the output of a build whose action result gc expired long ago"
    bucket = cluster.bucket_store()
    with stored_long_ago():
        old = bucket.put_bytes(data)
    stubs = cluster.stubs(server)
    found = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[_proto(old)]))
    assert list(found.missing_blob_digests) == []

    report = bucket.prune(grace_period=3600)
    assert (report.objects_freed, report.objects_kept_young) == (0, 1)

    action = Digest.of_bytes(b"the action that produced it again")
    stubs.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=_proto(action), action_result=_action_result(old, server)))
    for reader in SERVERS:
        got = cluster.stubs(reader).ac.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=_proto(action)))
        assert got.output_files[0].digest == _proto(old)
        assert cluster.client(reader).read_bytes(old) == data


def test_a_session_longer_than_the_grace_period_costs_a_cache_miss_not_a_broken_tree(
    cluster: Cluster,
) -> None:
    """A client uploaded an output and a Directory through ``direct`` two hours ago (moto's
    clock set back) and sets what names them only now, after a prune with a grace period of
    one hour removed them. The action result is then a cache miss through every server, and
    the ref is refused, naming the missing blob: nothing points at a broken tree."""
    server = "direct"
    client = cluster.client(server)
    with stored_long_ago():
        output = client.put_bytes(b"uploaded when a long session began")
        directory = client.put_directory(re_pb2.Directory(
            files=[re_pb2.FileNode(name="result.bin", digest=_proto(output))]))
    report = cluster.bucket_store().prune(grace_period=3600)
    assert report.objects_freed == 2

    stubs = cluster.stubs(server)
    action = Digest.of_bytes(b"an action of a long session")
    stubs.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=_proto(action), action_result=_action_result(output, server)))
    for reader in SERVERS:
        with pytest.raises(grpc.RpcError) as missed:
            cluster.stubs(reader).ac.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=_proto(action)))
        assert missed.value.code() == grpc.StatusCode.NOT_FOUND, reader
        assert "names outputs no longer stored" in missed.value.details(), reader

    with pytest.raises(grpc.RpcError) as refused:
        stubs.refs.UpdateReference(bs_pb2.UpdateReferenceRequest(
            keys=["team/long-session"], digest=_proto(directory)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"tree {directory} is incomplete" in refused.value.details()
    with pytest.raises(RefNotFoundError):
        cluster.bucket_store().get_ref("team/long-session")


def test_a_cache_server_repairs_a_session_longer_than_the_grace_period(
    cluster: Cluster,
) -> None:
    """The same long session through ``far``: its local cache still holds what the prune
    removed from the bucket, and sends it back before setting the action result or the ref,
    so both work through every server."""
    client = cluster.client("far")
    with stored_long_ago():
        output = client.put_bytes(b"uploaded through far when a long session began")
        directory = client.put_directory(re_pb2.Directory(
            files=[re_pb2.FileNode(name="result.bin", digest=_proto(output))]))
    bucket = cluster.bucket_store()
    assert bucket.prune(grace_period=3600).objects_freed == 2

    stubs = cluster.stubs("far")
    action = Digest.of_bytes(b"an action of a long session through far")
    stubs.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=_proto(action), action_result=_action_result(output, "far")))
    stubs.refs.UpdateReference(bs_pb2.UpdateReferenceRequest(
        keys=["team/long-session"], digest=_proto(directory)))
    for reader in SERVERS:
        got = cluster.stubs(reader).ac.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=_proto(action)))
        assert got.output_files[0].digest == _proto(output), reader
        assert cluster.client(reader).get_ref("team/long-session") == directory, reader
    assert missing_in_tree(bucket, directory) == set()


def test_a_cache_server_sends_back_what_the_bucket_lost(cluster: Cluster) -> None:
    """``near`` holds a blob in its local cache that the bucket lost (a prune, say). Its
    FindMissingBlobs answers for the bucket: it restores the blob there from its local copy
    before saying "stored", so every other server serves what ``near`` said it has."""
    data = b"kept in near's local cache, gone from the bucket"
    digest = cluster.client("near").put_bytes(data)
    cluster.bucket_store().blobs.delete_blobs([digest])
    assert cluster.client("far").find_missing([digest]) == {digest}

    found = cluster.stubs("near").cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[_proto(digest)]))
    assert list(found.missing_blob_digests) == []
    assert cluster.client("far").read_bytes(digest) == data
    assert cluster.client("direct").read_bytes(digest) == data


# A `casframe` command on a machine whose clock is off by SKEW seconds (argv[1]).
_SKEWED_CASFRAME = """
import runpy, sys, time
skew = float(sys.argv.pop(1))
machine_clock = time.time
time.time = lambda: machine_clock() + skew
sys.argv[0] = "casframe"
runpy.run_module("casframe.cli", run_name="__main__", alter_sys=True)
"""


def _casframe(*args: str, skew: float = 0.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SKEWED_CASFRAME, str(skew), *args],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT,
    )


@pytest.mark.parametrize(("skew", "freed", "kept"), [(2 * 3600.0, 0, 1), (-2 * 3600.0, 1, 0)])
def test_prune_measures_the_grace_period_by_the_buckets_clock(
    s3_server_store: Store, s3_server_bucket: S3TestBucket, skew: float, freed: int, kept: int
) -> None:
    """A prune run on a machine whose clock is two hours ahead of S3's keeps a blob S3 stamped
    a minute ago (grace 1h); on one whose clock is two hours behind, it still removes garbage
    S3 stamped two hours ago."""
    bucket = s3_server_store
    if skew > 0:
        digest = bucket.put_bytes(b"garbage stored just now")
    else:
        with stored_long_ago(hours=2):
            digest = bucket.put_bytes(b"garbage stored two hours ago")
    result = _casframe("--store", s3_server_bucket.store_url, "prune", "--grace", GRACE,
                       "--json", skew=skew)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["objects_freed"], report["objects_kept_young"]) == (freed, kept)
    assert bucket.find_missing([digest]) == ({digest} if freed else set())


def test_the_lifecycle_rule_of_the_docs_is_one_s3_accepts(
    s3_server_bucket: S3TestBucket,
) -> None:
    """docs/scaling.md's lifecycle rule for abandoned multipart uploads, as S3 reads it."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    rule = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    client, name = s3_server_bucket.client, s3_server_bucket.name
    client.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration=rule)
    stored = client.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
    assert [r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for r in stored] == [1]
    assert [r["Filter"]["Prefix"] for r in stored] == ["store/objects/"]


# -- all at once ----------------------------------------------------------------------------------


@dataclass
class Seed:
    """What the bucket held, two hours old, before the clients came."""

    expirable: dict[str, Digest]   # seed/N tree refs and ac/seed/… action results
    release: Digest
    garbage: list[Digest]
    actions: list[Digest]          # the seed action results' action digests


def _seed(bucket: Store, tmp_path: Path) -> Seed:
    with stored_long_ago():
        expirable = {}
        for number in range(6):  # 6 × 256 KiB, far over the quota together
            files = {f"lib/part{k}.bin": random_bytes(64 << 10, seed=100 + 10 * number + k)
                     for k in range(4)}
            root = bucket.import_directory(_write_tree(tmp_path / f"seed{number}", files))
            bucket.set_ref(f"seed/{number}", root)
            expirable[f"seed/{number}"] = root
        release = bucket.import_directory(_write_tree(tmp_path / "release", {
            "bin/tool": random_bytes(32 << 10, seed=200), "NOTES": b"release 1\n"}))
        bucket.set_ref("release/1", release)
        garbage = [bucket.put_bytes(random_bytes(32 << 10, seed=300 + k)) for k in range(4)]
        actions = []
        for number in range(3):
            output = bucket.put_bytes(random_bytes(32 << 10, seed=400 + number))
            result = bucket.put_bytes(
                _action_result(output, "seed").SerializeToString(deterministic=True))
            action = Digest.of_bytes(f"seed action {number}".encode())
            name = action_ref_name("seed", action)
            bucket.set_ref(name, result, check_complete=False)
            expirable[name] = result
            actions.append(action)
    return Seed(expirable, release, garbage, actions)


class Errors:
    """Errors clients saw, by client; the test asserts which ones the docs allow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_client: dict[str, list[str]] = {}
        self.tolerated: list[str] = []

    def run(self, name: str, work: Callable[[], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                with self._lock:
                    self.by_client.setdefault(name, []).append(f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def tolerate(self, what: str) -> None:
        with self._lock:
            self.tolerated.append(what)


def test_three_servers_one_bucket_clients_gc_and_prune_at_once(
    cluster: Cluster, tmp_path: Path, bazel: str
) -> None:
    """Clients spread over the three servers push the same and different trees, set the same
    ref, update and read action results, read old content that gc is expiring, and Bazel
    builds through ``direct``, while a fourth process runs gc with a quota and then prune.
    Afterwards every server answers the same for every ref and action result, each of those
    resolves to a complete tree, fsck of the bucket is clean, the only errors clients saw are
    the NOT_FOUND answers docs/scaling.md lists for content gc expires, and Bazel gets every
    action through ``far`` from what it wrote through ``direct``."""
    bucket = cluster.bucket_store()
    seed = _seed(bucket, tmp_path)
    errors = Errors()
    pushers = [(f"pusher-{server}", server) for server in SERVERS]
    start = threading.Barrier(len(pushers) + len(SERVERS) + 3)
    own_trees: dict[str, Digest] = {}
    shared_files = {f"shared/{k}.txt": f"shared file {k}\n".encode() * 40 for k in range(12)}

    def push(name: str, server: str) -> None:
        client = cluster.client(server)
        with open_store(f"file://{tmp_path / name / 'store'}") as workstation:
            shared = workstation.import_directory(_write_tree(tmp_path / name / "shared",
                                                              shared_files))
            own = workstation.import_directory(_write_tree(tmp_path / name / "own", {
                f"{name}/{k}.txt": f"{name} file {k}\n".encode() * 30 for k in range(8)}))
            own_trees[name] = own
            start.wait(HANG_GUARD)
            workstation.push(client, shared, ref=f"team/shared/{name}")
            workstation.push(client, own, ref=f"team/own/{name}")
            workstation.push(client, own, ref="team/latest")
        # Read back through the next server: the whole tree, at once.
        reader = cluster.client(SERVERS[(SERVERS.index(server) + 1) % 3])
        assert reader.get_ref(f"team/own/{name}") == own
        assert reader.get_ref(f"team/shared/{name}") == shared
        assert missing_in_tree(reader, own) == set()

    shared_action = Digest.of_bytes(b"an action every AC client runs")
    shared_results: list[re_pb2.ActionResult] = []

    def update_actions(name: str, server: str) -> None:
        client = cluster.client(server)
        mine = cluster.stubs(server)
        others = [cluster.stubs(s) for s in SERVERS if s != server]
        start.wait(HANG_GUARD)
        for k in range(2):
            output = client.put_bytes(f"{name} output {k}\n".encode() * 100)
            action = Digest.of_bytes(f"{name} action {k}".encode())
            result = _action_result(output, name)
            mine.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
                instance_name="work", action_digest=_proto(action), action_result=result))
            for other in others:
                got = other.ac.GetActionResult(re_pb2.GetActionResultRequest(
                    instance_name="work", action_digest=_proto(action)))
                assert got == result
                read = other.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                    instance_name="work", digests=[_proto(output)]))
                assert read.responses[0].data == f"{name} output {k}\n".encode() * 100
        result = _action_result(client.put_bytes(f"{name} wrote last".encode()), name)
        shared_results.append(result)
        mine.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            instance_name="work", action_digest=_proto(shared_action), action_result=result))

    def read_old(name: str, server: str) -> None:
        """Old content gc may expire at any moment: found whole, or NOT_FOUND."""
        client = cluster.client(server)
        stubs = cluster.stubs(server)
        start.wait(HANG_GUARD)
        for ref in [r for r in seed.expirable if r.startswith("seed/")]:
            with open_store("memory://") as scratch:
                try:
                    scratch.pull(client, ref)
                except (RefNotFoundError, BlobNotFoundError) as exc:
                    errors.tolerate(f"{name} pull {ref}: {type(exc).__name__}")
        for action in seed.actions:
            try:
                got = stubs.ac.GetActionResult(re_pb2.GetActionResultRequest(
                    instance_name="seed", action_digest=_proto(action)))
                output = Digest.from_proto(got.output_files[0].digest)
                client.read_bytes(output)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                errors.tolerate(f"{name} GetActionResult: NOT_FOUND")
            except BlobNotFoundError:
                errors.tolerate(f"{name} output of a seed action: BlobNotFoundError")

    maintenance: dict[str, Any] = {}

    def maintain() -> None:
        start.wait(HANG_GUARD)
        keep = [arg for pattern in ("release/*", "team/*", "ac/_/*", "ac/work/*")
                for arg in ("--keep", pattern)]
        gc = _casframe("--store", cluster.bucket.store_url, "gc", "--max-size", "1MiB",
                       "--grace", GRACE, *keep, "--json")
        prune = _casframe("--store", cluster.bucket.store_url, "prune", "--grace", GRACE,
                          "--json")
        maintenance.update(gc=gc, prune=prune)

    workspace = write_workspace(tmp_path / "workspace")
    bazel_logs: dict[str, str] = {}

    def bazel_build() -> None:
        start.wait(HANG_GUARD)
        bazel_logs["direct"] = build(bazel, workspace, tmp_path / "bazel-1", cluster.urls["direct"])

    threads = [errors.run(name, lambda n=name, s=server: push(n, s)) for name, server in pushers]
    threads += [errors.run(f"ac-{s}", lambda s=s: update_actions(f"ac-{s}", s)) for s in SERVERS]
    threads += [errors.run("old-reader", lambda: read_old("old-reader", "far"))]
    threads += [errors.run("maintenance", maintain), errors.run("bazel", bazel_build)]
    assert len(threads) == start.parties
    for thread in threads:
        thread.join(2 * HANG_GUARD)
        assert not thread.is_alive(), f"{thread.name} hangs"
    assert errors.by_client == {}, cluster.server_logs()

    # gc expired old refs only (nothing that --keep names), reached its target, and with
    # prune left no old garbage; the release it was told to keep is whole.
    gc, prune = maintenance["gc"], maintenance["prune"]
    assert gc.returncode == 0, gc.stderr
    assert prune.returncode == 0, prune.stderr
    gc_report = json.loads(gc.stdout)
    expired = {ref["name"] for ref in gc_report["refs_deleted"]}
    assert gc_report["reached_target"] and expired, gc_report
    assert expired <= set(seed.expirable), expired
    assert bucket.find_missing(seed.garbage) == set(seed.garbage)
    assert bucket.get_ref("release/1") == seed.release

    # Bazel, from a fresh output base, through a cached server: every action from the cache.
    second = build(bazel, workspace, tmp_path / "bazel-2", cluster.urls["far"])
    assert f"{ACTIONS} remote cache hit" in process_summary(second), process_summary(second)

    # Every server answers the same for every ref and action result.
    refs = bucket.list_refs()
    names = {ref.name for ref in refs}
    assert {f"team/own/{n}" for n, _ in pushers} | {"team/latest", "release/1"} <= names
    assert not (expired & names)
    clients = [cluster.client(s) for s in SERVERS]
    for ref in refs:
        if not ref.name.startswith("ac/"):
            assert {c.get_ref(ref.name) for c in clients} == {ref.digest}, ref.name
            assert missing_in_tree(bucket, ref.digest) == set(), ref.name
    assert bucket.get_ref("team/latest") in set(own_trees.values())
    answers = {
        cluster.stubs(s).ac.GetActionResult(re_pb2.GetActionResultRequest(
            instance_name="work", action_digest=_proto(shared_action)
        )).SerializeToString(deterministic=True)
        for s in SERVERS
    }
    assert len(answers) == 1
    assert answers <= {r.SerializeToString(deterministic=True) for r in shared_results}

    # fsck of the bucket, from the fourth machine: every ref's tree and every action result's
    # outputs are there and sound.
    fsck = _casframe("--store", cluster.bucket.store_url, "fsck", "--json")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    fsck_report = json.loads(fsck.stdout)
    assert fsck_report["ok"] and fsck_report["refs_checked"] == len(refs), fsck_report
