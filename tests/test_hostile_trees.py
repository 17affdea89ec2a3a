"""Hostile trees: fan-out bombs, byte bombs and file names the file system refuses.

Trees are built by hand (``Store.put_directory``), as a hostile or broken writer would store
them, bypassing import. A bomb is only ever expanded in a subprocess with a time-out as a hang
guard, so that code which tries to expand it fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from casframe import (
    BlobNotFoundError,
    CheckoutError,
    ConfigError,
    Digest,
    InvalidDigestError,
    Store,
    TreeTooLargeError,
    UnsafeTreeError,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestMessage,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)
from casframe.cli import make_cli
from casframe.testing import assert_tree_equal

# A generous guard against a hang: the refusal itself takes milliseconds.
HANG_GUARD = 120
# The bomb of the report: 1,000 entries all naming one child, ten levels deep.
FANOUT, DEPTH = 1000, 10
# Every path of the bomb: 1000 + 1000^2 + ... + 1000^10, plus one file in each deepest directory.
BOMB_ENTRIES = sum(FANOUT**level for level in range(1, DEPTH + 1)) + FANOUT**DEPTH
LONG_NAME = "a" * 296 + ".txt"  # 300 bytes: over the 255 bytes of ext4, xfs, btrfs, tmpfs


def fan_out(store: Store, child: Digest, fanout: int, depth: int) -> Digest:
    """A tree whose every level names ``child``'s level ``fanout`` times."""
    for _ in range(depth):
        child = store.put_directory(
            Directory(
                directories=[
                    DirectoryNode(name=f"d{i:04}", digest=child.to_proto()) for i in range(fanout)
                ]
            )
        )
    return child


def one_file(store: Store, content: bytes = b"x", name: str = "f") -> Digest:
    digest = store.put_bytes(content)
    return store.put_directory(Directory(files=[FileNode(name=name, digest=digest.to_proto())]))


@pytest.fixture
def bomb_store(tmp_path: Path) -> tuple[str, Digest, Digest]:
    """A ``file://`` store holding the bomb (ref ``bomb``) and a twin differing in its leaf."""
    url = f"file://{tmp_path / 'store'}"
    with open_store(url) as store:
        bomb = fan_out(store, one_file(store, b"x"), FANOUT, DEPTH)
        twin = fan_out(store, one_file(store, b"y"), FANOUT, DEPTH)
        store.set_ref("bomb", bomb, check_complete=False)
        store.set_ref("twin", twin, check_complete=False)
    return url, bomb, twin


