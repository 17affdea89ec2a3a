"""The generated protobuf modules, each imported the first time it is used.

Loading protobuf and the REAPI descriptors takes tens of milliseconds, more than the whole
start-up budget of commands such as ``casframe ref list``, which never decode a message. The
modules that do (the tree engine, maintenance, action results) import this module and reach
the messages through it, ``_messages.execution.Directory``, so that importing them, and the
store facade above them, costs nothing until a message is built. This is the one place in
casframe that defers an import; it must never import anything but the generated code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from google.protobuf.message import DecodeError

    from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as asset
    from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as asset_grpc
    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as execution
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as execution_grpc,
    )
    from casframe._protos.buildstream.v2 import buildstream_pb2 as buildstream
    from casframe._protos.buildstream.v2 import buildstream_pb2_grpc as buildstream_grpc
    from casframe._protos.google.bytestream import bytestream_pb2 as bytestream
    from casframe._protos.google.bytestream import bytestream_pb2_grpc as bytestream_grpc

__all__ = [
    "DecodeError",
    "asset",
    "asset_grpc",
    "buildstream",
    "buildstream_grpc",
    "bytestream",
    "bytestream_grpc",
    "execution",
    "execution_grpc",
]

_MODULES = {
    "execution": "casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2",
    "execution_grpc": "casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2_grpc",
    "asset": "casframe._protos.build.bazel.remote.asset.v1.remote_asset_pb2",
    "asset_grpc": "casframe._protos.build.bazel.remote.asset.v1.remote_asset_pb2_grpc",
    "buildstream": "casframe._protos.buildstream.v2.buildstream_pb2",
    "buildstream_grpc": "casframe._protos.buildstream.v2.buildstream_pb2_grpc",
    "bytestream": "casframe._protos.google.bytestream.bytestream_pb2",
    "bytestream_grpc": "casframe._protos.google.bytestream.bytestream_pb2_grpc",
}


def __getattr__(name: str) -> Any:
    if name == "DecodeError":
        value: Any = importlib.import_module("google.protobuf.message").DecodeError
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value
