"""The kinds of refs, and what each keeps alive.

Most refs name a Directory tree. ``casframe serve`` keeps two other kinds under its own
namespaces, which no user or client may set: action-cache refs (``ac/{instance or _}/{hash}/
{size}``), each naming a serialized ActionResult, and Remote Asset blob refs (``asset/blob/
{key}``), each naming one plain blob (``asset/directory/…`` and ``asset/held/…`` name trees).

What a ref keeps alive is computed here, in two forms:

* strictly, for transfers and for the server's answers (:func:`action_result_outputs`, with
  :func:`casframe.tree.missing_in_tree` for trees): a missing or corrupt message raises;
* tolerantly, for prune, gc, du and fsck (:class:`RefReach`): a missing, corrupt or
  undecodable message is recorded as a problem and the walk goes on, keeping whatever can still
  be reached.

Prune must never read a blob ref as a Directory, nor miss an output an action result names.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

from casframe import _messages
from casframe.blobs import VerifiedBlobs
from casframe.digest import EMPTY_DIGEST, Digest
from casframe.directory import is_canonical, parse_directory
from casframe.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    InvalidDigestError,
    InvalidNameError,
    UnsafeTreeError,
)
from casframe.lazy import lazy_module
from casframe.names import validate_ref_name
from casframe.spi import RefInfo, RefStore

if TYPE_CHECKING:
    from casframe import actions
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Digest as DigestProto,
    )
    from casframe.actions import ActionOutputs
else:  # for action results only: a command that reads refs (ref list) never needs it
    actions = lazy_module("casframe.actions")

__all__ = [
    "ACTION_RESULT_REF_PREFIX",
    "ASSET_REF_PREFIX",
    "BLOB_REF_PREFIX",
    "RESERVED_REF_NAMESPACES",
    "BlobKey",
    "RefKind",
    "RefReach",
    "action_result_outputs",
    "is_tree_ref",
    "ref_kind",
    "refs_by_use",
    "reserved_namespace",
    "writable_ref_name",
]

#: Refs ``casframe serve`` keeps for the REAPI action cache, ``ac/{instance or _}/{hash}/{size}``:
#: each points at a serialized ActionResult blob, not at a Directory.
ACTION_RESULT_REF_PREFIX = "ac/"
#: Refs holding Remote Asset associations: ``asset/{blob|directory}/{key}``, and
#: ``asset/held/{blob|directory}/{key}`` for assets pushed with references.
ASSET_REF_PREFIX = "asset/"
#: Refs ``casframe serve`` keeps for Remote Asset blobs, ``asset/blob/{key}``: each points at a
#: plain blob, not at a Directory.
BLOB_REF_PREFIX = f"{ASSET_REF_PREFIX}blob/"

#: Where ``casframe serve`` keeps its own refs (action cache, Remote Asset). They are reserved
#: whole: a user or client may set neither a ref under them, which prune would read as one of
#: the server's, nor the bare name, which would stand where the server's refs need a folder.
RESERVED_REF_NAMESPACES = ("ac", "asset")

#: Directories read per read_many call while walking trees (they are small messages).
READ_BATCH = 256

#: A blob's identity as a plain ``(hash, size)`` tuple, made straight from the listing and from
#: Directory messages without building a checked Digest for each blob (only deletion candidates
#: and problems become Digests). A Digest is such a tuple underneath, so both kinds find each
#: other in the same sets and dicts.
BlobKey = tuple[str, int]


class RefKind(enum.Enum):
    """What a ref points at."""

    #: A Directory tree: the ref keeps the whole tree.
    TREE = "tree"
    #: A serialized ActionResult: the ref keeps it and every output it names.
    ACTION_RESULT = "action-result"
    #: One plain blob (a Remote Asset blob): the ref keeps that blob only.
    BLOB = "blob"


def ref_kind(name: str) -> RefKind:
    if name.startswith(ACTION_RESULT_REF_PREFIX):
        return RefKind.ACTION_RESULT
    if name.startswith(BLOB_REF_PREFIX):
        return RefKind.BLOB
    return RefKind.TREE


def is_tree_ref(name: str) -> bool:
    """Whether the ref points at a Directory tree (every ref but the server's blob refs).

    Prune, fsck and transfer walk tree refs as trees; a blob ref keeps only its blob (and, for
    an action result, the outputs it names), and must never be parsed as a Directory.
    """
    return ref_kind(name) is RefKind.TREE


def reserved_namespace(name: str) -> str | None:
    """The reserved namespace ``name`` is in or is (``ac``, ``asset``), else ``None``."""
    first = name.split("/", 1)[0]
    return first if first in RESERVED_REF_NAMESPACES else None


def writable_ref_name(name: str) -> str:
    """Validate the name of a ref a user or client sets; the server's namespaces are refused."""
    validate_ref_name(name)
    namespace = reserved_namespace(name)
    if namespace is not None:
        raise InvalidNameError(
            f"ref name {name!r} is reserved: {namespace!r} and every name under "
            f"'{namespace}/' belong to the action cache and Remote Asset entries of "
            "casframe serve"
        )
    return name


def refs_by_use(refs: RefStore, prefix: str = "") -> list[RefInfo]:
    """Refs starting with ``prefix``, least recently used first."""
    return sorted(refs.list_refs(prefix), key=lambda r: (r.accessed, r.name))


# -- strict: transfers and the server's answers --------------------------------------------------


def action_result_outputs(
    blobs: VerifiedBlobs, outputs: ActionOutputs
) -> tuple[set[Digest], list[Digest]]:
    """What an action result keeps alive besides itself, given what it names
    (:func:`casframe.actions.action_outputs`): every blob (output files, logs, ``Tree``
    messages and the files in them) and the roots of its Directory trees.

    Strict: a ``Tree`` message that is not stored raises
    :class:`~casframe.errors.BlobNotFoundError`, one that does not decode
    :class:`~casframe.errors.CorruptBlobError`.
    """
    named = set(outputs.blobs)
    for tree in outputs.trees:
        named |= actions.tree_files(tree, blobs.read_bytes(tree))
    return named, outputs.roots


# -- tolerant: prune, gc, du and fsck ------------------------------------------------------------


class _Node(NamedTuple):
    """What a Directory names: its subdirectories and its (non-empty) files.

    A named tuple, not a dataclass: every command that reads refs imports this module, and a
    dataclass costs several times more to define."""

    subdirs: list[Digest]
    files: list[BlobKey]


_LEAF = _Node([], [])


class RefReach:
    """The tolerant closure, for prune, gc, du and fsck: follows refs to everything they
    keep alive, reading each message once per operation.

    A tree ref (:func:`is_tree_ref`) keeps its Directory tree; a Remote Asset
    blob ref keeps its blob; an action-cache ref keeps its ActionResult and every output that
    names: files, logs, ``Tree`` messages and their files, and ``root_directory_digest`` trees.

    Tolerant by design: a missing, corrupt or undecodable message is recorded in ``problems``
    instead of raising, and whatever can still be decoded from a corrupt one is followed,
    because marking more than needed is always safe while marking less loses data. With
    ``check`` it also records unsafe names, non-canonical order and invalid digests (fsck);
    without it, file digests are not validated (a malformed one is never stored anyway).
    """

    def __init__(self, blobs: VerifiedBlobs, *, check: bool = False) -> None:
        self.blobs = blobs
        self.check = check
        self.nodes: dict[BlobKey, _Node] = {}
        #: What each action result keeps alive: blobs and Directory roots.
        self.outputs: dict[BlobKey, tuple[list[Digest], list[Digest]]] = {}
        #: Messages other than Directories read (hence verified) whole: results, Trees.
        self.verified: set[BlobKey] = set()
        self.problems: dict[BlobKey, list[tuple[str, str]]] = {}

    def _problem(self, digest: Digest, kind: str, detail: str) -> None:
        self.problems.setdefault((digest.hash, digest.size), []).append((kind, detail))

    def load(self, digests: list[Digest]) -> None:
        nodes = self.nodes
        todo = [d for d in digests if (d.hash, d.size) not in nodes]
        for start in range(0, len(todo), READ_BATCH):
            batch = todo[start : start + READ_BATCH]
            try:
                blobs = list(self.blobs.read_many(batch))
            except (BlobNotFoundError, CorruptBlobError):
                for digest in batch:  # find out which ones, one by one
                    self._load_one(digest)
                continue
            for digest, data in blobs:
                self._parse(digest, data)

    def _load_one(self, digest: Digest) -> None:
        data, salvaged = self._read(digest, "Directory")
        if data is None:
            self.nodes[(digest.hash, digest.size)] = _LEAF
        else:
            self._parse(digest, data, salvage=salvaged)

    def _read(self, digest: Digest, what: str) -> tuple[bytes | None, bool]:
        """``(content, salvaged)``: unverified content of a corrupt blob, if it can be read."""
        try:
            return self.blobs.read_bytes(digest), False
        except BlobNotFoundError:
            self._problem(digest, "missing", f"{what} is not stored")
            return None, False
        except CorruptBlobError as exc:
            self._problem(digest, "corrupt", str(exc))
            return self._read_unverified(digest), True

    def _read_unverified(self, digest: Digest) -> bytes | None:
        try:
            with self.blobs.open_read(digest, verify=False) as stream:
                data: bytes = stream.read(digest.size + 1)
                return data
        except (BlobNotFoundError, CorruptBlobError):
            return None

    def _parse(self, digest: Digest, data: bytes, *, salvage: bool = False) -> None:
        key = (digest.hash, digest.size)
        report = not salvage  # a salvaged Directory is already reported as corrupt
        try:
            if self.check:
                directory = parse_directory(digest, data)
            else:  # marking needs the digests only, not the names: skip checking those
                directory = _messages.execution.Directory()
                try:
                    directory.ParseFromString(data)
                except _messages.DecodeError as exc:
                    raise CorruptBlobError(digest, f"not a Directory message: {exc}") from None
        except CorruptBlobError as exc:
            if report:
                self._problem(digest, "not-a-directory", str(exc))
            self.nodes[key] = _LEAF
            return
        except UnsafeTreeError as exc:
            if report and self.check:
                self._problem(digest, "unsafe", str(exc))
            directory = _messages.execution.Directory()
            directory.ParseFromString(data)  # parse_directory already decoded it once
        if report and self.check and not is_canonical(directory):
            self._problem(digest, "not-canonical", "entries are not sorted by name")
        subdirs = []
        invalid: list[str] = []
        for dir_node in directory.directories:
            try:
                subdirs.append(Digest(dir_node.digest.hash, dir_node.digest.size_bytes))
            except InvalidDigestError as exc:
                invalid.append(str(exc))
        files = []
        for node in directory.files:  # each message attribute access builds an object: once
            file_digest = node.digest
            size = file_digest.size_bytes
            if size:
                files.append((file_digest.hash, size))
            elif self.check and file_digest.hash != EMPTY_DIGEST.hash:
                try:
                    Digest(file_digest.hash, 0)  # raises: only the empty blob has size 0
                except InvalidDigestError as exc:
                    invalid.append(str(exc))
        if self.check:
            valid = []
            for file_key in files:
                try:
                    Digest(*file_key)
                except InvalidDigestError as exc:
                    invalid.append(str(exc))
                    continue
                valid.append(file_key)
            files = valid
        if invalid and report:
            self._problem(digest, "not-a-directory", f"names an invalid digest: {invalid[0]}")
        self.nodes[key] = _Node(subdirs, files)

    def reach_ref(
        self, ref: RefInfo, marked: set[BlobKey], dirs_seen: set[BlobKey]
    ) -> list[BlobKey]:
        """Add everything ``ref`` keeps alive not yet in ``marked``; return what was added."""
        if is_tree_ref(ref.name):
            return self.reach(ref.digest, marked, dirs_seen)
        added = _add(ref.digest, marked)
        if ref.name.startswith(ACTION_RESULT_REF_PREFIX):
            blobs, roots = self._action_outputs(ref.digest)
            for digest in blobs:
                added += _add(digest, marked)
            for root in roots:
                added += self.reach(root, marked, dirs_seen)
        return added

    def _action_outputs(self, digest: Digest) -> tuple[list[Digest], list[Digest]]:
        """The blobs and Directory roots an ActionResult names (cached)."""
        key = (digest.hash, digest.size)
        cached = self.outputs.get(key)
        if cached is not None:
            return cached
        blobs: list[Digest] = []
        roots: list[Digest] = []
        self.outputs[key] = (blobs, roots)
        data, salvaged = self._read(digest, "ActionResult")
        if data is None:
            return blobs, roots
        result = _messages.execution.ActionResult()
        try:
            result.ParseFromString(data)
        except _messages.DecodeError as exc:
            if not salvaged:
                self._problem(digest, "not-an-action-result", f"does not decode: {exc}")
            return blobs, roots
        if not salvaged:
            self.verified.add(key)
        named = [output.digest for output in result.output_files]
        named += [result.stdout_digest, result.stderr_digest]
        trees = []
        for output in result.output_directories:
            trees += self._digests(digest, [output.tree_digest])
            roots += self._digests(digest, [output.root_directory_digest])
        blobs += self._digests(digest, named) + trees
        for tree in trees:
            blobs += self._tree_files(tree)
        return blobs, roots

    def _tree_files(self, digest: Digest) -> list[Digest]:
        """The files a REAPI ``Tree`` message names (its Directories are inside it)."""
        data, salvaged = self._read(digest, "Tree")
        if data is None:
            return []
        tree = _messages.execution.Tree()
        try:
            tree.ParseFromString(data)
        except _messages.DecodeError as exc:
            if not salvaged:
                self._problem(digest, "not-a-tree", f"does not decode: {exc}")
            return []
        if not salvaged:
            self.verified.add((digest.hash, digest.size))
        nodes = [node.digest for d in (tree.root, *tree.children) for node in d.files]
        return self._digests(digest, nodes)

    def _digests(self, parent: Digest, protos: list[DigestProto]) -> list[Digest]:
        """Digests from messages, skipping unset ones; a malformed one is a problem of parent."""
        digests = []
        for proto in protos:
            if not proto.hash and not proto.size_bytes:
                continue  # an optional field left unset
            try:
                digests.append(Digest(proto.hash, proto.size_bytes))
            except InvalidDigestError as exc:
                self._problem(parent, "invalid-digest", str(exc))
        return digests

    def reach(self, root: Digest, marked: set[BlobKey], dirs_seen: set[BlobKey]) -> list[BlobKey]:
        """Add every blob of ``root``'s tree not yet in ``marked``; return those added.

        Directories are tracked apart from ``marked`` because the same bytes may be a file in
        one tree and a Directory in another, and must then be followed as a Directory.
        """
        added: list[BlobKey] = []
        root_key = (root.hash, root.size)
        if root_key not in marked:
            marked.add(root_key)
            added.append(root_key)
        if root_key in dirs_seen:
            return added
        dirs_seen.add(root_key)
        nodes = self.nodes
        level = [root]
        while level:
            self.load(level)
            next_level: list[Digest] = []
            for digest in level:
                node = nodes[(digest.hash, digest.size)]
                fresh = set(node.files).difference(marked)  # also drops duplicate names
                marked.update(fresh)
                added.extend(fresh)
                for child in node.subdirs:
                    child_key = (child.hash, child.size)
                    if child_key not in marked:
                        marked.add(child_key)
                        added.append(child_key)
                    if child_key not in dirs_seen:
                        dirs_seen.add(child_key)
                        next_level.append(child)
            level = next_level
        return added


def _add(digest: Digest, marked: set[BlobKey]) -> list[BlobKey]:
    key = (digest.hash, digest.size)
    if key in marked:
        return []
    marked.add(key)
    return [key]
