"""What is particular to the ``sqlite://`` backend: the file, its URLs, processes, bad paths."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from contextlib import closing
from importlib import metadata, resources
from pathlib import Path

import pytest
from casframe import (
    BackendUnavailableError,
    BlobNotFoundError,
    ConfigError,
    Digest,
    Store,
    open_store,
)

from casframe_sqlite.store import (
    APPLICATION_ID,
    CHUNK_SIZE,
    SCHEMA_VERSION,
    DatabaseOpenError,
    SQLiteBlobStore,
)

CASFRAME = str(Path(sys.executable).parent / "casframe")
MakeTree = Callable[..., Path]


def query(path: str | Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Rows of ``sql`` run on the database through a connection of the test's own."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ from one chunk to the next."""
    unit = bytes((seed + i * 7) % 251 for i in range(251))
    return (unit * (size // len(unit) + 1))[:size]


class PatternStream(io.RawIOBase):
    """``size`` bytes of :func:`pattern`, produced as they are read, never held whole."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.remaining = size
        self.unit = pattern(CHUNK_SIZE)  # a multiple of 251 long, so chunks line up

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self.remaining, len(self.unit))
        buffer[:n] = self.unit[:n]
        self.remaining -= n
        return n


# -- the database file -------------------------------------------------------------------------


def test_opening_creates_a_marked_database_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folders" / "cas.db"
    with open_store(f"sqlite://{path}") as store:
        assert store.url == f"sqlite://{path}"
        assert path.is_file()
        assert query(path, "PRAGMA journal_mode") == [("wal",)]
        assert query(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
        assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert query(path, "PRAGMA page_size") == [(16384,)]
        tables = {name for (name,) in query(path, "SELECT name FROM sqlite_master")}
        assert {"blobs", "chunks", "refs"} <= tables


def test_everything_survives_closing_and_reopening(tmp_path: Path, make_tree: MakeTree) -> None:
    url = f"sqlite://{tmp_path / 'cas.db'}"
    source = make_tree("source", large=True)
    with open_store(url) as store:
        root = store.import_directory(source)
        store.set_ref("release/1", root)
        big = store.put_stream(PatternStream(3 * CHUNK_SIZE + 5))
    with open_store(url) as store:
        assert store.get_ref("release/1") == root
        store.checkout("release/1", tmp_path / "out")
        assert store.import_directory(tmp_path / "out") == root
        with store.open_read(big) as stream:
            assert Digest.of_stream(stream) == big


def test_relative_and_home_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cases = {
        "sqlite://cas.db": tmp_path / "cas.db",
        "sqlite://./sub/cas.db": tmp_path / "sub" / "cas.db",
        "sqlite://~/cas.db": tmp_path / "home" / "cas.db",
        "sqlite:///" + str(tmp_path / "with space.db").lstrip("/").replace(" ", "%20"): (
            tmp_path / "with space.db"
        ),
    }
    for url, path in cases.items():
        with open_store(url) as store:
            assert store.url == f"sqlite://{path}", url
            store.put_bytes(url.encode())
        assert path.is_file(), url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "needs a database file path"),
        ("sqlite:///tmp/x.db?journal=off", "unknown option(s) journal"),
        ("sqlite:///tmp/x.db?timeout=soon", "must be a number of seconds"),
        ("sqlite:///tmp/x.db?timeout=-1", "must be a number of seconds"),
        ("sqlite:///tmp/x.db?fsync=maybe", "is not a boolean"),
    ],
)
def test_malformed_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_store(url)


def test_options_from_the_url(tmp_path: Path) -> None:
    path = tmp_path / "cas.db"
    with open_store(f"sqlite://{path}?timeout=2.5&fsync=true") as store:
        digest = store.put_bytes(b"flushed to disk")
        assert store.read_bytes(digest) == b"flushed to disk"


# -- paths that are not a store --------------------------------------------------------------------


def _other_application(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")


def _newer_schema(path: Path) -> None:
    open_store(f"sqlite://{path}").close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


BAD_PATHS = {
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "garbage": (lambda p: p.write_bytes(b"not a database\n" * 100), "not a casframe-sqlite"),
    "other-application": (_other_application, "database of another application"),
    "newer-schema": (_newer_schema, "written by a newer casframe-sqlite"),
    "under-a-file": (lambda p: p.parent.mkdir(exist_ok=True), "cannot create its folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_a_path_that_is_not_a_store_is_refused_untouched(tmp_path: Path, case: str) -> None:
    make, message = BAD_PATHS[case]
    path = tmp_path / "cas.db"
    make(path)
    if case == "under-a-file":
        path.write_bytes(b"a plain file")
        path = path / "cas.db"
    before = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.iterdir())
    with pytest.raises(DatabaseOpenError, match=message) as caught:
        open_store(f"sqlite://{path}")
    assert isinstance(caught.value, ConfigError), "the CLI reports it like a bad store URL"
    assert caught.value.reason == "sqlite-open"
    assert str(path) in str(caught.value)
    after = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.iterdir())
    assert after == before, "nothing was written"


def test_the_cli_reports_a_bad_database_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x00not sqlite" * 64)
    result = subprocess.run(
        [CASFRAME, "--store", f"sqlite://{garbage}", "ref", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a casframe-sqlite database" in lines[0], result.stderr
    assert str(garbage) in lines[0]


# -- several processes and threads -----------------------------------------------------------------

WRITER = r"""
import io, os, sys, time
from casframe import open_store

url, go, source, label = sys.argv[1:5]
store = open_store(url)  # every process may be the one creating the database
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
big = bytes((i * 7) % 251 for i in range(251)) * (3 * 4177 + 1)  # ~3 MiB, the same everywhere
digests = []
for round in range(3):
    digests.append(store.put_stream(io.BytesIO(big)))
    digests.append(store.put_bytes(big))
    digests.extend(store.put_bytes(b"small %d" % i) for i in range(200))
    tree = store.import_directory(source)
    store.set_ref("proc/%s/%d" % (label, round), tree)
print(sorted(set(map(str, digests))), tree, flush=True)
"""


OPENER = r"""
import os, sys
from casframe import open_store
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    pass
open_store(sys.argv[1]).close()
"""


def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    """Switching a new database to WAL is refused at once while another process switches it;
    every opener waits for it as for any lock (the first open of a shared store by several
    build jobs at once)."""
    for round_no in range(10):
        go = tmp_path / f"go{round_no}"
        url = f"sqlite://{tmp_path / f'new{round_no}.db'}?timeout=120"
        procs = [
            subprocess.Popen([sys.executable, "-c", OPENER, url, str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        try:
            for proc in procs:  # all imported and spinning: they open the store together
                assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            go.touch()
            errors = [proc.communicate(timeout=300)[1] for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert [proc.returncode for proc in procs] == [0] * 6, errors


def test_processes_writing_the_same_blobs_at_once(tmp_path: Path, make_tree: MakeTree) -> None:
    path = tmp_path / "shared.db"
    url = f"sqlite://{path}?timeout=120"
    go = tmp_path / "go"
    source = make_tree("source", large=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(go), str(source), str(label)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                pytest.fail(f"a writer failed to open the store: {proc.communicate()[1]}")
        go.touch()
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert len({out for out, _ in results}) == 1, "every process stored the same digests"

    # One row per digest, however many processes stored it, and no upload left behind.
    assert query(path, "SELECT count(*) FROM blobs WHERE hash IS NULL") == [(0,)]
    assert query(path, "SELECT count(*) - count(DISTINCT hash) FROM blobs") == [(0,)]
    with open_store(url) as store:
        assert sorted(r.name for r in store.list_refs()) == [
            f"proc/{label}/{round}" for label in range(3) for round in range(3)
        ]
        root = store.get_ref("proc/0/0")
        store.checkout(root, tmp_path / "out")
        assert store.import_directory(tmp_path / "out") == root
        report = store.fsck()
        assert report.ok, report.problems
        assert report.blobs_checked == query(path, "SELECT count(*) FROM blobs")[0][0]


def test_a_forked_child_opens_connections_of_its_own(sqlite_store: Store) -> None:
    assert isinstance(sqlite_store.blobs, SQLiteBlobStore)
    db = sqlite_store.blobs.db
    before = sqlite_store.put_bytes(b"stored by the parent")
    with db.connection() as conn:
        parents = conn  # back in the pool after the block, for the parent's next call
    pid = os.fork()
    if pid == 0:  # the child: any failure becomes its exit status
        status = 1
        try:
            with db.connection() as conn:
                if conn is parents:
                    os._exit(3)  # SQLite connections must not be used across a fork
            sqlite_store.put_bytes(b"stored by the child")
            status = 0 if sqlite_store.read_bytes(before) == b"stored by the parent" else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = Digest.of_bytes(b"stored by the child")
    assert sqlite_store.read_bytes(child) == b"stored by the child"
    assert sqlite_store.read_bytes(before) == b"stored by the parent"


KILLED_WRITER = r"""
import sys, time
from casframe import open_store

store = open_store(sys.argv[1])
writer = store.blobs.begin_write()
writer.write(b"x" * (5 * 1024 * 1024 + 3))  # five chunks staged, the sixth still in memory
print("staged", flush=True)
time.sleep(600)
"""


def test_a_killed_writer_leaves_nothing_visible_and_prune_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "cas.db"
    url = f"sqlite://{path}"
    source = tmp_path / "source"
    source.mkdir()
    (source / "kept").write_bytes(b"a file stored before the crash")
    with open_store(url) as store:
        root = store.import_directory(source)
        store.set_ref("kept", root)
        kept = set(store.tree_digests(root))
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

        unfinished = Digest.of_bytes(b"x" * (5 * 1024 * 1024 + 3))
        assert store.find_missing([unfinished]) == {unfinished}
        assert {info.digest for info in store.blobs.iter_blobs()} == kept
        assert query(path, "SELECT count(*), sum(size) FROM blobs WHERE hash IS NULL") == [
            (1, 5 * CHUNK_SIZE)
        ]

        young = store.prune()  # default grace: the upload is too young to be abandoned
        assert (young.temp_files_removed, young.temp_bytes_removed) == (0, 0)
        dry = store.prune(grace_period=0, dry_run=True)
        assert (dry.temp_files_removed, dry.temp_bytes_removed) == (1, 5 * CHUNK_SIZE)
        report = store.prune(grace_period=0)
        assert (report.temp_files_removed, report.temp_bytes_removed) == (1, 5 * CHUNK_SIZE)
        assert query(path, "SELECT count(*) FROM blobs") == [(len(kept),)]
        assert query(path, "SELECT count(*) FROM chunks") == [(len(kept),)]
        store.checkout("kept", tmp_path / "out")
        assert (tmp_path / "out" / "kept").read_bytes() == b"a file stored before the crash"


def test_an_upload_removed_as_abandoned_cannot_commit(sqlite_store: Store) -> None:
    data = pattern(2 * CHUNK_SIZE + 10)
    writer = sqlite_store.blobs.begin_write()
    writer.write(data[: 2 * CHUNK_SIZE])
    assert sqlite_store.blobs.clean_temp(time.time() + 1) == (1, 2 * CHUNK_SIZE)
    writer.write(data[2 * CHUNK_SIZE :])
    with pytest.raises(BackendUnavailableError, match="removed as abandoned") as caught:
        writer.commit(Digest.of_bytes(data))
    assert caught.value.temporary
    writer.abort()
    assert sqlite_store.find_missing([Digest.of_bytes(data)]) == {Digest.of_bytes(data)}
    assert sqlite_store.put_bytes(data) == Digest.of_bytes(data), "storing it again works"


def test_a_read_survives_the_blob_being_deleted_and_stored_again(sqlite_store: Store) -> None:
    data = pattern(3 * CHUNK_SIZE + 1, seed=5)
    digest = sqlite_store.put_bytes(data)
    with sqlite_store.open_read(digest) as stream:
        head = stream.read(CHUNK_SIZE + 10)
        sqlite_store.blobs.delete_blobs([digest])
        assert sqlite_store.put_bytes(data) == digest  # stored anew, under another row
        assert head + stream.read() == data
    with sqlite_store.open_read(digest) as stream:
        stream.read(10)
        sqlite_store.blobs.delete_blobs([digest])
        with pytest.raises(BlobNotFoundError, match=digest.hash):
            stream.read()


def test_large_blobs_stream_through_bounded_memory(sqlite_store: Store) -> None:
    size = 40 * CHUNK_SIZE + 123
    tracemalloc.start()
    try:
        digest = sqlite_store.put_stream(PatternStream(size))
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with sqlite_store.open_read(digest) as stream:
            assert Digest.of_stream(stream) == digest
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.size == size
    # A few chunks in flight, never the 40 MiB blob.
    assert written_peak < 6 * CHUNK_SIZE, written_peak
    assert read_peak < 6 * CHUNK_SIZE, read_peak


def test_listing_pages_through_many_blobs(sqlite_store: Store) -> None:
    digests = {sqlite_store.put_bytes(b"blob %d" % i) for i in range(4500)}
    stats = list(sqlite_store.blobs.iter_blob_stats())
    assert {Digest(h, s) for h, s, _ in stats} == digests
    assert len(stats) == len(digests), "each blob once, across pages"


# -- the installed package -------------------------------------------------------------------------


def test_the_installed_distribution_declares_the_plugin() -> None:
    dist = metadata.distribution("casframe-sqlite")
    assert dist.version == "0.1.0"
    (entry,) = [ep for ep in dist.entry_points if ep.group == "casframe"]
    assert (entry.name, entry.value) == ("sqlite", "casframe_sqlite.plugin")
    assert "casframe" in " ".join(dist.requires or [])
    assert (resources.files("casframe_sqlite") / "py.typed").is_file()
    code = (
        "import sys, casframe; casframe.list_plugins(); "
        "assert 'casframe_sqlite.plugin' in sys.modules; "
        "assert 'casframe_sqlite.store' not in sys.modules, 'the backend loads lazily'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASFRAME_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize(
    ("read", "between"),
    [
        ("read_many", "FROM chunks"),  # read_blobs: the blob's row found, its chunks not yet read
        ("open_read", "FROM blobs WHERE id"),  # at the end: is it the end, or was it deleted?
    ],
)
def test_a_delete_between_two_queries_of_a_read_does_not_cut_the_blob(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, read: str, between: str
) -> None:
    deleting: list[Store] = []

    class Connection(sqlite3.Connection):
        """Deletes the blob just before the first query containing ``between`` runs."""

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
            if between in sql and deleting:
                deleting.pop().blobs.delete_blobs([digest])  # committed by another connection
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: connect(*a, **kw, factory=Connection))
    data = pattern(2 * CHUNK_SIZE, seed=3)
    with open_store(sqlite_url) as store:
        digest = store.put_bytes(data)
        deleting.append(store)
        if read == "read_many":
            assert list(store.read_many([digest])) == [(digest, data)]
        else:
            with store.open_read(digest) as stream:
                assert stream.read() == data
        assert not deleting, "the blob was deleted in the middle of the read"
        assert store.find_missing([digest]) == {digest}
