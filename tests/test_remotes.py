"""Several remotes per project: configuration, pull from the first that has a tree, push to
every push remote, read-only and unreachable remotes, concurrent checks with time-outs.

Remotes are real stores: ``file://`` directories, casframe gRPC servers started in this process
on free loopback ports (one stopped again, so that its port is dead; one read-only; one with
mutual TLS), S3 on in-process moto with IAM enforced, and "black holes" (loopback sockets that
accept connections and never answer) for time-outs.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_server_tls import Pki, pki  # noqa: F401 - one test PKI for the TLS remote

import casframe
from casframe import (
    BlobWriter,
    ConfigError,
    Digest,
    RefNotFoundError,
    Store,
    StoreURL,
    hookimpl,
    layout,
    open_store,
)
from casframe.cli import make_cli
from casframe.config import (
    DEFAULT_REMOTE_TIMEOUT,
    PROJECT_FILE,
    RemoteEntry,
    configured_remotes,
    find_project_file,
    load_config,
)
from casframe.remotes import RemoteOutcome, Remotes, RemotesError, RemoteStatus
from casframe.server import Server
from casframe.testing import assert_tree_equal
from casframe.testing.s3 import S3TestBucket

REF = "app/build-1"


@pytest.fixture(autouse=True)
def isolated_env(isolated_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's user directories inside tmp_path, with the user's store in tmp_path/local and
    the working directory tmp_path/work."""
    monkeypatch.setenv("CASFRAME_STORE", str(tmp_path / "local"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")


@pytest.fixture
def local(tmp_path: Path, make_tree: Callable[..., Path]) -> Iterator[Store]:
    """The user's store, holding a realistic tree under REF."""
    with open_store(f"file://{tmp_path / 'local'}") as store:
        store.set_ref(REF, store.import_directory(make_tree("build")))
        yield store


def file_remote(tmp_path: Path, name: str, **settings: Any) -> RemoteEntry:
    return RemoteEntry(name, f"file://{tmp_path / name}", **settings)


def open_remote(entry: RemoteEntry) -> Store:
    return open_store(entry.url, entry.options)


class Servers:
    """casframe gRPC servers over ``file://`` backing stores, stopped when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._running: list[tuple[Server, Store]] = []
        self._dead: list[socket.socket] = []

    def start(self, name: str, **options: Any) -> tuple[Server, Store]:
        backing = open_store(f"file://{self._tmp_path / ('served-' + name)}")
        server = Server(backing, listen="127.0.0.1:0", use_plugins=False, **options)
        server.start()
        self._running.append((server, backing))
        return server, backing

    def stopped_url(self) -> str:
        """The URL of a server that is down: its port refuses connections.

        The port stays bound (never listening) until the test ends, so that no other
        process can take it meanwhile and answer in the dead server's place.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._dead.append(sock)
        return f"grpc://127.0.0.1:{sock.getsockname()[1]}"

    def close(self) -> None:
        for sock in self._dead:
            sock.close()
        for server, backing in self._running:
            server.stop(grace=None)
            backing.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def black_holes() -> Iterator[Callable[[], str]]:
    """``grpc://`` URLs of loopback sockets that accept connections and never say a word."""
    sockets: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes handshakes; nobody ever accepts or answers
        sockets.append(sock)
        return f"grpc://127.0.0.1:{sock.getsockname()[1]}"

    try:
        yield make
    finally:
        for sock in sockets:
            sock.close()


def statuses(outcomes: tuple[RemoteOutcome, ...]) -> list[tuple[str, str]]:
    return [(o.name, str(o.status)) for o in outcomes]


# -- the scenario: two file:// remotes and a stopped gRPC server ---------------------------


def test_pull_finds_the_ref_in_the_second_remote_and_push_survives_a_dead_one(
    tmp_path: Path, local: Store, servers: Servers, make_tree: Callable[..., Path]
) -> None:
    ci = file_remote(tmp_path, "ci", push=True)
    team = file_remote(tmp_path, "team", push=True)
    mirror = RemoteEntry("mirror", servers.stopped_url(), push=True, timeout=5)
    with open_remote(team) as store:
        local.push(store, REF)
    remotes = Remotes([ci, team, mirror])

    with open_store(f"file://{tmp_path / 'laptop'}") as laptop:
        pulled = remotes.pull(laptop, REF)
        # ci lacks the ref: skipped, not an error; team has it; mirror is never needed.
        assert statuses(pulled.outcomes) == [("ci", "missing"), ("team", "pulled")]
        assert pulled.outcomes[0].message == f"does not have the ref {REF}"
        assert pulled.ok and pulled.root == local.get_ref(REF) and pulled.ref == REF
        assert laptop.get_ref(REF) == local.get_ref(REF)
        laptop.checkout(REF, tmp_path / "out")
        assert_tree_equal(tmp_path / "build", tmp_path / "out")
        sent = pulled.outcomes[1].transfer
        assert sent is not None and sent.blobs_sent == sent.blobs_total > 0

        # A second build, pushed from the laptop: both live push remotes get it, mirror is
        # reported once with grpc's reason, and the push as a whole failed.
        second = make_tree("build2")
        (second / "VERSION").write_text("2\n")
        laptop.set_ref("app/build-2", laptop.import_directory(second))
        pushed = remotes.push(laptop, "app/build-2", check=False)
    assert statuses(pushed.outcomes) == [
        ("ci", "pushed"), ("team", "pushed"), ("mirror", "unreachable"),
    ]
    dead = pushed.outcomes[2]
    assert dead.message.startswith(f"cannot reach {mirror.url}") and dead.error == "unavailable"
    assert not pushed.ok
    for entry in (ci, team):
        with open_remote(entry) as store:
            assert store.get_ref("app/build-2") == pushed.root
    with pytest.raises(RemotesError, match=r"pushed app/build-2 to 2 of 3 push remotes "
                                           r"\(mirror unreachable\)") as caught:
        pushed.raise_for_failure()
    assert caught.value.report is pushed and caught.value.temporary


def test_push_and_pull_through_a_grpc_server_and_a_read_only_one(
    tmp_path: Path, local: Store, servers: Servers
) -> None:
    live, live_backing = servers.start("live")
    frozen, frozen_backing = servers.start("frozen", read_only=True)
    remotes = Remotes([
        RemoteEntry("cache", f"grpc://127.0.0.1:{live.port}", push=True),
        RemoteEntry("archive", f"grpc://127.0.0.1:{frozen.port}", push=True),
        file_remote(tmp_path, "ci", push=True),
    ])
    report = remotes.push(local, REF, check=False)
    assert statuses(report.outcomes) == [
        ("cache", "pushed"), ("archive", "read-only"), ("ci", "pushed"),
    ]
    refused = report.outcomes[1]
    assert refused.message == (
        f"grpc://127.0.0.1:{frozen.port} refuses writes: its ReferenceStorage status does not "
        "allow updates"
    )
    assert refused.error == "permission-denied" and refused.transfer is None
    # Nothing was attempted on the read-only server: its store is as empty as it was.
    assert list(frozen_backing.blobs.iter_blobs()) == []
    assert frozen_backing.list_refs() == []
    assert live_backing.get_ref(REF) == local.get_ref(REF)
    with pytest.raises(RemotesError, match=r"\(archive read-only\)"):
        report.raise_for_failure()

    # The gRPC remote serves a pull like any other.
    with open_store(f"file://{tmp_path / 'elsewhere'}") as elsewhere:
        pulled = Remotes([RemoteEntry("cache", f"grpc://127.0.0.1:{live.port}")]).pull(
            elsewhere, REF
        )
        assert statuses(pulled.outcomes) == [("cache", "pulled")]
        assert elsewhere.get_ref(REF) == local.get_ref(REF)


def test_read_only_server_without_reference_storage_is_found_by_the_blob_probe(
    local: Store, servers: Servers
) -> None:
    """Over the Remote Asset API there is no status to ask: the empty-blob upload is refused."""
    frozen, frozen_backing = servers.start("frozen", read_only=True)
    url = f"grpc://127.0.0.1:{frozen.port}"
    report = Remotes([RemoteEntry("archive", f"{url}?ref_protocol=asset", push=True)]).push(
        local, REF, check=False
    )
    outcome = report.outcomes[0]
    assert outcome.status is RemoteStatus.READ_ONLY
    assert outcome.message == (
        f"{url} refused BatchUpdateBlobs (PERMISSION_DENIED): this server is read-only"
    )
    assert list(frozen_backing.blobs.iter_blobs()) == []


def test_a_misconfigured_remote_fails_alone(tmp_path: Path, local: Store) -> None:
    report = Remotes([
        RemoteEntry("typo", "grpc://127.0.0.1:1", push=True, options={"timeuot": 3}),
        RemoteEntry("odd", "nope://x", push=True),
        file_remote(tmp_path, "ci", push=True),
    ]).push(local, REF, check=False)
    assert statuses(report.outcomes) == [("typo", "failed"), ("odd", "failed"), ("ci", "pushed")]
    assert report.outcomes[0].message.startswith("unknown option(s) timeuot for grpc://")
    assert report.outcomes[0].error == "config"
    assert report.outcomes[1].error == "unknown-scheme"


def test_pushing_again_sends_no_blob(tmp_path: Path, local: Store, servers: Servers) -> None:
    server, _ = servers.start("cache")
    remotes = Remotes([
        RemoteEntry("cache", f"grpc://127.0.0.1:{server.port}", push=True),
        file_remote(tmp_path, "ci", push=True),
    ])
    first = remotes.push(local, REF)
    assert [o.status for o in first.outcomes] == [RemoteStatus.PUSHED] * 2
    assert all(o.ref_set and o.transfer and o.transfer.blobs_sent for o in first.outcomes)

    again = remotes.push(local, REF)
    assert [o.status for o in again.outcomes] == [RemoteStatus.UP_TO_DATE] * 2
    for outcome in again.outcomes:
        assert outcome.transfer is not None
        assert (outcome.transfer.blobs_sent, outcome.transfer.bytes_sent) == (0, 0)
        assert outcome.ref == REF and not outcome.ref_set  # the ref already pointed there
    assert again.ok


def test_a_moved_ref_is_set_even_when_every_blob_is_there(tmp_path: Path, local: Store) -> None:
    ci = file_remote(tmp_path, "ci", push=True)
    remotes = Remotes([ci])
    remotes.push(local, REF)
    other = tmp_path / "other"
    other.mkdir()
    (other / "note.txt").write_text("another build\n")
    with open_remote(ci) as store:
        store.set_ref(REF, store.import_directory(other))
    report = remotes.push(local, REF)
    outcome = report.outcomes[0]
    assert outcome.status is RemoteStatus.PUSHED and outcome.ref_set
    assert outcome.transfer is not None and outcome.transfer.blobs_sent == 0
    with open_remote(ci) as store:
        assert store.get_ref(REF) == local.get_ref(REF)


# -- pull: order, digests, failures ----------------------------------------------------------------


def test_pull_moves_on_when_a_remote_holds_an_incomplete_tree(
    tmp_path: Path, local: Store
) -> None:
    broken, good = file_remote(tmp_path, "broken"), file_remote(tmp_path, "good")
    for entry in (broken, good):
        with open_remote(entry) as store:
            local.push(store, REF)
    largest = max(local.tree_digests(REF), key=lambda d: d.size)
    (tmp_path / "broken" / layout.object_key(largest)).unlink()

    with open_store(f"file://{tmp_path / 'laptop'}") as laptop:
        report = Remotes([broken, good]).pull(laptop, REF)
        assert statuses(report.outcomes) == [("broken", "failed"), ("good", "pulled")]
        assert report.outcomes[0].error == "blob-not-found"
        assert str(largest) in report.outcomes[0].message
        assert laptop.get_ref(REF) == local.get_ref(REF)


def test_pull_by_digest_and_into_another_ref(tmp_path: Path, local: Store) -> None:
    root = local.get_ref(REF)
    empty, full = file_remote(tmp_path, "empty"), file_remote(tmp_path, "full")
    with open_remote(full) as store:
        local.push(store, root)  # the tree only, no ref
    with open_store(f"file://{tmp_path / 'laptop'}") as laptop:
        report = Remotes([empty, full]).pull(laptop, str(root), ref="mine")
        assert statuses(report.outcomes) == [("empty", "missing"), ("full", "pulled")]
        assert report.outcomes[0].message == "does not have the tree"
        assert report.outcomes[0].error == "blob-not-found"
        assert laptop.get_ref("mine") == root
        # Pulling again finds everything here already: nothing is copied.
        again = Remotes([full]).pull(laptop, root)
        assert again.outcomes[0].transfer is not None
        assert again.outcomes[0].transfer.blobs_sent == 0 and again.ref is None


def test_pull_that_finds_nothing_raises_with_every_outcome(
    tmp_path: Path, servers: Servers
) -> None:
    remotes = Remotes([
        file_remote(tmp_path, "ci"),
        RemoteEntry("mirror", servers.stopped_url()),
    ])
    with open_store("memory://") as store:
        with pytest.raises(RemotesError) as caught:
            remotes.pull(store, REF)
        assert str(caught.value) == (
            f"could not pull {REF} from any remote (ci missing; mirror unreachable)"
        )
        assert not caught.value.temporary  # ci answered: retrying will not help
        assert statuses(caught.value.report.outcomes) == [
            ("ci", "missing"), ("mirror", "unreachable"),
        ]
        with pytest.raises(RefNotFoundError):
            store.get_ref(REF)


def test_remotes_are_chosen_by_their_pull_and_push_settings(
    tmp_path: Path, local: Store
) -> None:
    pull_only = file_remote(tmp_path, "pull-only")
    push_only = file_remote(tmp_path, "push-only", push=True, pull=False)
    remotes = Remotes([pull_only, push_only])
    assert statuses(remotes.push(local, REF).outcomes) == [("push-only", "pushed")]
    with open_store("memory://") as store:
        with pytest.raises(RemotesError, match=r"\(pull-only missing\)"):
            remotes.pull(store, REF)
    with pytest.raises(ConfigError, match="no remote to push to: none with push = true in"):
        Remotes([pull_only]).push(local, REF)
    with pytest.raises(ConfigError, match="no remote to pull from"):
        Remotes([push_only]).pull(local, REF)
    # Named explicitly, a remote that cannot serve the operation is an error, not left out.
    with pytest.raises(ConfigError, match=r"remote 'pull-only' is not a push remote "
                                          r"\(push = true is not set in the list given\)"):
        remotes.select(["push-only", "pull-only"]).push(local, REF)
    with pytest.raises(ConfigError, match=r"remote 'push-only' is not a pull remote "
                                          r"\(pull = false in "):
        remotes.select(["push-only"]).pull(local, REF)


def test_a_missing_local_ref_fails_before_any_remote_is_opened(
    tmp_path: Path, local: Store
) -> None:
    with pytest.raises(RefNotFoundError, match="nope"):
        Remotes([file_remote(tmp_path, "ci", push=True)]).push(local, "nope")
    assert not (tmp_path / "ci").exists()


# -- concurrency and time-outs ---------------------------------------------------------------------


def test_unanswered_remotes_cost_one_time_out_not_one_each(
    tmp_path: Path, local: Store, black_holes: Callable[[], str]
) -> None:
    timeout = 2.0
    dead = [RemoteEntry(f"hole{i}", black_holes(), push=True) for i in range(5)]
    remotes = Remotes([*dead, file_remote(tmp_path, "ci", push=True)])
    started = time.monotonic()
    report = remotes.push(local, REF, timeout=timeout, check=False)
    elapsed = time.monotonic() - started
    # Checked one after the other, five black holes would take at least 5 time-outs, and
    # two at a time 3; the rest of the bound is for the push to "ci" on a busy machine.
    assert timeout <= elapsed < 3 * timeout, elapsed
    assert statuses(report.outcomes) == [
        *((entry.name, "unreachable") for entry in dead), ("ci", "pushed"),
    ]
    assert {o.message for o in report.outcomes[:5]} == {"no answer within 2 s"}
    assert {o.error for o in report.outcomes[:5]} == {"unavailable"}


def test_each_remote_has_its_own_time_out(
    tmp_path: Path, local: Store, black_holes: Callable[[], str]
) -> None:
    ci = file_remote(tmp_path, "ci")
    with open_remote(ci) as store:
        local.push(store, REF)
    remotes = Remotes([
        RemoteEntry("slow", black_holes(), timeout=0.5),
        RemoteEntry("slower", black_holes(), timeout=1.5),
        ci,
    ])
    with open_store("memory://") as laptop:
        started = time.monotonic()
        report = remotes.pull(laptop, REF)
        elapsed = time.monotonic() - started
    # Not the default time-out of 10 s either (the rest is for the pull from "ci").
    assert 1.5 <= elapsed < 6.0, elapsed
    assert [o.message for o in report.outcomes[:2]] == [
        "no answer within 0.5 s", "no answer within 1.5 s",
    ]
    assert report.outcomes[2].status is RemoteStatus.PULLED


# -- writability on the backend contract -----------------------------------------------------------


def test_s3_without_write_permission_is_read_only(
    s3_mock: S3TestBucket, local: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto enforces IAM here: a user allowed to read the bucket but not to write to it."""
    import boto3
    from moto.core import set_initial_no_auth_action_count

    iam = boto3.client("iam", region_name="us-east-1")
    bucket = f"arn:aws:s3:::{s3_mock.name}"
    reader_policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            # moto checks s3:HeadBucket where AWS checks s3:ListBucket; allow both.
            "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket"],
            "Resource": [bucket, f"{bucket}/*"],
        }],
    }

    def as_reader() -> None:
        iam.create_user(UserName="reader")
        policy = iam.create_policy(PolicyName="read", PolicyDocument=json.dumps(reader_policy))
        iam.attach_user_policy(UserName="reader", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        # From here on every request is checked against the caller's IAM policies.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        report = Remotes([RemoteEntry("bucket", s3_mock.store_url, push=True)]).push(
            local, REF, check=False
        )
        outcome = report.outcomes[0]
        assert outcome.status is RemoteStatus.READ_ONLY, outcome
        assert "access denied to store an object" in outcome.message
        assert outcome.error == "permission-denied"

    set_initial_no_auth_action_count(4)(as_reader)()  # the four IAM calls above go unchecked
    assert s3_mock.keys() == []


def test_s3_with_write_permission_is_pushed_to(s3_mock: S3TestBucket, local: Store) -> None:
    report = Remotes([RemoteEntry("bucket", s3_mock.store_url, push=True)]).push(local, REF)
    assert statuses(report.outcomes) == [("bucket", "pushed")]
    assert f"store/refs/heads/{REF}" in s3_mock.keys()


class _ReadOnlyDirectoryPlugin:
    """A third-party backend whose writers fail as a read-only directory makes them fail."""

    @hookimpl
    def casframe_register_backends(self, registry: casframe.BackendRegistry) -> None:
        registry.add("rodir", self.open)

    @staticmethod
    def open(url: StoreURL) -> Store:
        from casframe_memory.store import MemoryBlobStore, MemoryRefStore

        class Blobs(MemoryBlobStore):
            def begin_write(self, size_hint: int | None = None) -> BlobWriter:
                raise OSError(errno.EROFS, "Read-only file system", url.url)

        return Store(Blobs(), MemoryRefStore(), url=url.url)


def test_the_default_writability_check_serves_third_party_backends(
    tmp_path: Path, local: Store
) -> None:
    with casframe.registered_plugin(_ReadOnlyDirectoryPlugin(), "rodir-plugin"):
        report = Remotes([
            RemoteEntry("ro", "rodir://x", push=True), file_remote(tmp_path, "ci", push=True),
        ]).push(local, REF, check=False)
    assert statuses(report.outcomes) == [("ro", "read-only"), ("ci", "pushed")]
    assert report.outcomes[0].message == "memory:// refuses writes: Read-only file system"


# -- configuration ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_remote_tables_are_parsed(tmp_path: Path) -> None:
    path = write(tmp_path / "conf" / "config.toml", """
[remotes.team]
url = "grpcs://cache.example.com/main"
timeout = 2.5
server_cert = "certs/ca.pem"
client_key = "~/me.key"
client_cert = "/etc/me.crt"
[remotes.team.options]
max_concurrency = 4

[remotes.ci]
url = "../ci-store"
push = true
pull = false
""")
    remotes = load_config(path).remotes
    assert list(remotes) == ["team", "ci"]
    team, ci = remotes["team"], remotes["ci"]
    assert (team.push, team.pull, team.timeout) == (False, True, 2.5)
    assert team.options == {
        "max_concurrency": 4,
        "server_cert": str(tmp_path / "conf" / "certs" / "ca.pem"),
        "client_key": str(tmp_path / "home" / "me.key"),
        "client_cert": "/etc/me.crt",
    }
    assert ci.url == f"file://{tmp_path / 'ci-store'}"
    assert (ci.push, ci.pull, ci.timeout) == (True, False, DEFAULT_REMOTE_TIMEOUT)
    assert ci.source == str(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("remotes = 1", "'remotes' must be a table of [remotes.NAME] tables"),
        ('[remotes."a b"]\nurl = "memory://"', "invalid remote name 'a b'"),
        ("[remotes]\nci = 'memory://'", "[remotes.ci] must be a table with a 'url'"),
        ("[remotes.ci]\npush = true", "[remotes.ci]: 'url' must be a non-empty string"),
        ('[remotes.ci]\nurl = "memory://"\npush = "yes"', "'push' must be true or false"),
        ('[remotes.ci]\nurl = "memory://"\npull = 1', "'pull' must be true or false"),
        ('[remotes.ci]\nurl = "memory://"\ntimeout = 0', "'timeout' must be a positive number"),
        ('[remotes.ci]\nurl = "memory://"\ntimeout = "5"', "'timeout' must be a positive"),
        ('[remotes.ci]\nurl = "memory://"\nfetch = true', "unknown key 'fetch'"),
        ('[remotes.ci]\nurl = "memory://"\nserver_cert = 3', "'server_cert' must be a file path"),
        (
            '[remotes.ci]\nurl = "memory://"\nclient_key = "k"\n[remotes.ci.options]\n'
            'client_key = "k"',
            "'client_key' is given twice",
        ),
        ('[remotes.ci]\nurl = "memory://"\noptions = {a = [1]}', "'a' must be a string"),
    ],
)
def test_malformed_remotes_name_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in str(caught.value)


def test_project_file_is_found_upwards_and_follows_the_users_remotes(tmp_path: Path) -> None:
    project = tmp_path / "project"
    write(project / PROJECT_FILE, """
[remotes.team]
url = "file:///srv/team"
[remotes.shared]
url = "cache"
server_cert = "ca.pem"
""")
    deep = project / "src" / "pkg"
    deep.mkdir(parents=True)
    assert find_project_file(deep) == str(project / PROJECT_FILE)
    assert find_project_file(tmp_path) is None

    user = load_config(write(tmp_path / "user.toml", """
[remotes.mine]
url = "memory://"
[remotes.team]
url = "file:///mnt/team-mirror"
push = true
"""))
    remotes = configured_remotes(user, project_dir=deep)
    # The user's remotes first; the user's "team" replaces the project's.
    assert [(r.name, r.url) for r in remotes] == [
        ("mine", "memory://"),
        ("team", "file:///mnt/team-mirror"),
        ("shared", f"file://{project / 'cache'}"),
    ]
    assert remotes[2].options == {"server_cert": str(project / "ca.pem")}
    assert remotes[2].source == str(project / PROJECT_FILE)
    found = Remotes.from_config(user, project_dir=deep)
    assert [r.name for r in found] == ["mine", "team", "shared"]
    assert found.where == f"{tmp_path / 'user.toml'} and {project / PROJECT_FILE}"


def test_project_file_holds_only_remotes(tmp_path: Path) -> None:
    write(tmp_path / PROJECT_FILE, 'default_store = "memory://"\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'default_store' \(a project file "
                                          r"holds only \[remotes.NAME\] tables\)"):
        configured_remotes(load_config(write(tmp_path / "u.toml", "")), project_dir=tmp_path)


def test_select_and_duplicate_names(tmp_path: Path) -> None:
    a, b = file_remote(tmp_path, "a"), file_remote(tmp_path, "b")
    assert [r.name for r in Remotes([a, b]).select(["b", "a"])] == ["b", "a"]
    with pytest.raises(ConfigError, match=r"unknown remote 'c': .* \(defined: a, b\)"):
        Remotes([a, b]).select(["c"])
    with pytest.raises(ConfigError, match="remote 'a' is defined twice"):
        Remotes([a, a])


def test_tls_options_of_a_remote_reach_the_grpc_backend(
    tmp_path: Path, local: Store, pki: Pki  # noqa: F811 - fixture
) -> None:
    certs = tmp_path / "conf" / "certs"
    certs.mkdir(parents=True)
    (certs / "ca.pem").write_bytes(pki.ca)
    (certs / "me.pem").write_bytes(pki.client.cert)
    (certs / "me.key").write_bytes(pki.client.key)
    with open_store("memory://") as backing, Server(
        backing, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca,
        use_plugins=False,
    ) as server:
        config = load_config(write(tmp_path / "conf" / "config.toml", f"""
[remotes.secure]
url = "grpcs://localhost:{server.port}"
push = true
server_cert = "certs/ca.pem"
client_cert = "certs/me.pem"
client_key = "certs/me.key"
"""))
        report = Remotes.from_config(config).push(local, REF)
        assert statuses(report.outcomes) == [("secure", "pushed")]
        assert backing.get_ref(REF) == local.get_ref(REF)


# -- the command line ------------------------------------------------------------------------------


def cli(*args: str) -> Result:
    return CliRunner().invoke(make_cli(), list(args))


@pytest.fixture
def config_file(tmp_path: Path, servers: Servers) -> Path:
    """A user configuration naming a stopped gRPC mirror and two file:// remotes."""
    return write(tmp_path / "config" / "casframe" / "config.toml", f"""
[remotes.mirror]
url = "{servers.stopped_url()}"
push = true
timeout = 5
[remotes.ci]
url = "{tmp_path / 'ci'}"
push = true
[remotes.team]
url = "{tmp_path / 'team'}"
push = true
""")


def test_cli_push_and_pull_through_configured_remotes(
    tmp_path: Path, local: Store, config_file: Path
) -> None:
    root = local.get_ref(REF)
    result = cli("push", REF)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("unreachable mirror: cannot reach grpc://127.0.0.1:")
    assert lines[1].startswith("pushed to ci: ") and lines[1].endswith(f"; ref {REF} set")
    assert lines[2].startswith("pushed to team: ")
    assert len(lines) == 3
    assert result.stderr == (
        f"casframe: error: pushed {REF} to 2 of 3 push remotes (mirror unreachable)\n"
    )

    again = cli("push", REF, "--remote", "ci", "--remote", "team")
    assert again.exit_code == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"up to date {name}: already has it ({sum(1 for d in local.tree_digests(REF) if d.size)}"
        f" blobs, ref {REF})"
        for name in ("ci", "team")
    ]

    os.unlink(tmp_path / "ci" / "refs" / "heads" / REF)
    pulled = cli("--store", str(tmp_path / "laptop"), "pull", REF)
    assert pulled.exit_code == 0, pulled.stderr
    lines = pulled.stdout.splitlines()
    assert lines[0].startswith("unreachable mirror: ")
    assert lines[1] == f"skipped ci: does not have the ref {REF}"
    assert lines[2].startswith("pulled from team: ") and lines[2].endswith(f"; ref {REF} set")
    with open_store(f"file://{tmp_path / 'laptop'}") as laptop:
        assert laptop.get_ref(REF) == root


def test_cli_json_has_one_record_per_remote(
    tmp_path: Path, local: Store, config_file: Path
) -> None:
    result = cli("push", REF, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["operation"], report["ref"], report["ok"]) == ("push", REF, False)
    assert report["root"] == str(local.get_ref(REF))
    records = {record["name"]: record for record in report["remotes"]}
    assert records["mirror"]["status"] == "unreachable"
    assert records["mirror"]["error"] == "unavailable"
    assert records["mirror"]["blobs_sent"] is None
    assert records["ci"]["status"] == "pushed" and records["ci"]["ref_set"] is True
    assert records["ci"]["blobs_sent"] == records["ci"]["blobs_total"] > 0
    assert records["ci"]["bytes_sent"] > 0 and records["ci"]["message"] is None

    pulled = json.loads(cli("--store", "./laptop", "pull", REF, "--remote", "ci", "--json").stdout)
    assert pulled["ok"] is True
    assert [(r["name"], r["status"]) for r in pulled["remotes"]] == [("ci", "pulled")]


def test_cli_timeout_option_overrides_the_configured_one(
    tmp_path: Path, local: Store, black_holes: Callable[[], str]
) -> None:
    write(tmp_path / "config" / "casframe" / "config.toml", f"""
[remotes.hole]
url = "{black_holes()}"
push = true
timeout = 60
""")
    started = time.monotonic()
    result = cli("push", REF, "--timeout", "0.5")
    assert time.monotonic() - started < 5
    assert result.exit_code == 1
    assert result.stdout == "unreachable hole: no answer within 0.5 s\n"


def test_cli_read_only_remote_line(tmp_path: Path, local: Store, servers: Servers) -> None:
    frozen, _ = servers.start("frozen", read_only=True)
    write(Path(PROJECT_FILE), f'[remotes.archive]\nurl = "grpc://127.0.0.1:{frozen.port}"\n'
                              "push = true\n")
    result = cli("push", REF)
    assert result.exit_code == 1
    assert result.stdout == (
        f"read-only archive: not pushed (grpc://127.0.0.1:{frozen.port} refuses writes: its "
        "ReferenceStorage status does not allow updates)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", REF], "no remote to push to: none with push = true in "),
        (["pull", REF], "no remote to pull from: none with pull = true (the default) in "),
        (["pull", REF, "--remote", "nope"], "unknown remote 'nope'"),
    ],
)
def test_cli_without_usable_remotes_says_where_it_looked(
    tmp_path: Path, local: Store, args: list[str], message: str
) -> None:
    result = cli(*args)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"casframe: error: {message}")
    assert str(tmp_path / "config" / "casframe" / "config.toml") in result.stderr
    assert "no project file (casframe.toml)" in result.stderr


