"""The REAPI ActionCache service: action results kept as blobs behind the refs
``ac/{instance or _}/{hash}/{size}`` (see :mod:`casframe.server.servicebase`).

A result is served only while every output it names is stored; an update whose output paths
leave the working directory, or whose digests are invalid, is refused before anything is
stored.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe.actions import action_outputs
from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.errors import BlobNotFoundError, CorruptBlobError, RefNotFoundError
from casframe.refkinds import action_result_outputs
from casframe.server.errors import StatusError, missing_blobs_error, rpc_method
from casframe.server.names import action_ref_name
from casframe.server.servicebase import ServicerBase, parse_digest
from casframe.tree import missing_in_tree

__all__ = ["ActionCacheService"]


class ActionCacheService(ServicerBase, re_grpc.ActionCacheServicer):
    @rpc_method
    def GetActionResult(  # noqa: N802 - gRPC method name
        self, request: re_pb2.GetActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        try:
            result = self._action_result(request)
        except StatusError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                self.counts.action_lookup(False)
            raise
        except (RefNotFoundError, BlobNotFoundError):  # NOT_FOUND too
            self.counts.action_lookup(False)
            raise
        self.counts.action_lookup(True)
        return result

    def _action_result(self, request: re_pb2.GetActionResultRequest) -> re_pb2.ActionResult:
        """The result GetActionResult answers, or NOT_FOUND."""
        instance = self._check(request.instance_name)
        action = parse_digest(request.action_digest, "action_digest")
        store = self._store_for(request.digest_function, [action])
        not_found = StatusError(
            grpc.StatusCode.NOT_FOUND, f"no action result for {action} in instance {instance!r}"
        )
        try:
            result_digest = self._get_ref(
                store, action_ref_name(instance, action), f"the action result for {action}"
            )
            data = store.verified.read_bytes(result_digest)
        except (RefNotFoundError, BlobNotFoundError):
            raise not_found from None
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            raise CorruptBlobError(result_digest, "not an ActionResult message") from None
        missing = _missing_outputs(store.verified, result)
        if missing:
            raise missing_blobs_error(
                grpc.StatusCode.NOT_FOUND,
                f"action result for {action} names outputs no longer stored",
                missing,
            )
        return result

    @rpc_method
    def UpdateActionResult(  # noqa: N802 - gRPC method name
        self, request: re_pb2.UpdateActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        instance = self._check(request.instance_name)
        self._check_writable()
        action = parse_digest(request.action_digest, "action_digest")
        _check_output_paths(request.action_result)
        # Every digest it names must be valid now, and of the action's function: a bad one
        # stored here would fail each client that later gets the result.
        outputs = action_outputs(request.action_result)
        store = self._store_for(request.digest_function, [action, *outputs.blobs])
        stored = store.verified.put_bytes(
            request.action_result.SerializeToString(deterministic=True)
        )
        # Not a Directory, so no completeness check: GetActionResult checks outputs instead.
        store.set_ref(action_ref_name(instance, action), stored, check_complete=False)
        return request.action_result


def _missing_outputs(blobs: VerifiedBlobs, result: re_pb2.ActionResult) -> set[Digest]:
    """Every blob the result names that is not stored (outputs, trees, logs)."""
    outputs = action_outputs(result)
    missing = blobs.find_missing(outputs.blobs)
    if missing:
        return missing
    named, roots = action_result_outputs(blobs, outputs)
    missing = blobs.find_missing(named - outputs.blobs)
    for root in roots:
        missing |= missing_in_tree(blobs, root)
    return missing


def _check_output_paths(result: re_pb2.ActionResult) -> None:
    """Refuse output paths that leave the working directory: every client that gets the result
    would write there. REAPI's paths are relative, with ``/`` as separator."""
    groups = (result.output_files, result.output_directories, result.output_symlinks,
              result.output_file_symlinks, result.output_directory_symlinks)
    for group in groups:
        for output in group:
            path = output.path
            if path.startswith("/") or "\x00" in path or ".." in path.split("/"):
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output path {path!r} is not relative to the working directory "
                    "(no leading '/', no '..', no NUL)",
                )

