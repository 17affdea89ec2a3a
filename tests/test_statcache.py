"""The import's stat cache: unchanged files are not read again, and nothing else is trusted.

A file counts as read when the import opens it (``casframe.workers.tasks.open_regular``); the
tests count those opens. Each test keeps its cache files in its own folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import casframe.statcache
import casframe.treeimport
import casframe.workers.tasks
from casframe import Digest, Store
from casframe.statcache import StatCache, open_stat_cache
from casframe.testing import TREE_FILES, write_tree
from casframe.tree import missing_in_tree

#: Files of write_tree that have content (the empty one needs no blob).
STORED_FILES = sorted(rel for rel, content in TREE_FILES.items() if content)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "stat-cache"


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the import opens to read, in any order; cleared by the test as it goes."""
    paths: list[str] = []
    original = casframe.workers.tasks.open_regular

    def counting(path: str) -> tuple[int, os.stat_result]:
        paths.append(path)
        return original(path)

    monkeypatch.setattr(casframe.workers.tasks, "open_regular", counting)
    return paths


@pytest.fixture
def no_window(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Trust files written up to the start of the import (the real window is 2 s).

    Returns a function that waits until files written so far are older than "now", so that
    the next import may record them; the coarsest clock of the test machine's file systems
    is far finer than the wait.
    """
    monkeypatch.setattr(casframe.statcache, "TIMESTAMP_WINDOW_NS", 0)
    return lambda: time.sleep(0.05)


@pytest.fixture
def imported(
    local_store: Store, tmp_path: Path, cache_dir: Path, no_window: Callable[[], None],
    opened: list[str],
) -> tuple[Path, Digest]:
    """write_tree's tree, imported once (every file remembered): its root and digest.

    ``opened`` then lists every file of the tree.
    """
    root = write_tree(tmp_path / "src")
    no_window()
    return root, local_store.import_directory(root, stat_cache=cache_dir)


def rel_paths(root: Path, paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in paths)


def all_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    )


def test_unchanged_files_are_not_read_again(
    local_store: Store, tmp_path: Path, cache_dir: Path, opened: list[str],
    imported: tuple[Path, Digest],
) -> None:
    root, first = imported
    assert rel_paths(root, opened) == all_files(root)
    assert len(list(cache_dir.iterdir())) == 1, "one cache file for the imported directory"
    opened.clear()
    assert local_store.import_directory(root, stat_cache=cache_dir) == first
    assert opened == []
    # A file's digest is a property of its content: the cache serves another store as well,
    # and since that store has none of the blobs, every file is read and stored there.
    with casframe.open_store(f"file://{tmp_path / 'other'}") as other:
        assert other.import_directory(root, stat_cache=cache_dir) == first
        assert rel_paths(root, opened) == STORED_FILES
        assert missing_in_tree(other.verified, first) == set()


def test_a_reimport_of_unchanged_files_starts_no_runner(
    local_store: Store, cache_dir: Path, opened: list[str], imported: tuple[Path, Digest],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every file remembered and present there is nothing to read: no thread pool or
    helper process is started (their start-up was most of what a small re-import cost
    beyond the lookups), and the store is still asked about every remembered blob."""
    root, first = imported
    runners: list[int] = []
    original = casframe.treeimport.open_runner

    def watched(*args: object, **kwargs: object) -> object:
        runners.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(casframe.treeimport, "open_runner", watched)
    asked: list[Digest] = []
    freshen = type(local_store.verified.backend).freshen_blobs

    def counting(self: object, digests: list[Digest]) -> set[Digest]:
        asked.extend(digests)
        return freshen(self, digests)  # type: ignore[arg-type]

    monkeypatch.setattr(type(local_store.verified.backend), "freshen_blobs", counting)
    opened.clear()
    assert local_store.import_directory(root, stat_cache=cache_dir, jobs=2) == first
    assert opened == [] and runners == []
    stored = {Digest.of_bytes(content) for content in TREE_FILES.values() if content}
    assert stored <= set(asked)
    # A file that changed is read again, by a runner started for it.
    (root / STORED_FILES[0]).write_bytes(b"changed content")
    assert local_store.import_directory(root, stat_cache=cache_dir, jobs=2) != first
    assert rel_paths(root, opened) == [STORED_FILES[0]] and runners == [1]


def _same_size_new_content(path: Path) -> None:
    """Rewrite ``path`` in place with other bytes of the same size; put its mtime back."""
    before = path.stat()
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _longer(path: Path) -> None:
    before = path.stat()
    with open(path, "ab") as f:
        f.write(b"more")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _new_inode(path: Path) -> None:
    """Replace ``path`` by another file of the same size and mtime (another inode)."""
    before = path.stat()
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    os.utime(temp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(temp, path)
    assert path.stat().st_ino != before.st_ino


@pytest.mark.parametrize(
    "change", [_same_size_new_content, _longer, _new_inode], ids=["ctime", "size", "inode"]
)
def test_a_changed_file_is_read_again(
    local_store: Store, cache_dir: Path, opened: list[str], imported: tuple[Path, Digest],
    change: Callable[[Path], None],
) -> None:
    root, _ = imported
    change(root / "src/pkg/module.py")
    opened.clear()
    tree = local_store.import_directory(root, stat_cache=cache_dir)
    assert rel_paths(root, opened) == ["src/pkg/module.py"]
    assert tree == local_store.import_directory(root, stat_cache=False), "the new content"
    entry = {e.path: e for e in local_store.walk(tree)}["src/pkg/module.py"]
    assert entry.digest == Digest.of_file(root / "src/pkg/module.py")


def test_a_racy_file_is_not_remembered(
    local_store: Store, tmp_path: Path, cache_dir: Path, opened: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file written within the time-stamp window before an import is read by the next one.

    Its time stamps could still hide a change made after the import read it: on a file
    system with coarse time stamps, a write in the same tick leaves them as they were.
    """
    window_ns = 100_000_000
    monkeypatch.setattr(casframe.statcache, "TIMESTAMP_WINDOW_NS", window_ns)
    root = write_tree(tmp_path / "src")
    time.sleep(0.3)  # the tree's time stamps fall well outside the window...
    fresh = root / "fresh.txt"
    fresh.write_bytes(b"written just before the import")
    # ...and the imports start at once, by the import's clock, however slow this machine is.
    now = fresh.stat().st_ctime_ns + 1
    monkeypatch.setattr(casframe.treeimport, "time", SimpleNamespace(time_ns=lambda: now))
    local_store.import_directory(root, stat_cache=cache_dir)
    opened.clear()
    local_store.import_directory(root, stat_cache=cache_dir)
    assert rel_paths(root, opened) == ["fresh.txt"]
    # Read again long after it was written, it is remembered from then on.
    now += 2 * window_ns
    local_store.import_directory(root, stat_cache=cache_dir)
    opened.clear()
    local_store.import_directory(root, stat_cache=cache_dir)
    assert opened == []


def test_the_real_window_covers_files_written_just_before(
    local_store: Store, tmp_path: Path, cache_dir: Path, opened: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = write_tree(tmp_path / "src")
    # By the import's clock, the imports start 1.9 s after the first file was written.
    oldest = min(p.lstat().st_ctime_ns for p in root.rglob("*"))
    clock = SimpleNamespace(time_ns=lambda: oldest + 1_900_000_000)
    monkeypatch.setattr(casframe.treeimport, "time", clock)
    local_store.import_directory(root, stat_cache=cache_dir)
    opened.clear()
    local_store.import_directory(root, stat_cache=cache_dir)
    assert rel_paths(root, opened) == all_files(root)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _flip_a_byte,
        lambda p: p.write_bytes(p.read_bytes()[:-40]),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"not a cache file at all" * 10),
        lambda p: (p.unlink(), p.mkdir()),
    ],
    ids=["flipped-byte", "truncated", "empty", "garbage", "a-directory"],
)
def test_a_damaged_cache_is_ignored_and_rebuilt(
    local_store: Store, cache_dir: Path, opened: list[str], imported: tuple[Path, Digest],
    damage: Callable[[Path], object],
) -> None:
    root, first = imported
    (cache_file,) = cache_dir.iterdir()
    damage(cache_file)
    opened.clear()
    assert local_store.import_directory(root, stat_cache=cache_dir) == first
    assert rel_paths(root, opened) == all_files(root)
    if cache_file.is_dir():
        assert list(cache_dir.iterdir()) == [cache_file], "no temp file left behind"
        return  # cannot be replaced; the import still succeeded
    opened.clear()
    assert local_store.import_directory(root, stat_cache=cache_dir) == first
    assert opened == [], "the damaged file was replaced by a good one"


def test_a_remembered_digest_missing_from_the_store_is_stored_again(
    local_store: Store, tmp_path: Path, cache_dir: Path, opened: list[str],
    no_window: Callable[[], None],
) -> None:
    root = write_tree(tmp_path / "src", large=True)
    no_window()
    tree = local_store.import_directory(root, stat_cache=cache_dir)
    small = Digest.of_bytes(TREE_FILES["src/pkg/module.py"])
    large = Digest.of_file(root / "big/large.bin")
    local_store.blobs.delete_blobs([small, large])  # as a prune would
    assert missing_in_tree(local_store.verified, tree) == {small, large}
    opened.clear()
    assert local_store.import_directory(root, stat_cache=cache_dir) == tree
    # A large file met among others is opened to see its size, then stored by a task of its
    # own: opened twice, read once.
    assert sorted(set(rel_paths(root, opened))) == ["big/large.bin", "src/pkg/module.py"]
    assert missing_in_tree(local_store.verified, tree) == set()


def test_a_remembered_file_changed_while_its_blob_was_missing(
    local_store: Store, cache_dir: Path, imported: tuple[Path, Digest]
) -> None:
    """The digest stored and put in the tree is that of what the file holds when read."""
    root, _ = imported
    module = root / "src/pkg/module.py"
    old = Digest.of_file(module)
    local_store.blobs.delete_blobs([old])
    cache = open_stat_cache(str(root), str(cache_dir))
    st = module.stat()
    assert cache.lookup(st) == old.hash
    # Another content under the very same key: what a wrong entry would look like.
    module.write_bytes(b"def answer():\n    return 43\n")
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    forged = StatCache(cache.path)
    forged.seen += StatCache.key(module.stat()) + bytes.fromhex(old.hash)
    forged.save()
    tree = local_store.import_directory(root, stat_cache=cache_dir)
    entry = {e.path: e for e in local_store.walk(tree)}["src/pkg/module.py"]
    assert entry.digest == Digest.of_file(module)
    assert missing_in_tree(local_store.verified, tree) == set()


def test_the_cache_can_be_switched_off(
    local_store: Store, tmp_path: Path, cache_dir: Path, opened: list[str],
    no_window: Callable[[], None], monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = write_tree(tmp_path / "src")
    no_window()
    for _ in range(2):
        local_store.import_directory(root, stat_cache=False)
    assert not cache_dir.exists()
    monkeypatch.setenv("CASFRAME_STAT_CACHE", "off")
    opened.clear()
    for _ in range(2):
        local_store.import_directory(root)
    assert sorted(rel_paths(root, opened)) == sorted(all_files(root) * 2)
    monkeypatch.setenv("CASFRAME_STAT_CACHE", str(cache_dir))
    local_store.import_directory(root)
    opened.clear()
    local_store.import_directory(root)
    assert opened == []
    assert len(list(cache_dir.iterdir())) == 1


def test_old_and_surplus_cache_files_are_removed(
    local_store: Store, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(casframe.statcache, "MAX_FILES", 3)
    roots = [write_tree(tmp_path / f"src{i}") for i in range(5)]
    for root in roots:
        local_store.import_directory(root, stat_cache=cache_dir)
    assert len([p for p in cache_dir.iterdir() if p.suffix == ".stat"]) == 3
    # A temp file left by a save that was killed, and a cache file unused for long.
    stale_temp = cache_dir / "0123.stat.999.1.tmp"
    stale_temp.write_bytes(b"half a cache")
    old = time.time() - casframe.statcache.MAX_AGE_S - 60
    os.utime(stale_temp, (old, old))
    current = Path(open_stat_cache(str(roots[-1]), str(cache_dir)).path)
    oldest = next(p for p in cache_dir.iterdir() if p.suffix == ".stat" and p != current)
    os.utime(oldest, (old, old))
    local_store.import_directory(roots[-1], stat_cache=cache_dir)
    assert not stale_temp.exists()
    assert not oldest.exists()


def test_hardlinked_names_of_one_file_are_both_remembered(
    local_store: Store, tmp_path: Path, cache_dir: Path, opened: list[str],
    no_window: Callable[[], None],
) -> None:
    root = write_tree(tmp_path / "src")
    os.link(root / "README.txt", root / "docs" / "README-link.txt")
    no_window()
    tree = local_store.import_directory(root, stat_cache=cache_dir)
    opened.clear()
    assert local_store.import_directory(root, stat_cache=cache_dir) == tree
    assert opened == []
