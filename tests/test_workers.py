"""Helper processes for local import and checkout (casframe.workers).

What a user relies on: the helpers give exactly the trees the calling process would; errors
in a helper reach the caller as the same typed errors; small trees, ``jobs=1`` and stores no
other process can open never start a helper (a checkout by hardlinks starts one fewer than
its jobs and links beside them); a crashing helper, a SIGKILL of the parent and Ctrl-C
leave no process behind and nothing half-visible in the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casframe.checkout
import casframe.progress
import casframe.statcache
import casframe.tree
import casframe.treeimport
from casframe import (
    CheckoutError,
    ConfigError,
    CorruptBlobError,
    Digest,
    Store,
    TreeTooLargeError,
    UnsupportedFileTypeError,
    WorkerError,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory
from casframe.statcache import open_stat_cache
from casframe.testing import describe_tree
from casframe.tree import missing_in_tree
from casframe.workers import pool
from casframe.workers.protocol import describe_error, rebuild_error
from casframe.workers.settings import DEFAULT_JOBS
from casframe.workers.tasks import import_files

HERE = Path(__file__).resolve().parent
#: Seconds to wait for a process to start, stop or exit: a hang guard, never the outcome.
HANG_GUARD = 120


def write_files(root: Path, count: int, seed: int = 1, *, large: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(count):
        folder = root / f"d{i % 5}" / f"e{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(rng.randbytes(rng.randint(0, 6000)))
    for i in range(large):
        (root / f"large{i}.bin").write_bytes(rng.randbytes((1 << 20) + 1 + i))
    if count:
        os.chmod(root / "d0" / "e0" / "f0", 0o755)
        os.symlink("d0/e0/f0", root / "link")
    return root


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[Any]]:
    """Every helper process started during the test."""
    started: list[subprocess.Popen[Any]] = []
    real = pool._spawn

    def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        process = real(argv, env)
        started.append(process)
        return process

    monkeypatch.setattr(pool, "_spawn", spawn)
    return started


@pytest.fixture
def helpers_from(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``helpers_from(n)``: helpers start from n files on (import and checkout alike)."""

    def set_threshold(files: int) -> None:
        monkeypatch.setattr(casframe.treeimport, "IMPORT_THRESHOLD_FILES", files)
        monkeypatch.setattr(casframe.checkout, "CHECKOUT_THRESHOLD_FILES", files)

    yield set_threshold


def checkout_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "casframe-checkout"]


def assert_gone(processes: list[subprocess.Popen[Any]]) -> None:
    for process in processes:
        assert process.poll() is not None, f"helper {process.pid} still runs"


# -- the protocol -----------------------------------------------------------------------------


def test_errors_cross_the_pipe_as_the_same_typed_errors() -> None:
    digest = Digest.of_bytes(b"x" * 10)
    corrupt = rebuild_error(describe_error(CorruptBlobError(digest, "stored object has 3 bytes")))
    assert type(corrupt) is CorruptBlobError
    assert str(corrupt) == f"corrupt blob {digest}: stored object has 3 bytes"
    assert corrupt.digest == digest and corrupt.detail == "stored object has 3 bytes"

    checkout_error = rebuild_error(
        describe_error(CheckoutError("a/b", OSError(errno.ENOSPC, "No space left on device")))
    )
    assert type(checkout_error) is CheckoutError
    assert str(checkout_error) == "cannot check out 'a/b': No space left on device"
    assert checkout_error.errno == errno.ENOSPC and checkout_error.tree_path == "a/b"

    missing = rebuild_error(describe_error(FileNotFoundError(errno.ENOENT, "gone", "/x/y")))
    assert type(missing) is FileNotFoundError
    assert (missing.errno, missing.filename) == (errno.ENOENT, "/x/y")
    assert str(missing) == "[Errno 2] gone: '/x/y'"

    class Strange(Exception):
        pass

    other = rebuild_error(describe_error(Strange("what")))
    assert type(other) is WorkerError
    assert str(other).startswith("helper process failed: ")
    assert str(other).endswith(".<locals>.Strange: what")


