"""The REAPI messages and wire helpers, for plugin authors.

Backends and tools that speak REAPI (a gRPC client, a cache that reads action results) use
this module instead of casframe's private generated code: the message modules and classes of
REAPI v2, Remote Asset v1, ByteStream and BuildStream's ReferenceStorage, and the helpers the
core itself uses on them. Message classes are loaded on first use (protobuf takes longer to
load than a light ``casframe`` command takes to run)::

    from casframe import reapi

    result = reapi.parse_action_result(digest, data)      # an ActionResult, checked
    outputs = reapi.action_outputs(result)                # the digests it names
    stub = reapi.remote_execution_grpc.ContentAddressableStorageStub(channel)

* modules: ``remote_execution`` / ``remote_execution_grpc``, ``remote_asset`` /
  ``remote_asset_grpc``, ``bytestream`` / ``bytestream_grpc``, ``buildstream`` /
  ``buildstream_grpc`` (the generated ``*_pb2`` and ``*_pb2_grpc`` modules);
* classes: ``ActionResult``, ``Directory``, ``DirectoryNode``, ``FileNode``, ``SymlinkNode``,
  ``Tree``, ``DigestMessage`` (REAPI's ``Digest``; :meth:`casframe.Digest.to_proto` and
  :meth:`~casframe.Digest.from_proto` convert), ``DecodeError`` (protobuf's);
* helpers: :func:`parse_directory`, :func:`parse_action_result`, :func:`action_outputs`,
  :func:`tree_files`, and ByteStream's bulk messages encoded and decoded without copies
  (:func:`encode_write_request`, :func:`finish_write_request`, :func:`decode_write_request`,
  :func:`encode_read_response`, :func:`decode_read_response`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from casframe import _messages
from casframe._wire import (
    WriteChunk,
    decode_read_response,
    decode_write_request,
    encode_read_response,
    encode_write_request,
    finish_write_request,
)
from casframe.actions import ActionOutputs, action_outputs, parse_action_result, tree_files
from casframe.directory import is_canonical, parse_directory

if TYPE_CHECKING:
    from google.protobuf.message import DecodeError

    from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as remote_asset
    from casframe._protos.build.bazel.remote.asset.v1 import (
        remote_asset_pb2_grpc as remote_asset_grpc,
    )
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2 as remote_execution,
    )
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as remote_execution_grpc,
    )
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        ActionResult,
        Directory,
        DirectoryNode,
        FileNode,
        SymlinkNode,
        Tree,
    )
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Digest as DigestMessage,
    )
    from casframe._protos.buildstream.v2 import buildstream_pb2 as buildstream
    from casframe._protos.buildstream.v2 import buildstream_pb2_grpc as buildstream_grpc
    from casframe._protos.google.bytestream import bytestream_pb2 as bytestream
    from casframe._protos.google.bytestream import bytestream_pb2_grpc as bytestream_grpc

__all__ = [
    "ActionOutputs",
    "ActionResult",
    "DecodeError",
    "DigestMessage",
    "Directory",
    "DirectoryNode",
    "FileNode",
    "SymlinkNode",
    "Tree",
    "WriteChunk",
    "action_outputs",
    "buildstream",
    "buildstream_grpc",
    "bytestream",
    "bytestream_grpc",
    "decode_read_response",
    "decode_write_request",
    "encode_read_response",
    "encode_write_request",
    "finish_write_request",
    "is_canonical",
    "parse_action_result",
    "parse_directory",
    "remote_asset",
    "remote_asset_grpc",
    "remote_execution",
    "remote_execution_grpc",
    "tree_files",
]

# Public name -> the attribute of casframe._messages holding it.
_MODULES = {
    "remote_execution": "execution",
    "remote_execution_grpc": "execution_grpc",
    "remote_asset": "asset",
    "remote_asset_grpc": "asset_grpc",
    "buildstream": "buildstream",
    "buildstream_grpc": "buildstream_grpc",
    "bytestream": "bytestream",
    "bytestream_grpc": "bytestream_grpc",
}
# Message classes of REAPI v2, by their public name here.
_EXECUTION_CLASSES = {
    "ActionResult": "ActionResult",
    "DigestMessage": "Digest",
    "Directory": "Directory",
    "DirectoryNode": "DirectoryNode",
    "FileNode": "FileNode",
    "SymlinkNode": "SymlinkNode",
    "Tree": "Tree",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = getattr(_messages, _MODULES[name])
    elif name in _EXECUTION_CLASSES:
        value = getattr(_messages.execution, _EXECUTION_CLASSES[name])
    elif name == "DecodeError":
        value = _messages.DecodeError
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value
