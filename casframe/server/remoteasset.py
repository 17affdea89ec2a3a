"""The Remote Asset Fetch and Push services over what was pushed to this server; it never
downloads from origins. Where each URI is kept is in :mod:`casframe.server.servicebase` and
:mod:`casframe.server.assets`.

Each digest function keeps its own assets: a Push names its function in ``digest_function``
(or leaves it to be inferred from its digests), a Fetch names the function it wants (unset is
SHA-256: a Fetch carries no digest to infer from), and its answer says which it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2, remote_asset_pb2_grpc
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.digest import Digest
from casframe.digestfunctions import DigestFunction
from casframe.errors import RefNotFoundError
from casframe.refkinds import ASSET_REF_PREFIX, writable_ref_name
from casframe.server.assets import lookup_asset, set_asset
from casframe.server.errors import OK_STATUS, StatusError, rpc_method
from casframe.server.functions import reapi_value
from casframe.server.names import asset_ref_name, hashed_asset_ref_name
from casframe.server.servicebase import ServicerBase, parse_digest
from casframe.store import Store

__all__ = ["FetchService", "PushService"]


_AssetRequest = (
    remote_asset_pb2.FetchBlobRequest
    | remote_asset_pb2.FetchDirectoryRequest
    | remote_asset_pb2.PushBlobRequest
    | remote_asset_pb2.PushDirectoryRequest
)


def _qualifiers(request: _AssetRequest) -> list[tuple[str, str]]:
    return [(q.name, q.value) for q in request.qualifiers]


def _references(digests: Iterable[re_pb2.Digest]) -> list[Digest]:
    return [parse_digest(d, "referenced digest") for d in digests]


def _uris(uris: Iterable[str]) -> list[str]:
    listed = list(uris)
    if not listed:
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "at least one URI is required")
    return listed


class FetchService(ServicerBase, remote_asset_pb2_grpc.FetchServicer):
    """Remote Asset Fetch over what was pushed; this server never downloads from origins."""

    def _lookup(
        self, store: Store, kind: str, request: _AssetRequest, uris: list[str]
    ) -> tuple[str, Digest] | None:
        qualifiers = _qualifiers(request)
        names = []
        for uri in uris:  # validate every URI before answering for any
            name = asset_ref_name(kind, request.instance_name, uri, qualifiers)
            names.append((uri, name))
            if name.startswith(ASSET_REF_PREFIX):  # also where older servers kept it
                hashed = hashed_asset_ref_name(kind, request.instance_name, uri, qualifiers)
                if hashed != name:
                    names.append((uri, hashed))
        for uri, name in names:
            try:
                if name.startswith(ASSET_REF_PREFIX):
                    return uri, self._get_ref(store, name, f"the asset {uri!r}", lookup_asset)
                return uri, self._get_ref(store, name, f"the asset {uri!r}")
            except RefNotFoundError:
                continue
        return None

    def _fetch(
        self, kind: str, request: _AssetRequest
    ) -> tuple[DigestFunction, str, Digest]:
        """The function, URI and digest a Fetch answers with; NOT_FOUND when no URI names
        content that is present."""
        self._check(request.instance_name)
        uris = _uris(request.uris)
        function = self.functions.from_request(request.digest_function, ())
        store = self.functions.store_for(function)
        found = self._lookup(store, kind, request, uris)
        # Only a directory's root is checked: refs are set only on complete trees and prune
        # keeps what refs reach, so walking the whole tree on every fetch would buy nothing.
        if found is None or store.find_missing([found[1]]):
            raise self._not_found(uris)
        uri, digest = found
        return function, uri, digest

    @staticmethod
    def _not_found(uris: list[str]) -> StatusError:
        # A miss is a NOT_FOUND *error*, not an OK call with NOT_FOUND in the response's
        # status: that field is for failures fetching from an origin, which this server never
        # contacts, and BuildStream 1.6 reads only the error (docs/buildstream.md).
        return StatusError(
            grpc.StatusCode.NOT_FOUND,
            f"no content pushed for {', '.join(repr(u) for u in uris)}",
        )

    @rpc_method
    def FetchBlob(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.FetchBlobRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.FetchBlobResponse:
        function, uri, digest = self._fetch("blob", request)
        return remote_asset_pb2.FetchBlobResponse(
            status=OK_STATUS, uri=uri, qualifiers=request.qualifiers,
            blob_digest=digest.to_proto(), digest_function=reapi_value(function),
        )

    @rpc_method
    def FetchDirectory(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.FetchDirectoryRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.FetchDirectoryResponse:
        function, uri, digest = self._fetch("directory", request)
        return remote_asset_pb2.FetchDirectoryResponse(
            status=OK_STATUS, uri=uri, qualifiers=request.qualifiers,
            root_directory_digest=digest.to_proto(), digest_function=reapi_value(function),
        )


class PushService(ServicerBase, remote_asset_pb2_grpc.PushServicer):
    @rpc_method
    def PushBlob(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.PushBlobRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.PushBlobResponse:
        self._check(request.instance_name)
        self._check_writable()
        digest = parse_digest(request.blob_digest, "blob_digest")
        blobs = _references(request.references_blobs)
        trees = _references(request.references_directories)
        store = self._store_for(request.digest_function, [digest, *blobs, *trees])
        qualifiers = _qualifiers(request)
        names = [asset_ref_name("blob", request.instance_name, uri, qualifiers)
                 for uri in _uris(request.uris)]
        set_asset(store, names, "blob", digest, blobs, trees, "PushBlob")
        return remote_asset_pb2.PushBlobResponse()

    @rpc_method
    def PushDirectory(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.PushDirectoryRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.PushDirectoryResponse:
        self._check(request.instance_name)
        self._check_writable()
        root = parse_digest(request.root_directory_digest, "root_directory_digest")
        blobs = _references(request.references_blobs)
        trees = _references(request.references_directories)
        store = self._store_for(request.digest_function, [root, *blobs, *trees])
        qualifiers = _qualifiers(request)
        names = [asset_ref_name("directory", request.instance_name, uri, qualifiers)
                 for uri in _uris(request.uris)]
        refs = [writable_ref_name(name) for name in names
                if not name.startswith(ASSET_REF_PREFIX)]  # URIs naming refs of the user's
        assets = [name for name in names if name.startswith(ASSET_REF_PREFIX)]
        if refs:
            self._set_tree_ref(store, refs, root, "PushDirectory")
        if assets:
            set_asset(store, assets, "directory", root, blobs, trees, "PushDirectory")
        return remote_asset_pb2.PushDirectoryResponse()