def test_a_helper_answers_batches_and_raises_typed_errors(
    local_store: Store, tmp_path: Path, spawned: list[subprocess.Popen[Any]]
) -> None:
    (tmp_path / "a").write_bytes(b"hello")
    os.mkfifo(tmp_path / "fifo")
    workers = pool.WorkerPool(*local_store.blobs.worker_spec(), jobs=1)
    try:
        stored, large_next = workers.submit(import_files, [str(tmp_path / "a")]).result()
        assert [(h, size, exe) for h, size, exe, _ in stored] == [
            (Digest.of_bytes(b"hello").hash, 5, False)
        ]
        assert not large_next
        assert local_store.read_bytes(Digest.of_bytes(b"hello")) == b"hello"

        with pytest.raises(UnsupportedFileTypeError, match=r"it is a fifo; only regular files"):
            workers.submit(import_files, [str(tmp_path / "fifo")]).result()
        with pytest.raises(FileNotFoundError) as raised:
            workers.submit(import_files, [str(tmp_path / "nothing")]).result()
        assert raised.value.filename == str(tmp_path / "nothing")
        # The helper lives on after an error.
        again, _ = workers.submit(import_files, [str(tmp_path / "a")]).result()
        assert again[0][:2] == stored[0][:2]
    finally:
        workers.shutdown(cancel=False)
    assert len(spawned) == 1
    assert_gone(spawned)
    assert spawned[0].returncode == 0


def test_cancelling_stops_a_helper_that_reads_no_more_work(
    local_store: Store, tmp_path: Path, spawned: list[subprocess.Popen[Any]]
) -> None:
    # A helper that stopped reading (hung, or stopped) while its feeder writes a batch larger
    # than the pipe holds: shutdown(cancel=True) (Ctrl-C) must kill it, not wait on the feeder
    # that is blocked in that write.
    (tmp_path / "a").write_bytes(b"hello")
    workers = pool.WorkerPool(*local_store.blobs.worker_spec(), jobs=1)
    done = threading.Event()
    try:
        workers.submit(import_files, [str(tmp_path / "a")]).result()  # greeted, at work
        os.kill(spawned[0].pid, signal.SIGSTOP)
        workers.submit(import_files, [str(tmp_path / f"{i:0200}") for i in range(4000)])
        requests = workers.helpers[0].requests.fileno()
        while struct.unpack("i", fcntl.ioctl(requests, termios.FIONREAD, b"\0" * 4))[0] < 60000:
            time.sleep(0.01)  # until the pipe is full: the feeder is blocked in its write
        stopper = threading.Thread(
            target=lambda: (workers.shutdown(cancel=True), done.set()), daemon=True
        )
        stopper.start()
        stopper.join(timeout=HANG_GUARD)
        assert done.is_set(), "shutdown(cancel=True) hangs on a helper that reads no more"
    finally:
        for process in spawned:
            with contextlib.suppress(OSError):
                process.kill()
    assert_gone(spawned)


def test_a_helper_that_cannot_open_the_store_says_why(
    tmp_path: Path, spawned: list[subprocess.Popen[Any]]
) -> None:
    workers = pool.WorkerPool(
        "casframe_local.store:open_local_store", f"file://{tmp_path}/x?fsync=maybe", jobs=1
    )
    try:
        with pytest.raises(ConfigError, match=r"option fsync='maybe' in .* is not a boolean"):
            workers.submit(import_files, [str(tmp_path)]).result()
    finally:
        workers.shutdown(cancel=False)
    assert_gone(spawned)


# -- the same trees ---------------------------------------------------------------------------


def test_helpers_import_and_check_out_what_the_process_would(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every file recorded in the stat cache, even those written just now.
    monkeypatch.setattr(casframe.statcache, "TIMESTAMP_WINDOW_NS", -(10**18))
    source = write_files(tmp_path / "src", 700, large=3)
    alone = open_store(f"file://{tmp_path / 'alone'}")
    helped = open_store(f"file://{tmp_path / 'helped'}")
    helpers_from(100)

    expected = alone.import_directory(source, stat_cache=tmp_path / "cache-alone", jobs=1)
    assert spawned == []
    digest = helped.import_directory(source, stat_cache=tmp_path / "cache-helped", jobs=2)
    assert len(spawned) == 2
    assert digest == expected
    assert sorted(b.digest for b in helped.blobs.iter_blobs()) == sorted(
        b.digest for b in alone.blobs.iter_blobs()
    )
    # The stat cache holds the same entries whoever read the files.
    root = os.path.abspath(source)
    assert (
        open_stat_cache(root, str(tmp_path / "cache-helped")).known
        == open_stat_cache(root, str(tmp_path / "cache-alone")).known
    )
    assert len(open_stat_cache(root, str(tmp_path / "cache-helped")).known) == 703

    for link, helpers in ((True, 1), (False, 2)):  # links: one helper beside this process
        dest = tmp_path / f"out-{link}"
        before = len(spawned)
        helped.checkout(digest, dest, link=link, jobs=2)
        assert len(spawned) - before == helpers
        assert alone.import_directory(dest, stat_cache=False, jobs=1) == digest
        executable = dest / "d0" / "e0" / "f0"
        assert os.stat(executable).st_mode & stat.S_IXUSR
        if link:
            assert os.stat(dest / "d1" / "e1" / "f1").st_nlink >= 2  # linked, not copied
    assert len(spawned) == 5
    assert_gone(spawned)
    assert helped.fsck().ok


@settings(
    max_examples=12, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    files=st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a", "b", "ü", "c d"]), max_size=3),
            st.text(alphabet="xyzé-_.0", min_size=1, max_size=6).filter(
                lambda n: n not in (".", "..")
            ),
            st.sampled_from([0, 1, 100, 5000, (1 << 20) + 7]),
            st.booleans(),
        ),
        min_size=1, max_size=40,
    )
)
def test_random_trees_give_the_same_digest_with_helpers(
    tmp_path_factory: pytest.TempPathFactory, helpers_from: Any,
    files: list[tuple[list[str], str, int, bool]],
) -> None:
    top = tmp_path_factory.mktemp("random")
    source = top / "src"
    source.mkdir()
    rng = random.Random(len(files))
    for folders, name, size, executable in files:
        folder = source.joinpath(*folders)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if path.is_dir():
            continue
        path.write_bytes(rng.randbytes(size))
        os.chmod(path, 0o755 if executable else 0o644)
    helpers_from(1)
    alone = open_store(f"file://{top / 'alone'}").import_directory(source, stat_cache=False,
                                                                   jobs=1)
    assert alone == reference_digest(source)
    helped_store = open_store(f"file://{top / 'helped'}")
    assert helped_store.import_directory(source, stat_cache=False, jobs=2) == alone
    helped_store.checkout(alone, top / "out", jobs=2)
    helped_store.checkout(alone, top / "copied", link=False, jobs=2)
    for out in ("out", "copied"):
        assert open_store("memory://").import_directory(top / out, stat_cache=False) == alone


def reference_digest(path: Path) -> Digest:
    """The root digest of a tree of files and folders, built with protobuf's own messages."""
    directory = Directory()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            child = reference_digest(Path(entry.path))
            node = directory.directories.add(name=entry.name)
            node.digest.hash, node.digest.size_bytes = child.hash, child.size
        else:
            content = Path(entry.path).read_bytes()
            digest = Digest.of_bytes(content)
            file_node = directory.files.add(
                name=entry.name, is_executable=bool(os.stat(entry.path).st_mode & stat.S_IXUSR)
            )
            file_node.digest.hash, file_node.digest.size_bytes = digest.hash, digest.size
    return Digest.of_bytes(directory.SerializeToString(deterministic=True))


# -- when helpers start -----------------------------------------------------------------------


def test_helpers_start_only_for_trees_large_enough_to_pay(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]]
) -> None:
    source = write_files(tmp_path / "src", 59)  # 59 files and a symlink
    store = open_store(f"file://{tmp_path / 'store'}")
    helpers_from(60)
    small = store.import_directory(source, stat_cache=False, jobs=2)
    store.checkout(small, tmp_path / "out-small", link=False, jobs=2)
    assert spawned == []

    (source / "one-more").write_bytes(b"60")
    bigger = store.import_directory(source, stat_cache=False, jobs=2)
    assert len(spawned) == 2
    store.checkout(bigger, tmp_path / "out-bigger", link=False, jobs=2)
    assert len(spawned) == 4
    store.checkout(bigger, tmp_path / "out-linked", jobs=2)  # this process and one helper
    assert len(spawned) == 5

    # jobs=1 (the store option too) keeps the work in the process, whatever the size.
    one_job = open_store(f"file://{tmp_path / 'store'}?jobs=1")
    assert one_job.jobs == 1
    assert one_job.import_directory(source, stat_cache=False) == bigger
    one_job.checkout(bigger, tmp_path / "out-one-job")
    # A store no other process can open keeps it there too.
    assert open_store("memory://").import_directory(source, stat_cache=False, jobs=2) == bigger
    assert len(spawned) == 5
    assert_gone(spawned)


def test_files_the_stat_cache_remembers_do_not_count(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(casframe.statcache, "TIMESTAMP_WINDOW_NS", -(10**18))
    source = write_files(tmp_path / "src", 80)
    store = open_store(f"file://{tmp_path / 'store'}")
    helpers_from(50)
    first = store.import_directory(source, stat_cache=tmp_path / "cache", jobs=2)
    assert len(spawned) == 2
    for i in range(10):
        (source / f"new{i}").write_bytes(b"new %d" % i)
    second = store.import_directory(source, stat_cache=tmp_path / "cache", jobs=2)
    assert second != first
    assert len(spawned) == 2  # 10 files to read: no helper


def test_the_jobs_option_must_be_a_count(tmp_path: Path) -> None:
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError) as raised:
            open_store(f"file://{tmp_path}?jobs={bad}")
        assert str(raised.value) == (
            f"option jobs='{bad}' in file://{tmp_path}?jobs={bad} is not a count of 1 or more"
        )
    assert open_store(f"file://{tmp_path}?jobs=3").jobs == 3
    assert open_store(f"file://{tmp_path}").jobs == DEFAULT_JOBS == len(os.sched_getaffinity(0))


# -- checkout by hardlinks: this process links beside its helpers ----------------------------


