"""Property-based fuzzing of checkout with hand-built, often hostile, Directory messages.

Trees are stored bypassing import (``put_directory`` keeps whatever order and duplicates they
have; some digests name missing blobs, non-Directory blobs, or blobs a lying backend answers
with other bytes). Names include traversal (``..``, ``a/b``, an absolute path into the sandbox),
NUL, empty, too long for the file system, and case-insensitive twins; symlinks point outside.
The property: either checkout writes the whole tree inside DEST, or it raises a typed casframe
error, leaves no DEST behind and changes nothing outside DEST. A tree with nothing wrong must
check out, and one over its limit must be refused as too large.

The suite runs a modest number of examples; ``CASFRAME_FUZZ_EXAMPLES=5000`` runs a soak
(docs/testing.md).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from casframe import CasframeError, Digest, Store, TreeTooLargeError, open_store
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestProto,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)

EXAMPLES = int(os.environ.get("CASFRAME_FUZZ_EXAMPLES", "60"))
# Small, so that fan-out bombs are refused after a few levels and accepted trees stay quick.
MAX_ENTRIES = 300
ABSOLUTE = "{sandbox}/outside/absolute"  # a name that is an absolute path into the sandbox

GOOD_NAMES = st.text(alphabet="abcAB019._-é", min_size=1, max_size=6).filter(
    lambda name: name not in (".", "..")
)
HOSTILE_NAMES = st.sampled_from(
    ["..", ".", "", "a/b", "../outside/escaped", "/abs", ABSOLUTE, "nul\x00byte", "back\\slash",
     "n" * 300]
)
GOOD_TARGETS = st.sampled_from(["a", "../../outside/canary", "/etc/passwd", "..", "x/y/z"])
HOSTILE_TARGETS = st.sampled_from(["", "nul\x00", "t" * 5000])
CONTENTS = st.sampled_from([b"", b"one", b"two\n", b"x" * 5000])


@dataclass
class FileSpec:
    name: str
    content: bytes
    executable: bool
    digest: str = "stored"  # or "missing", "invalid"


@dataclass
class DirSpec:
    files: list[FileSpec] = field(default_factory=list)
    symlinks: list[tuple[str, str]] = field(default_factory=list)
    #: (names, child): the child is stored once and named under each name (fan-out).
    dirs: list[tuple[list[str], DirSpec | str]] = field(default_factory=list)


def file_specs() -> st.SearchStrategy[FileSpec]:
    return st.builds(FileSpec, GOOD_NAMES, CONTENTS, st.booleans())


def symlink_specs() -> st.SearchStrategy[list[tuple[str, str]]]:
    return st.lists(st.tuples(GOOD_NAMES, GOOD_TARGETS), max_size=2)


def leaf_specs() -> st.SearchStrategy[DirSpec]:
    return st.builds(DirSpec, st.lists(file_specs(), max_size=4), symlink_specs())


def dir_specs() -> st.SearchStrategy[DirSpec]:
    """Sound trees, except that names drawn alike in one directory are duplicates."""

    def extend(children: st.SearchStrategy[DirSpec]) -> st.SearchStrategy[DirSpec]:
        return st.builds(
            DirSpec,
            st.lists(file_specs(), max_size=3),
            symlink_specs(),
            st.lists(st.tuples(st.lists(GOOD_NAMES, min_size=1, max_size=8), children),
                     max_size=3),
        )

    return st.recursive(leaf_specs(), extend, max_leaves=12)


@st.composite
def fan_out_bombs(draw: st.DrawFn) -> DirSpec:
    """One child named many times, level after level: small stored, large expanded."""
    spec = unique_names(draw(leaf_specs()))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        fanout = draw(st.integers(min_value=1, max_value=12))
        spec = DirSpec(dirs=[([f"d{i}" for i in range(fanout)], spec)])
    return spec


FAULTS = [
    "name", "long-name", "symlink-target", "duplicate", "missing-file", "invalid-digest",
    "missing-directory", "not-a-directory", "lying-backend",
]


@st.composite
def faulty_trees(draw: st.DrawFn) -> DirSpec:
    """A sound tree with one fault put in one of its directories (perhaps a repeated one)."""
    spec = unique_names(draw(dir_specs()))
    places: dict[int, DirSpec] = {}
    pending = [spec]
    while pending:
        node = pending.pop()
        places[id(node)] = node
        pending += [c for _, c in node.dirs if isinstance(c, DirSpec) and id(c) not in places]
    place = draw(st.sampled_from(list(places.values())))
    fault = draw(st.sampled_from(FAULTS))
    content = draw(CONTENTS.filter(bool))
    if fault == "name":
        place.files.append(FileSpec(draw(HOSTILE_NAMES), content, False))
    elif fault == "long-name":
        place.files.append(FileSpec("n" * 300, content, draw(st.booleans())))
    elif fault == "symlink-target":
        place.symlinks.append(("link-x", draw(HOSTILE_TARGETS)))
    elif fault == "duplicate":
        taken = [f.name for f in place.files] + [n for n, _ in place.symlinks]
        taken += [n for names_, _ in place.dirs for n in names_]
        place.symlinks.append((draw(st.sampled_from(taken)) if taken else "x", "target"))
        if not taken:
            place.files.append(FileSpec("x", content, False))
    elif fault in ("missing-file", "invalid-digest"):
        kind = "missing" if fault == "missing-file" else "invalid"
        place.files.append(FileSpec("faulty", content, False, kind))
    else:
        place.dirs.append((["faulty"], fault))
    return spec


class Built:
    """A spec stored in a store, with what checkout should produce if nothing is wrong."""

    def __init__(self, store: Store, sandbox: Path) -> None:
        self.store = store
        self.sandbox = sandbox
        self.clean = True  # no reason for checkout to fail
        self.lies: list[Digest] = []

    def name(self, name: str) -> str:
        return name.replace("{sandbox}", str(self.sandbox))

    def store_dir(self, spec: DirSpec) -> Digest:
        message = Directory()
        for f in spec.files:
            if f.digest == "invalid":
                self.clean = False
                proto = DigestProto(hash="zz", size_bytes=-1)
            elif f.digest == "missing":
                self.clean = self.clean and not f.content  # the empty blob is always present
                proto = Digest.of_bytes(f.content + b" (never stored)").to_proto()
                if not f.content:
                    proto = Digest.of_bytes(b"").to_proto()
            else:
                proto = self.store.put_bytes(f.content).to_proto()
            message.files.append(
                FileNode(name=self.name(f.name), digest=proto, is_executable=f.executable)
            )
        for names_, child in spec.dirs:
            digest = self.store_child(child)
            for name in names_:
                message.directories.append(
                    DirectoryNode(name=self.name(name), digest=digest.to_proto())
                )
        for name, target in spec.symlinks:
            message.symlinks.append(SymlinkNode(name=self.name(name), target=target))
        every = [n.name for g in (message.files, message.directories, message.symlinks) for n in g]
        if len(set(every)) != len(every) or not all(_good(n) for n in every):
            self.clean = False
        if not all(t and "\x00" not in t and len(t) < 4096 for _, t in spec.symlinks):
            self.clean = False
        return self.store.put_directory(message)

    def store_child(self, child: DirSpec | str) -> Digest:
        if isinstance(child, DirSpec):
            return self.store_dir(child)
        self.clean = False
        if child == "missing-directory":
            return Digest.of_bytes(b"a Directory never stored")
        if child == "not-a-directory":
            return self.store.put_bytes(b"\xff\xfe not a Directory message")
        # A backend that answers a digest with other bytes (here: a Directory naming itself).
        lie = Digest.of_bytes(b"lying backend %d" % len(self.lies))
        self.lies.append(lie)
        return lie

    def tell_lies(self) -> None:
        blobs = self.store.blobs
        for lie in self.lies:
            data = Directory(
                directories=[DirectoryNode(name="self", digest=lie.to_proto())]
            ).SerializeToString()
            blobs.write_blobs([(lie, data)])  # the backend stores what it is given, unchecked


def _good(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not set(name) & {"/", "\x00", "\\"} \
        and len(name.encode()) <= 255


def unique_names(spec: DirSpec, done: dict[int, DirSpec] | None = None) -> DirSpec:
    """The spec with a counter added to its sound names, so that duplicates are rare (they are
    tested on purpose, by trees whose duplicates are kept)."""
    done = {} if done is None else done
    if id(spec) in done:
        return done[id(spec)]
    counter = iter(range(1_000_000))

    def fix(name: str) -> str:
        return f"{name}-{next(counter)}" if _good(name) else name

    result = DirSpec(
        [FileSpec(fix(f.name), f.content, f.executable, f.digest) for f in spec.files],
        [(fix(name), target) for name, target in spec.symlinks],
        [([fix(n) for n in names_], unique_names(child, done) if isinstance(child, DirSpec)
          else child) for names_, child in spec.dirs],
    )
    done[id(spec)] = result
    return result


def expansion(spec: DirSpec) -> int:
    count = len(spec.files) + len(spec.symlinks)
    for names_, child in spec.dirs:
        below = expansion(child) if isinstance(child, DirSpec) else 0
        count += len(names_) * (1 + below)
    return count


def expected_paths(built: Built, spec: DirSpec, prefix: str = "") -> Iterator[tuple[str, object]]:
    for f in spec.files:
        yield prefix + f.name, ("file", f.content, f.executable)
    for name, target in spec.symlinks:
        yield prefix + name, ("symlink", target)
    for names_, child in spec.dirs:
        assert isinstance(child, DirSpec)
        for name in names_:
            yield prefix + name, ("directory",)
            yield from expected_paths(built, child, prefix + name + "/")


def on_disk(root: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                found[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                found[rel] = ("directory",)
            else:
                found[rel] = ("file", Path(path).read_bytes(), bool(st_.st_mode & stat.S_IXUSR))
    return found


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    """A folder with a canary next to where every checkout goes."""
    with tempfile.TemporaryDirectory(prefix="casframe-fuzz-") as folder:
        root = Path(folder)
        (root / "outside").mkdir()
        (root / "outside" / "canary").write_bytes(b"canary")
        (root / "store").mkdir()
        yield root


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(spec=st.one_of(faulty_trees(), dir_specs().map(unique_names), dir_specs(),
                     fan_out_bombs()),
       backend=st.sampled_from(["memory", "file"]), link=st.sampled_from([None, False]))
def test_checkout_writes_the_whole_tree_or_raises_a_typed_error(
    sandbox: Path, spec: DirSpec, backend: str, link: bool | None
) -> None:
    before = on_disk(sandbox)
    url = "memory://" if backend == "memory" else f"file://{sandbox / 'store'}"
    dest = sandbox / "dest"
    with open_store(url) as store:
        built = Built(store, sandbox)
        root = built.store_dir(spec)
        built.tell_lies()
        too_large = built.clean and expansion(spec) > MAX_ENTRIES
        try:
            store.checkout(root, dest, link=link, max_tree_entries=MAX_ENTRIES)
        except CasframeError as exc:
            reason = re.sub(r"[0-9a-f]{64}(/\d+)?|'.*'|\d[\d,]*", "…", str(exc))[:50]
            event(f"refused: {type(exc).__name__}: {reason}")
            assert not built.clean or too_large, f"a sound tree was refused: {exc!r}"
            if too_large:
                assert isinstance(exc, TreeTooLargeError)
            assert not dest.exists(), "a failed checkout left its destination behind"
        else:
            event("checked out")
            assert built.clean and not too_large, "an unsound tree was checked out"
            expected = dict(expected_paths(built, spec))
            assert on_disk(dest) == expected
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    after = on_disk(sandbox)
    if backend == "file":  # the store's own folder may have gained objects
        before = {p: v for p, v in before.items() if not p.startswith("store")}
        after = {p: v for p, v in after.items() if not p.startswith("store")}
    assert after == before, "checkout changed something outside its destination"