def casframe(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line in a subprocess, with the hang guard."""
    console = os.path.join(os.path.dirname(sys.executable), "casframe")
    return subprocess.run([console, *args], capture_output=True, text=True, timeout=HANG_GUARD)


# -- fan-out bombs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["checkout", "bomb", "{dest}"],
        ["checkout", "--copy", "bomb", "{dest}"],
        ["ls", "-r", "bomb"],
        ["ls", "-r", "--json", "bomb", "d0000/d0001"],
        ["diff", "bomb", "twin"],
        ["diff", "--json", "twin", "bomb"],
    ],
)
def test_a_fan_out_bomb_is_refused_with_its_size(
    bomb_store: tuple[str, Digest, Digest], tmp_path: Path, command: list[str]
) -> None:
    url, bomb, twin = bomb_store
    dest = tmp_path / "dest"
    result = casframe("--store", url, *[arg.format(dest=dest) for arg in command])
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith("casframe: error: ")
    assert "over the limit of 10,000,000 (max_tree_entries)" in error
    if command[0] == "checkout":
        assert f"tree {bomb} expands to {BOMB_ENTRIES:,} entries" in error
        assert not dest.exists()
    elif command[0] == "diff":
        assert "the diff of " in error and " entries, over the limit" in error
    else:
        assert " entries, over the limit" in error


def test_the_bomb_is_refused_before_any_work_through_the_api(
    bomb_store: tuple[str, Digest, Digest], tmp_path: Path
) -> None:
    """Run in a subprocess under the hang guard. How long the refusal takes is not asserted
    (a busy machine may stretch it); what makes it fast is: each distinct Directory is read
    once (``test_ls_r_reads_each_distinct_directory_once``), and nothing is written."""
    url, bomb, _ = bomb_store
    script = f"""
import json
from casframe import open_store, CasframeError
store = open_store({url!r})
out = {{}}
for name, call in [
    ("checkout", lambda: store.checkout("bomb", {str(tmp_path / "dest")!r})),
    ("walk", lambda: store.walk("bomb")),
    ("diff", lambda: store.diff("bomb", "twin")),
    ("iter_diff", lambda: store.iter_diff("bomb", "twin")),
]:
    try:
        call()
    except CasframeError as exc:
        out[name] = [exc.count, exc.limit, exc.setting, exc.reason]
print(json.dumps(out))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert set(outcome) == {"checkout", "walk", "diff", "iter_diff"}
    for count, limit, setting, reason in outcome.values():
        assert (limit, setting, reason) == (10_000_000, "max_tree_entries", "tree-too-large")
        assert count > limit
    assert outcome["checkout"][0] == outcome["walk"][0] == BOMB_ENTRIES
    assert not (tmp_path / "dest").exists()


def test_a_byte_bomb_is_refused_by_max_tree_bytes(local_store: Store, tmp_path: Path) -> None:
    """Few entries naming one large file many times: the bytes are what checkout would write."""
    tree = fan_out(local_store, one_file(local_store, b"z" * 4096), 4, 2)  # 16 × 4 KiB
    with pytest.raises(TreeTooLargeError) as caught:
        local_store.checkout(tree, tmp_path / "out", max_tree_bytes=60_000)
    assert str(caught.value) == (
        f"tree {tree} expands to 65,536 bytes, over the limit of 60,000 (max_tree_bytes); "
        "raise max_tree_bytes if the tree is genuine"
    )
    assert isinstance(caught.value, UnsafeTreeError)
    assert not (tmp_path / "out").exists()
    local_store.checkout(tree, tmp_path / "out", max_tree_bytes=65_536)
    assert len(list((tmp_path / "out").rglob("f"))) == 16


def test_the_limits_are_exact_and_repeated_subtrees_check_out(
    memory_store: Store, tmp_path: Path
) -> None:
    """The same subtree named many times (``node_modules`` twice, say) is a legitimate tree:
    it checks out and lists in full at a limit of exactly its size, and is refused one below."""
    leaf = memory_store.put_directory(
        Directory(
            files=[FileNode(name="index.js", digest=memory_store.put_bytes(b"js").to_proto())],
            symlinks=[SymlinkNode(name="link", target="index.js")],
        )
    )
    tree = fan_out(memory_store, leaf, 5, 3)  # 5 + 25 + 125 directories, 125 × 2 leaf entries
    size = 5 + 25 + 125 + 250
    assert len(list(memory_store.walk(tree, max_tree_entries=size))) == size
    with pytest.raises(TreeTooLargeError, match=f"expands to {size} entries, over the limit of "
                       f"{size - 1} "):
        memory_store.walk(tree, max_tree_entries=size - 1)
    with pytest.raises(TreeTooLargeError):
        memory_store.checkout(tree, tmp_path / "refused", max_tree_entries=size - 1)
    assert not (tmp_path / "refused").exists()
    memory_store.checkout(tree, tmp_path / "out", max_tree_entries=size)
    assert len(list((tmp_path / "out").rglob("*"))) == size
    assert (tmp_path / "out/d0004/d0000/d0003/index.js").read_bytes() == b"js"
    assert os.readlink(tmp_path / "out/d0002/d0002/d0002/link") == "index.js"

    changed = fan_out(memory_store, one_file(memory_store, b"js", "index.js"), 5, 3)
    changes = list(memory_store.iter_diff(tree, changed, max_tree_entries=size))
    assert len(changes) == 125 and changes == sorted(changes, key=lambda c: (c[1], c[0]))
    assert changes[0] == ("D", "d0000/d0000/d0000/link")
    with pytest.raises(TreeTooLargeError, match="the diff of"):
        memory_store.diff(tree, changed, max_tree_entries=124)


def test_node_modules_twice_checks_out_and_lists(local_store: Store, tmp_path: Path) -> None:
    source = tmp_path / "src"
    for app in ("app-a", "app-b"):
        modules = source / app / "node_modules" / "left-pad"
        modules.mkdir(parents=True)
        (modules / "index.js").write_text("module.exports = pad\n")
        (source / app / "main.js").write_text(f"// {app}\n")
    tree = local_store.import_directory(source)
    # app-a, app-b, and in each: main.js, node_modules, left-pad, index.js
    local_store.checkout(tree, tmp_path / "out", max_tree_entries=10)
    assert_tree_equal(source, tmp_path / "out")
    result = CliRunner().invoke(
        make_cli(), ["--store", local_store.url, "ls", "-r", str(tree), "--max-tree-entries", "9"]
    )
    assert result.exit_code == 1
    assert f"tree {tree} expands to 10 entries, over the limit of 9" in result.output


def test_ls_r_reads_each_distinct_directory_once(memory_store: Store) -> None:
    tree = fan_out(memory_store, one_file(memory_store), 30, 3)  # 27,930 entries, 4 Directories
    reads: list[Digest] = []
    blobs = memory_store.blobs
    original_open = blobs.open_blob

    def open_blob(digest: Digest, offset: int = 0):  # type: ignore[no-untyped-def]
        reads.append(digest)  # every read of the memory backend comes here
        return original_open(digest, offset)

    blobs.open_blob = open_blob  # type: ignore[method-assign]
    entries = sum(1 for _ in memory_store.walk(tree))
    assert entries == 30 + 900 + 27000 + 27000
    assert len(reads) == len(set(reads)) == 4


# -- the store option and the command options ----------------------------------------------------


def test_store_option_sets_the_limit_and_a_command_option_overrides_it(
    tmp_path: Path, make_tree
) -> None:
    url = f"file://{tmp_path / 'store'}?max_tree_entries=3"
    with open_store(url) as store:
        assert store.tree_limits.max_entries == 3
        tree = store.import_directory(make_tree())
        with pytest.raises(TreeTooLargeError, match=r"over the limit of 3 \(max_tree_entries\)"):
            store.checkout(tree, tmp_path / "out")
        store.checkout(tree, tmp_path / "out", max_tree_entries=1000)
    runner = CliRunner()
    refused = runner.invoke(make_cli(), ["--store", url, "ls", "-r", str(tree)])
    assert refused.exit_code == 1
    assert "over the limit of 3 (max_tree_entries)" in refused.output
    listed = runner.invoke(
        make_cli(), ["--store", url, "ls", "-r", str(tree), "--max-tree-entries", "100"]
    )
    assert listed.exit_code == 0, listed.output
    assert "src/pkg/module.py" in listed.output
    refused = runner.invoke(
        make_cli(),
        ["--store", url, "checkout", str(tree), str(tmp_path / "c"), "--max-tree-entries", "100",
         "--max-tree-bytes", "10"],
    )
    assert refused.exit_code == 1
    assert "over the limit of 10 (max_tree_bytes)" in refused.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("max_tree_entries=many", "option max_tree_entries='many' in {url} is not a count"),
        ("max_tree_entries=-1", "option max_tree_entries='-1' in {url} is not a count"),
        ("max_tree_bytes=lots", "option max_tree_bytes='lots' in {url} is not a size"),
    ],
)
def test_a_bad_limit_option_is_a_config_error(tmp_path: Path, query: str, message: str) -> None:
    url = f"memory://?{query}"
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert str(caught.value).startswith(message.format(url=url))