def _record_link_batches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that run link batches in this process."""
    names: list[str] = []
    submit = pool.InlineRunner.submit

    def recording(self: pool.InlineRunner, task: Any, payload: Any) -> Any:
        if task is casframe.checkout.link_files:
            names.append(threading.current_thread().name)
        return submit(self, task, payload)

    monkeypatch.setattr(pool.InlineRunner, "submit", recording)
    return names


def test_a_checkout_by_hardlinks_links_beside_one_helper_fewer_than_its_jobs(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = write_files(tmp_path / "src", 600)
    store = open_store(f"file://{tmp_path / 'store'}")
    digest = store.import_directory(source, stat_cache=False, jobs=1)
    helpers_from(300)
    names = _record_link_batches(monkeypatch)
    # The helper greets only once this process has linked a batch itself, so that however
    # fast the helper starts, what the test sees does not depend on it.
    linked_here = threading.Event()
    record, answer = pool.InlineRunner.submit, pool._Helper.answer

    def recording_and_telling(self: pool.InlineRunner, task: Any, payload: Any) -> Any:
        result = record(self, task, payload)
        linked_here.set()
        return result

    def greeting_after_a_batch_here(self: pool._Helper) -> Any:
        if not self.greeted:
            linked_here.wait(HANG_GUARD)
        return answer(self)

    monkeypatch.setattr(pool.InlineRunner, "submit", recording_and_telling)
    monkeypatch.setattr(pool._Helper, "answer", greeting_after_a_batch_here)
    given: list[Any] = []
    submit = pool.WorkerPool.submit

    def recording_submit(self: pool.WorkerPool, task: Any, payload: Any) -> Any:
        given.append(payload)
        return submit(self, task, payload)

    monkeypatch.setattr(pool.WorkerPool, "submit", recording_submit)
    store.checkout(digest, tmp_path / "out", jobs=2)
    assert len(spawned) == 1  # jobs=2: this process and one helper
    # It never waits for the helper: it keeps it two batches ahead and links the rest
    # itself, in its own thread (no thread contends for the interpreter lock).
    assert len(given) >= 1 and names and set(names) == {threading.current_thread().name}
    assert describe_tree(tmp_path / "out") == describe_tree(source)
    assert os.stat(tmp_path / "out" / "d1" / "e1" / "f1").st_nlink >= 2  # linked
    assert_gone(spawned)

    store.checkout(digest, tmp_path / "out-3", jobs=3)
    assert len(spawned) == 3
    assert describe_tree(tmp_path / "out-3") == describe_tree(source)
    # One job: no helper, whatever the size.
    store.checkout(digest, tmp_path / "out-1", jobs=1)
    assert len(spawned) == 3
    assert_gone(spawned)


def test_a_checkout_on_one_job_starts_no_helper_whether_it_links_or_copies(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]],
) -> None:
    source = write_files(tmp_path / "src", 300)
    store = open_store(f"file://{tmp_path / 'store'}")
    digest = store.import_directory(source, stat_cache=False, jobs=1)
    helpers_from(1)
    store.checkout(digest, tmp_path / "linked", jobs=1)
    store.checkout(digest, tmp_path / "copied", link=False, jobs=1)
    assert spawned == []
    assert describe_tree(tmp_path / "copied") == describe_tree(source)


def test_batches_no_helper_has_started_are_linked_by_the_checkout_itself(
    tmp_path: Path, helpers_from: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A helper that never starts (stopped as soon as it is spawned) costs a checkout by
    hardlinks nothing but its spawn: the batches given to it are taken back."""
    started: list[subprocess.Popen[Any]] = []
    real = pool._spawn

    def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        process = real(argv, env)
        os.kill(process.pid, signal.SIGSTOP)
        started.append(process)
        return process

    monkeypatch.setattr(pool, "_spawn", spawn)
    source = write_files(tmp_path / "src", 600)
    store = open_store(f"file://{tmp_path / 'store'}")
    digest = store.import_directory(source, stat_cache=False, jobs=1)
    helpers_from(1)
    store.checkout(digest, tmp_path / "out", jobs=2)
    assert len(started) == 1
    assert describe_tree(tmp_path / "out") == describe_tree(source)
    assert_gone(started)  # stopped (killed: it had no work) when the checkout ended


def test_checkout_threads_run_tasks_in_order_and_skip_the_rest_when_cancelled(
    local_store: Store,
) -> None:
    runner = pool.CheckoutThreads(local_store.verified, 1)
    go, started = threading.Event(), threading.Event()
    ran: list[int] = []

    def task(store: Any, n: int) -> int:
        assert store is local_store.verified
        if n == 0:
            started.set()
            go.wait(HANG_GUARD)
        if n == 2:
            raise FileNotFoundError(errno.ENOENT, "gone", "x")
        ran.append(n)
        return n * 10

    try:
        first = [runner.submit(task, n) for n in range(4)]
        go.set()
        assert first[0].result() == 0 and first[1].result() == 10
        with pytest.raises(FileNotFoundError, match="gone"):
            first[2].result()
        assert first[3].result() == 30  # an error stops nothing by itself

        go.clear()
        started.clear()
        blocked = runner.submit(task, 0)
        queued = [runner.submit(task, n) for n in (5, 6)]
        started.wait(HANG_GUARD)
        runner.cancel()  # as shutdown(cancel=True) does, while a task runs and two wait
        go.set()
        assert blocked.result() == 0
        for pending in queued:
            with pytest.raises(WorkerError, match="checkout cancelled"):
                pending.result()
    finally:
        runner.shutdown(cancel=True)
    assert ran == [0, 1, 3, 0]
    assert checkout_threads() == []


