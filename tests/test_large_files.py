"""Large files into a ``file://`` store: copied in the kernel window by window while the core
hashes the windows already copied, and several of them at once in an import.

What must hold whatever the timing: a blob is visible only under the digest of the bytes
stored (the file may change while it is copied), a failed copy leaves nothing behind (no
object, no temp file, no thread), and an import gives the same tree whether its large files
are stored one at a time or together.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import casframe_local._copy as local_copy
import pytest

import casframe.digest as casframe_digest
from casframe import CasframeError, Digest, DigestFunction, Store, open_store
from casframe.digestfunctions import BLAKE3
from casframe.testing import random_bytes

WINDOW = local_copy.WINDOW
# Seconds a test waits for the other side of a hand-over before it fails: never reached when
# the code works (the hand-over is immediate), it turns a deadlock into a failure.
HANG_GUARD_S = 30


@pytest.fixture(params=["sha256", "blake3"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    with open_store(f"file://{tmp_path / 'store'}", digest_function=request.param) as s:
        yield s


def copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "casframe-copy"]


def nothing_stored(store: Store) -> None:
    assert list(store.blobs.iter_blobs()) == []
    assert os.listdir(store.blobs.tmpdir) == []  # type: ignore[attr-defined]
    assert copy_threads() == []


def on_copy_call(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[int], None]
) -> list[tuple[int, int]]:
    """Call ``before(n)`` ahead of the n-th ``copy_file_range`` (from 0) of the copy path;
    returns the (count, source offset) of each call."""
    calls: list[tuple[int, int]] = []
    real = os.copy_file_range

    def copy_file_range(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        before(len(calls))
        calls.append((count, offset_src))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(local_copy.os, "copy_file_range", copy_file_range)
    return calls


def test_each_window_is_hashed_while_the_next_is_copied(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second window's copy waits until the core asked for it, which it does only once it
    # hashed the first window: a copy that ran to its end before hashing began would wait
    # in vain here.
    data = random_bytes(2 * WINDOW + 12345, seed=1)
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    asked = threading.Event()
    wait_copied = local_copy.KernelCopy.wait_copied

    def recording_wait(self: local_copy.KernelCopy, end: int) -> int:
        if end > WINDOW:
            asked.set()
        return wait_copied(self, end)

    def before(n: int) -> None:
        if n == 1:
            assert asked.wait(HANG_GUARD_S), "the copy went on before the first window was hashed"

    monkeypatch.setattr(local_copy.KernelCopy, "wait_copied", recording_wait)
    calls = on_copy_call(monkeypatch, before)
    digest = store.put_file(path)
    assert digest == Digest.of_bytes(data, store.digest_function)
    assert store.read_bytes(digest) == data
    assert [offset for _, offset in calls] == [0, WINDOW, 2 * WINDOW, len(data)]
    assert copy_threads() == []


@pytest.mark.parametrize("change", ["rewrite", "truncate", "append"])
def test_a_file_changed_during_its_copy_is_stored_as_copied(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    # The file changes after its first window was copied: what is stored is what the copy
    # holds (old first window, the rest as it is now), under the digest of those bytes.
    data = random_bytes(3 * WINDOW, seed=2)
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    tail = random_bytes(WINDOW // 2, seed=3)

    def before(n: int) -> None:
        if n != 1:
            return
        with open(path, "r+b") as f:
            if change == "rewrite":
                f.seek(2 * WINDOW)
                f.write(tail)
            elif change == "truncate":
                f.truncate(WINDOW + 100)
            else:
                f.seek(0, os.SEEK_END)
                f.write(tail)

    on_copy_call(monkeypatch, before)
    digest = store.put_file(path)
    now = path.read_bytes()
    assert now != data
    stored = data[:WINDOW] + now[WINDOW:]  # the first window was copied before the change
    assert digest == Digest.of_bytes(stored, store.digest_function)
    assert store.read_bytes(digest) == stored
    assert os.path.getsize(store.blobs.local_path(digest)) == len(stored)
    original = Digest.of_bytes(data, store.digest_function)
    assert store.find_missing([original]) == {original}
    assert [i.digest for i in store.blobs.iter_blobs()] == [digest]


def test_a_copy_failing_midway_leaves_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "large.bin"
    path.write_bytes(random_bytes(3 * WINDOW, seed=4))

    def before(n: int) -> None:
        if n == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    on_copy_call(monkeypatch, before)
    with pytest.raises(OSError, match="No space left"):
        store.put_file(path)
    nothing_stored(store)
    (tmp_path / "tree").mkdir()
    path.rename(tmp_path / "tree" / "large.bin")
    with pytest.raises(OSError, match="No space left"):
        store.import_directory(tmp_path / "tree", stat_cache=False)
    nothing_stored(store)


def test_hashing_failing_midway_stops_the_copy_and_leaves_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reader gives up after the first window (as on Ctrl-C): the upload is aborted, its
    # copy stopped before the temp file is closed.
    path = tmp_path / "large.bin"
    path.write_bytes(random_bytes(4 * WINDOW, seed=5))
    wait_copied = local_copy.KernelCopy.wait_copied

    def interrupted(self: local_copy.KernelCopy, end: int) -> int:
        if end > WINDOW:
            raise KeyboardInterrupt
        return wait_copied(self, end)

    monkeypatch.setattr(local_copy.KernelCopy, "wait_copied", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put_file(path)
    nothing_stored(store)


def test_an_aborted_copy_is_not_taken_for_a_whole_file(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An upload aborted while its copy goes on: what was copied so far is not the file, and a
    # reader waiting for more gets an error instead of an end.
    path = tmp_path / "large.bin"
    path.write_bytes(random_bytes(3 * WINDOW, seed=7))
    stopping = threading.Event()
    stop = local_copy.KernelCopy.stop

    def signalled_stop(self: local_copy.KernelCopy) -> None:
        stopping.set()
        stop(self)

    def before(n: int) -> None:
        if n == 1:
            assert stopping.wait(HANG_GUARD_S)

    monkeypatch.setattr(local_copy.KernelCopy, "stop", signalled_stop)
    on_copy_call(monkeypatch, before)
    with open(path, "rb") as f:
        writer, stored = store.blobs.begin_write_copy(f.fileno())
        writer.abort()
        with stored, pytest.raises(CasframeError, match="the copy was stopped, its upload aborted"):
            stored.wait_copied(3 * WINDOW)  # type: ignore[attr-defined]
    nothing_stored(store)


def test_a_file_of_one_window_is_copied_without_a_thread(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def recording_start(self: threading.Thread) -> None:
        started.append(self)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    data = random_bytes(WINDOW - 1, seed=6)
    path = tmp_path / "one-window.bin"
    path.write_bytes(data)
    assert store.put_file(path) == Digest.of_bytes(data, store.digest_function)
    assert [t.name for t in started] == []


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_the_kernel_cannot_copy_is_read_and_stored(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # copy_file_range refuses (another file system, an old kernel, a file system without
    # it): the file is read and streamed instead, and stored under its digest all the same.
    data = random_bytes(2 * WINDOW + 999, seed=20)
    path = tmp_path / "large.bin"
    path.write_bytes(data)

    def before(n: int) -> None:
        raise OSError(code, os.strerror(code))

    calls = on_copy_call(monkeypatch, before)
    digest = store.put_file(path)
    assert calls == []  # refused at the first call
    assert digest == Digest.of_bytes(data, store.digest_function)
    assert store.read_bytes(digest) == data
    assert os.listdir(store.blobs.tmpdir) == []  # type: ignore[attr-defined]
    assert copy_threads() == []


def test_a_copy_on_a_file_system_without_shared_maps_is_hashed_by_reading(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store's temp file cannot be mapped (some FUSE file systems refuse with ENODEV):
    # each window the copy filled is read and hashed instead, and the file is stored.
    data = random_bytes(2 * WINDOW + 4321, seed=21)
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    maps: list[int] = []

    def no_map(*args: object, **kwargs: object) -> None:
        maps.append(1)
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(casframe_digest.mmap, "mmap", no_map)
    digest = store.put_file(path)
    assert len(maps) == 3  # each window was tried
    assert digest == Digest.of_bytes(data, store.digest_function)
    assert store.read_bytes(digest) == data
    assert copy_threads() == []


def test_blake3_uses_its_own_threads_only_for_a_file_hashed_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file hashed in place while another is hashes on one thread (the files already share
    # the cores); one hashed alone spreads over BLAKE3's threads.
    threaded_calls: list[bool] = []

    class Recording(casframe_digest.Hasher):
        __slots__ = ()

        def __init__(self, function: DigestFunction, *, threaded: bool = False) -> None:
            threaded_calls.append(threaded)
            super().__init__(function, threaded=threaded)

    monkeypatch.setattr(casframe_digest, "Hasher", Recording)
    first, second = random_bytes(WINDOW + 77, seed=22), random_bytes(WINDOW // 3, seed=23)
    (tmp_path / "first").write_bytes(first)
    (tmp_path / "second").write_bytes(second)
    inside, go = threading.Event(), threading.Event()
    digests: list[Digest] = []

    def arriving(end: int) -> int:
        inside.set()
        assert go.wait(HANG_GUARD_S), "the second file was not hashed"
        return min(end, len(first))

    with open(tmp_path / "first", "rb") as f1, open(tmp_path / "second", "rb") as f2:
        hashing = threading.Thread(
            target=lambda: digests.append(
                Digest.of_own_file(f1.fileno(), BLAKE3, arriving=arriving)
            )
        )
        hashing.start()
        try:
            assert inside.wait(HANG_GUARD_S)
            assert Digest.of_own_file(f2.fileno(), BLAKE3) == Digest.of_bytes(second, BLAKE3)
        finally:
            go.set()
            hashing.join()
        assert digests == [Digest.of_bytes(first, BLAKE3)]
        assert Digest.of_own_file(f2.fileno(), BLAKE3) == Digest.of_bytes(second, BLAKE3)
    assert threaded_calls == [True, False, True]  # alone, beside the first, alone again


def large_tree(root: Path) -> None:
    for i in range(4):
        folder = root / f"d{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"large{i}.bin").write_bytes(random_bytes(WINDOW + 1000 * i, seed=10 + i))
        (folder / f"small{i}.txt").write_bytes(b"small %d" % i)
    (root / "d0" / "same.bin").write_bytes(random_bytes(WINDOW + 1000, seed=11))  # = large1


@pytest.mark.parametrize("jobs", [2, 3])
def test_large_files_stored_together_give_the_tree_stored_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    large_tree(tmp_path / "tree")
    with open_store(f"file://{tmp_path / 'one'}") as one:
        alone = one.import_directory(tmp_path / "tree", jobs=1, stat_cache=False)
    # The first two large files wait for each other: stored one after the other, they would
    # break the barrier instead.
    together = threading.Barrier(2, timeout=HANG_GUARD_S)
    seen: list[int] = []
    real = local_copy.KernelCopy.begin

    def begin(self: local_copy.KernelCopy) -> None:
        seen.append(1)
        if len(seen) <= 2:
            together.wait()
        real(self)

    monkeypatch.setattr(local_copy.KernelCopy, "begin", begin)
    with open_store(f"file://{tmp_path / 'all'}") as store:
        assert store.import_directory(tmp_path / "tree", jobs=jobs, stat_cache=False) == alone
        assert len(seen) == 5
        with open_store(f"file://{tmp_path / 'one'}") as one:
            assert sorted(i.digest for i in store.blobs.iter_blobs()) == sorted(
                i.digest for i in one.blobs.iter_blobs()
            )
    assert copy_threads() == []