def test_cli_single_store_form_refuses_remote_options(local: Store) -> None:
    result = cli("push", REF, "--to", "./x", "--remote", "ci")
    assert result.exit_code == 2
    assert "--to names one store: --remote and --timeout do not apply" in result.stderr
    result = cli("pull", REF, "--from", "./x", "--timeout", "3")
    assert result.exit_code == 2
    assert "--from names one store" in result.stderr


def test_digest_pushes_set_no_ref(tmp_path: Path, local: Store) -> None:
    root: Digest = local.get_ref(REF)
    ci = file_remote(tmp_path, "ci", push=True)
    report = Remotes([ci]).push(local, str(root))
    assert report.ref is None and report.outcomes[0].ref is None
    with open_remote(ci) as store:
        assert store.list_refs() == [] and store.contains(root)


def test_an_s3_remote_that_never_answers_does_not_hold_up_exit(tmp_path: Path) -> None:
    """A pull by digest gives up on a silent S3 remote at its time-out; the process must then
    exit at once, not wait for the request still hanging (read_timeout=60 here)."""
    import http.server
    import socketserver
    import subprocess
    import sys
    import threading

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            if self.path.rstrip("/").count("/") == 1:  # HeadBucket: the bucket is there
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                time.sleep(90)  # any object: no answer

        def log_message(self, *args: object) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = (f"s3://bucket/p?endpoint_url=http://127.0.0.1:{server.server_address[1]}"
           "&addressing_style=path&read_timeout=60&max_attempts=1")
    script = f"""
import sys
from casframe import open_store
from casframe.config import RemoteEntry
from casframe.remotes import Remotes
report = Remotes([RemoteEntry("silent", {url!r}, timeout=2)]).pull(
    open_store("memory://"), "{'ab' * 32}/5", check=False)
print(report.outcomes[0].status.value)
"""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        server.shutdown()
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unreachable"]
    assert elapsed < 40, f"exit waited for the hanging request: {elapsed:.1f} s"
