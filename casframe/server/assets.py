"""Remote Asset entries that keep what they reference.

A Push may name, besides the asset's own blob or Directory, the blobs and directory trees the
asset refers to (``references_blobs``, ``references_directories``): BuildStream 2 pushes each
artifact as a small Artifact message that names the artifact's file tree, logs and metadata
this way. Those must live exactly as long as the asset. So such an asset is kept as a tree ref
``asset/held/{blob|directory}/{key}`` pointing at a *holder*: a Directory whose entry
``content`` is the asset itself and whose other entries are the references
(``blob-{hash}-{size}`` files, ``directory-{hash}-{size}`` subdirectories). Prune, fsck, gc and
transfer walk it like any tree, so the asset and everything it references stay or go together,
in the ref's least-recently-used order. An asset pushed without references keeps the plain ref
``asset/{blob|directory}/{key}``; a later push of the same URI replaces whichever form is there.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.digest import Digest
from casframe.errors import RefNotFoundError
from casframe.refkinds import ASSET_REF_PREFIX
from casframe.server.errors import StatusError, missing_blobs_error
from casframe.store import Store
from casframe.tree import missing_in_tree

__all__ = ["HELD_REF_PREFIX", "held_ref_name", "lookup_asset", "set_asset"]

#: Refs of assets pushed with references: ``asset/held/{blob|directory}/{key}`` → a holder.
HELD_REF_PREFIX = f"{ASSET_REF_PREFIX}held/"
# The holder's entry naming the asset itself.
_CONTENT = "content"


def held_ref_name(name: str) -> str:
    """The holder ref of the asset ref ``asset/{kind}/{key}``."""
    return HELD_REF_PREFIX + name[len(ASSET_REF_PREFIX) :]


def _holder(kind: str, content: Digest, blobs: set[Digest], trees: set[Digest]) -> bytes:
    directory = re_pb2.Directory()
    files = [(f"blob-{d.hash}-{d.size}", d) for d in blobs]
    dirs = [(f"directory-{d.hash}-{d.size}", d) for d in trees]
    (files if kind == "blob" else dirs).append((_CONTENT, content))
    for name, digest in sorted(files):
        directory.files.add(name=name, digest=digest.to_proto())
    for name, digest in sorted(dirs):
        directory.directories.add(name=name, digest=digest.to_proto())
    return directory.SerializeToString(deterministic=True)


def _delete_if_present(store: Store, name: str) -> None:
    try:
        store.delete_ref(name)
    except RefNotFoundError:
        pass


def set_asset(
    store: Store,
    names: Iterable[str],
    kind: str,
    content: Digest,
    blobs: Iterable[Digest],
    trees: Iterable[Digest],
    what: str,
) -> None:
    """Point the asset refs ``names`` (``asset/{kind}/…``) at ``content`` and keep ``blobs``
    and the directory ``trees`` with it; all must be stored (else ``FAILED_PRECONDITION``
    listing what is missing, and nothing is set). Freshens what it checks, so prune's grace
    period covers it from here on."""
    blob_set, tree_set = set(blobs), set(trees)
    roots = tree_set | ({content} if kind == "directory" else set())
    missing = store.find_missing(blob_set | ({content} if kind == "blob" else set()),
                                 freshen=True)
    for root in roots:
        missing |= missing_in_tree(store.verified, root, freshen=True)
    if missing:
        raise missing_blobs_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{what}: the asset or what it references is not stored", missing,
        )
    if not blob_set and not tree_set:
        for name in names:
            store.set_ref(name, content, check_complete=False)
            _delete_if_present(store, held_ref_name(name))
        return
    holder = store.put_bytes(_holder(kind, content, blob_set, tree_set))
    for name in names:
        store.set_ref(held_ref_name(name), holder, check_complete=False)
        _delete_if_present(store, name)


def lookup_asset(store: Store, name: str) -> Digest:
    """The content of the asset ref ``name``, held or plain; ``RefNotFoundError`` if neither."""
    try:
        holder = store.get_ref(held_ref_name(name))
    except RefNotFoundError:
        return store.get_ref(name)
    directory = store.get_directory(holder)
    for node in [*directory.files, *directory.directories]:
        if node.name == _CONTENT:
            return Digest.from_proto(node.digest)
    raise StatusError(grpc.StatusCode.DATA_LOSS,
                      f"asset {name!r}: its holder {holder} names no content")
