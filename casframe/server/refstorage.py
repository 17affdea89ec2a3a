"""BuildStream's ReferenceStorage service: keys are refs of the same name, each pointing at a
complete Directory tree.

The protocol has no digest function field, so it serves SHA-256's refs and blobs (the only
function of the BuildStream 1.x clients that use it)."""

from __future__ import annotations

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2, buildstream_pb2_grpc
from casframe.refkinds import writable_ref_name
from casframe.server.errors import StatusError, rpc_method
from casframe.server.servicebase import ServicerBase, parse_digest

__all__ = ["ReferenceStorageService"]


class ReferenceStorageService(ServicerBase, buildstream_pb2_grpc.ReferenceStorageServicer):
    @rpc_method
    def GetReference(  # noqa: N802 - gRPC method name
        self, request: buildstream_pb2.GetReferenceRequest, context: grpc.ServicerContext
    ) -> buildstream_pb2.GetReferenceResponse:
        self._check(request.instance_name)
        digest = self._get_ref(self.functions.default_store(), request.key, f"ref {request.key}")
        return buildstream_pb2.GetReferenceResponse(digest=digest.to_proto())

    @rpc_method
    def UpdateReference(  # noqa: N802 - gRPC method name
        self, request: buildstream_pb2.UpdateReferenceRequest, context: grpc.ServicerContext
    ) -> buildstream_pb2.UpdateReferenceResponse:
        self._check(request.instance_name)
        self._check_writable()
        if not request.keys:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "no keys to update")
        keys = [writable_ref_name(key) for key in request.keys]
        digest = parse_digest(request.digest)
        # No digest_function field: SHA-256 digests only, others refused by their length.
        store = self._store_for(re_pb2.DigestFunction.SHA256, [digest])
        self._set_tree_ref(store, keys, digest, "UpdateReference")
        return buildstream_pb2.UpdateReferenceResponse()

    @rpc_method
    def Status(  # noqa: N802 - gRPC method name
        self, request: buildstream_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> buildstream_pb2.StatusResponse:
        self._check(request.instance_name)
        return buildstream_pb2.StatusResponse(allow_updates=not self.settings.read_only)