def test_limits_from_a_named_stores_options_table(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[stores.big]\nurl = "file://{tmp_path / "store"}"\n'
        '[stores.big.options]\nmax_tree_entries = 50000000\nmax_tree_bytes = "4T"\n'
    )
    monkeypatch.setenv("CASFRAME_CONFIG", str(config))
    from casframe.plugins import open_configured_store

    with open_configured_store("big") as store:
        assert store.tree_limits.max_entries == 50_000_000
        assert store.tree_limits.max_bytes == 4 << 40


# -- checkout failing part-way --------------------------------------------------------------------


def long_name_tree(store: Store) -> Digest:
    """``docs/`` with a good file, a 300-byte file name and another good file after it."""
    files = [
        FileNode(name=name, digest=store.put_bytes(content).to_proto(), is_executable=executable)
        for name, content, executable in [
            ("0-first.txt", b"first", False),
            (LONG_NAME, b"long", False),
            ("z-last.sh", b"#!/bin/sh\n", True),
        ]
    ]
    docs = store.put_directory(Directory(files=files))
    return store.put_directory(
        Directory(
            files=[FileNode(name="README", digest=store.put_bytes(b"readme").to_proto())],
            directories=[DirectoryNode(name="docs", digest=docs.to_proto())],
        )
    )


