"""What a REAPI ActionResult names: the blobs a client fetches along with it.

The server checks them before it answers ``GetActionResult``, and the ``cache://`` backend
sends them to its remote before it sets an action-cache ref there
(:func:`casframe.refkinds.action_result_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from casframe import _messages
from casframe.digest import Digest
from casframe.errors import CorruptBlobError, InvalidDigestError

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        ActionResult,
    )
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Digest as DigestProto,
    )

__all__ = ["ActionOutputs", "action_outputs", "parse_action_result", "tree_files"]


@dataclass
class ActionOutputs:
    """The digests an ActionResult names."""

    #: Output files, Tree messages of output directories, stdout and stderr.
    blobs: set[Digest] = field(default_factory=set)
    #: The Tree messages among ``blobs``, whose files a client fetches too.
    trees: list[Digest] = field(default_factory=list)
    #: Root Directories of output directories (a newer form), each a whole tree.
    roots: list[Digest] = field(default_factory=list)


def _required(message: DigestProto, what: str) -> Digest:
    try:
        return Digest.from_proto(message)
    except InvalidDigestError as exc:
        raise InvalidDigestError(f"invalid {what}: {exc}") from None


def _optional(message: DigestProto, what: str) -> Digest | None:
    if not message.hash and not message.size_bytes:
        return None  # an optional field left unset
    return _required(message, what)


def action_outputs(result: ActionResult) -> ActionOutputs:
    """The blobs, Tree messages and Directory roots ``result`` names; an invalid digest in
    it raises :class:`InvalidDigestError` naming the output."""
    outputs = ActionOutputs()
    for output in result.output_files:
        outputs.blobs.add(_required(output.digest, f"digest of output {output.path!r}"))
    for directory in result.output_directories:
        tree = _optional(directory.tree_digest, f"tree of output {directory.path!r}")
        if tree is not None:
            outputs.trees.append(tree)
            outputs.blobs.add(tree)
        root = _optional(directory.root_directory_digest, f"root of output {directory.path!r}")
        if root is not None:
            outputs.roots.append(root)
    for log, what in ((result.stdout_digest, "stdout"), (result.stderr_digest, "stderr")):
        digest = _optional(log, f"digest of {what}")
        if digest is not None:
            outputs.blobs.add(digest)
    return outputs


def parse_action_result(digest: Digest, data: bytes) -> ActionResult:
    """Decode the ActionResult message stored as ``digest``."""
    result = _messages.execution.ActionResult()
    try:
        result.ParseFromString(data)
    except _messages.DecodeError:
        raise CorruptBlobError(digest, "not an ActionResult message") from None
    return result


def tree_files(digest: Digest, data: bytes) -> set[Digest]:
    """The files of every Directory in the Tree message ``data`` (stored as ``digest``)."""
    tree = _messages.execution.Tree()
    try:
        tree.ParseFromString(data)
    except _messages.DecodeError:
        raise CorruptBlobError(digest, "not a Tree message") from None
    return {
        Digest.from_proto(node.digest)
        for directory in (tree.root, *tree.children)
        for node in directory.files
    }