# -- failures ---------------------------------------------------------------------------------


def test_a_checkout_starts_its_helpers_while_reading_and_stops_them_for_a_refused_tree(
    tmp_path: Path,
    helpers_from: Any,
    spawned: list[subprocess.Popen[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = write_files(tmp_path / "src", 200)
    store = open_store(f"file://{tmp_path / 'store'}")
    digest = store.import_directory(source, stat_cache=False, jobs=1)
    helpers_from(50)
    started_before_measuring: list[int] = []
    measure = casframe.tree.measure_listings

    def measure_listings(*args: Any) -> Any:
        started_before_measuring.append(len(spawned))
        return measure(*args)

    monkeypatch.setattr(casframe.tree, "measure_listings", measure_listings)
    store.checkout(digest, tmp_path / "out", link=False, jobs=2)
    assert started_before_measuring == [2]  # started by the Directories read so far
    assert describe_tree(tmp_path / "out") == describe_tree(source)

    with pytest.raises(TreeTooLargeError):
        store.checkout(digest, tmp_path / "refused", link=False, jobs=2, max_tree_entries=100)
    assert started_before_measuring == [2, 4]
    assert not (tmp_path / "refused").exists()
    assert_gone(spawned)


@pytest.mark.parametrize("link", [True, False], ids=["links", "copies"])
def test_an_error_in_a_batch_fails_the_checkout_and_removes_what_it_wrote(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]], link: bool,
) -> None:
    source = write_files(tmp_path / "src", 200)
    store = open_store(f"file://{tmp_path / 'store'}")
    digest = store.import_directory(source, stat_cache=False, jobs=1)
    damaged = Digest.of_bytes((source / "d1" / "e1" / "f1").read_bytes())
    path = store.blobs.object_path(damaged)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(3)
    helpers_from(1)
    with pytest.raises(CorruptBlobError) as raised:
        store.checkout(digest, tmp_path / "out", link=link, jobs=2)
    if link:  # the size is checked before the object is linked
        assert str(raised.value) == f"corrupt blob {damaged}: stored object has 3 bytes"
    assert raised.value.digest == damaged
    assert not (tmp_path / "out").exists()
    assert len(spawned) == (1 if link else 2)  # links: this process and one helper
    assert_gone(spawned)


def test_a_crashing_helper_is_a_worker_error_and_leaves_the_store_sound(
    tmp_path: Path, helpers_from: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first helper dies (SIGKILL) as soon as it starts; the second is stopped, so the
    import cannot finish without the first."""
    started: list[subprocess.Popen[Any]] = []
    real = pool._spawn

    def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        process = real(argv, env)
        os.kill(process.pid, signal.SIGSTOP if started else signal.SIGKILL)
        started.append(process)
        return process

    monkeypatch.setattr(pool, "_spawn", spawn)
    source = write_files(tmp_path / "src", 600)
    store = open_store(f"file://{tmp_path / 'store'}")
    helpers_from(1)
    with pytest.raises(WorkerError) as raised:
        store.import_directory(source, stat_cache=False, jobs=2)
    assert re.fullmatch(
        rf"helper process {started[0].pid} was killed by signal 9 in the middle of its work",
        str(raised.value),
    )
    assert_gone(started)
    report = store.fsck()
    assert report.ok and not report.incomplete_refs
    assert os.listdir(tmp_path / "store" / "tmp") == []
    assert store.list_refs() == []


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):  # a zombie has exited; nobody may be left to reap it
            alive.append(pid)
    return alive


def _wait_until_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while _pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_alive(pids) == []


def _start_child(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    source = write_files(tmp_path / "src", 2000)
    child = subprocess.Popen(
        [sys.executable, str(HERE / "worker_child.py"), str(tmp_path / "store"), str(source),
         mode],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert child.stdout is not None
    pids = []
    for _ in range(2):
        line = child.stdout.readline()
        assert line.startswith("helper "), line
        pids.append(int(line.split()[1]))
    return child, pids


def test_helpers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    child, helpers = _start_child(tmp_path, "stop-self")
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)  # the parent stopped itself with both helpers alive
        assert _pids_alive(helpers) == helpers
        child.kill()
        child.wait(timeout=HANG_GUARD)
    finally:
        child.kill()
    _wait_until_gone(helpers)
    report = open_store(f"file://{tmp_path / 'store'}").fsck()
    assert report.ok


def test_ctrl_c_stops_the_helpers(tmp_path: Path) -> None:
    child, helpers = _start_child(tmp_path, "stop-helpers")
    try:
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = child.communicate(timeout=HANG_GUARD)
    finally:
        child.kill()
    assert out.strip().splitlines()[-1] == "interrupted, 0 helpers running"
    assert child.returncode == 130
    _wait_until_gone(helpers)
    assert open_store(f"file://{tmp_path / 'store'}").fsck().ok


def test_helpers_open_the_very_store_whatever_its_path_and_options(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]]
) -> None:
    source = write_files(tmp_path / "src", 50)
    root = tmp_path / "a store ü %20 #?"
    store = open_store(f"file://{quote(str(root))}?fsync=true")
    assert store.blobs.root == str(root)
    assert store.blobs.worker_spec() == (
        "casframe_local.store:open_local_store", f"file://{quote(str(root))}?fsync=true"
    )
    helpers_from(1)
    digest = store.import_directory(source, stat_cache=False, jobs=2)
    assert len(spawned) == 2
    assert missing_in_tree(store, digest) == set()
    assert sorted(os.listdir(tmp_path)) == ["a store ü %20 #?", "src"]


@pytest.mark.parametrize("function", ["blake3", "sha512"])
def test_helpers_hash_with_the_function_of_the_store_they_serve(
    tmp_path: Path, helpers_from: Any, spawned: list[subprocess.Popen[Any]], function: str
) -> None:
    source = write_files(tmp_path / "src", 300, large=2)
    with open_store("memory://", digest_function=function) as alone:
        expected = alone.import_directory(source, stat_cache=False, jobs=1)
    helpers_from(100)
    with open_store(f"file://{tmp_path / 'store'}?digest_function={function}") as helped:
        assert helped.import_directory(source, stat_cache=False, jobs=2) == expected
        assert len(spawned) == 2
        assert len(expected.hash) == helped.digest_function.hex_length
        helped.checkout(expected, tmp_path / "out", jobs=2)
    assert describe_tree(tmp_path / "out") == describe_tree(source)
    # What the helpers stored is the function's store; no SHA-256 store was even made.
    assert (tmp_path / "store" / "digest" / function / "objects").is_dir()
    assert sorted(os.listdir(tmp_path / "store")) == ["digest"]


def test_stopping_helpers_waits_for_their_exit_without_polling(
    local_store: Store, tmp_path: Path, spawned: list[subprocess.Popen[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shutting a pool down waits on each helper's pidfd: ``Popen.wait`` with a timeout
    polls, sleeping up to 50 ms between looks, which a whole `casframe checkout` paid."""
    (tmp_path / "a").write_bytes(b"hello")
    workers = pool.WorkerPool(*local_store.blobs.worker_spec(), jobs=2)
    try:
        workers.submit(import_files, [str(tmp_path / "a")]).result()
    finally:
        slept: list[float] = []
        monkeypatch.setattr(subprocess.time, "sleep", slept.append)  # what Popen.wait polls with
        workers.shutdown(cancel=False)
        monkeypatch.undo()
    assert slept == []
    assert len(spawned) == 2
    assert_gone(spawned)