@pytest.mark.parametrize("link", [True, False])
def test_a_file_name_too_long_names_the_tree_path_and_removes_dest(
    local_store: Store, tmp_path: Path, link: bool
) -> None:
    tree = long_name_tree(local_store)
    dest = tmp_path / "out"
    with pytest.raises(CheckoutError) as caught:
        local_store.checkout(tree, dest, link=link)
    assert str(caught.value) == f"cannot check out 'docs/{LONG_NAME}': File name too long"
    assert caught.value.tree_path == f"docs/{LONG_NAME}"
    assert "objects" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert not dest.exists()


def test_a_failed_checkout_keeps_a_dest_that_existed_and_empties_it(
    local_store: Store, tmp_path: Path
) -> None:
    tree = long_name_tree(local_store)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(CheckoutError):
        local_store.checkout(tree, dest, link=False)
    assert dest.is_dir() and os.listdir(dest) == []
    assert sorted(os.listdir(tmp_path)) == ["out", "store"]


def test_the_cli_names_the_tree_path_of_a_file_name_too_long(
    local_store: Store, tmp_path: Path
) -> None:
    tree = long_name_tree(local_store)
    result = casframe("--store", local_store.url, "checkout", str(tree), str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr == f"casframe: error: cannot check out 'docs/{LONG_NAME}': " \
        "File name too long\n"
    assert not (tmp_path / "out").exists()


def test_a_missing_blob_part_way_removes_what_was_written(
    memory_store: Store, tmp_path: Path
) -> None:
    absent = Digest.of_bytes(b"never stored")
    files = [FileNode(name=f"f{i:03}", digest=memory_store.put_bytes(b"%d" % i).to_proto())
             for i in range(300)]
    files.append(FileNode(name="zz-missing", digest=absent.to_proto()))
    sub = memory_store.put_directory(Directory(files=files))
    tree = memory_store.put_directory(
        Directory(directories=[DirectoryNode(name=n, digest=sub.to_proto()) for n in "abc"])
    )
    with pytest.raises(BlobNotFoundError):
        memory_store.checkout(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- digests that are no digest ---------------------------------------------------------------


@pytest.mark.parametrize(
    "hash_, size",
    [
        ("../" * 21 + "x", 1),  # 64 characters that would climb out of objects/
        ("A" * 64, 1),  # upper case: another name than the object's
        ("a" * 64, -1),
    ],
    ids=["path", "upper-case", "negative-size"],
)
def test_a_file_node_with_an_invalid_digest_is_refused_before_anything_is_written(
    local_store: Store, tmp_path: Path, hash_: str, size: int
) -> None:
    """Checkout links files by the digests their FileNodes name, taking them as validated when
    the tree was measured: a digest that is no digest must be refused there, not linked."""
    good = local_store.put_bytes(b"content")
    root = local_store.put_directory(
        Directory(
            files=[
                FileNode(name="a", digest=good.to_proto()),
                FileNode(name="b", digest=DigestMessage(hash=hash_, size_bytes=size)),
            ]
        )
    )
    dest = tmp_path / "dest"
    with pytest.raises(InvalidDigestError):
        local_store.checkout(root, dest, link=True)
    assert not dest.exists()
