"""The REAPI Capabilities service: what this server supports (digest functions, compressors,
batch limits, whether it accepts updates) for each served instance.

Every digest function of the served store is listed, SHA-256 first; the deprecated singular
``ExecutionCapabilities.digest_function`` stays SHA-256, what clients older than REAPI 2.3
(Bazel 4.2, BuildStream 1.x) read."""

from __future__ import annotations

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.build.bazel.semver import semver_pb2
from casframe.server.compressed import SERVED_COMPRESSORS
from casframe.server.errors import rpc_method
from casframe.server.servicebase import ServicerBase

__all__ = ["CapabilitiesService"]

_SHA256 = re_pb2.DigestFunction.SHA256


class CapabilitiesService(ServicerBase, re_grpc.CapabilitiesServicer):
    @rpc_method
    def GetCapabilities(  # noqa: N802 - gRPC method name
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        self._check(request.instance_name)
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=self.functions.reapi_values,
                action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                    update_enabled=not self.settings.read_only
                ),
                max_batch_total_size_bytes=self.settings.max_batch_total_size_bytes,
                symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
                supported_compressors=SERVED_COMPRESSORS,
                supported_batch_update_compressors=SERVED_COMPRESSORS,
            ),
            execution_capabilities=re_pb2.ExecutionCapabilities(
                digest_function=_SHA256, digest_functions=self.functions.reapi_values,
                exec_enabled=False,
            ),
            deprecated_api_version=semver_pb2.SemVer(major=2, minor=0),
            low_api_version=semver_pb2.SemVer(major=2, minor=0),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )
