"""The REAPI services over one :class:`casframe.store.Store`: Capabilities, CAS, ActionCache,
Remote Asset Fetch and Push, and BuildStream's ReferenceStorage (ByteStream lives in
:mod:`casframe.server.bytestream`).

Each servicer checks the instance name, the digest function and read-only mode, then calls the
Store; every upload goes through the Store's verified write paths, so nothing unverified ever
becomes visible. Errors are raised, never returned, and become statuses in
:mod:`casframe.server.errors`.

Where things are kept (all in the Store's refs, so every backend gets them and several servers
over one bucket agree):

* action results: ref ``ac/{instance or _}/{hash}/{size}`` → the ActionResult message, stored as
  a blob;
* Remote Asset ``casframe:ref/NAME`` → the ref ``NAME`` itself (a Directory tree);
* BuildStream 1.6's ``urn:fdc:buildstream.build:2020:v1:KEY`` directories → the ref ``KEY``,
  the same ref BuildStream 1.4 reads and writes through ReferenceStorage;
* any other Remote Asset URI → ref ``asset/{blob|directory}/{sha256 of instance, URI and
  qualifiers}``, or ``asset/held/{blob|directory}/{…}`` when pushed with references
  (:mod:`casframe.server.assets`);
* ReferenceStorage keys → refs of the same name.

Refs are store-wide: every instance sees the same refs; the action cache and generic Remote
Asset entries are per instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor

import grpc
from google.protobuf.message import DecodeError

from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2, remote_asset_pb2_grpc
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.build.bazel.semver import semver_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2, buildstream_pb2_grpc
from casframe.actions import action_outputs
from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidDigestError,
    RefNotFoundError,
)
from casframe.refkinds import ASSET_REF_PREFIX, action_result_outputs, writable_ref_name
from casframe.server.assets import lookup_asset, set_asset
from casframe.server.compressed import (
    SERVED_COMPRESSORS,
    decode_update_entry,
    encode_read_entry,
    uncompressed_batch_bytes,
)
from casframe.server.errors import (
    OK_STATUS,
    StatusError,
    async_rpc_method,
    missing_blobs_error,
    rpc_method,
    status_proto,
)
from casframe.server.names import (
    Instances,
    action_ref_name,
    asset_ref_name,
    check_digest_function,
    hashed_asset_ref_name,
)
from casframe.server.pool import iterate_in_pool
from casframe.server.settings import ServerSettings
from casframe.store import Store
from casframe.tree import missing_in_tree

__all__ = [
    "ActionCacheService",
    "CapabilitiesService",
    "CasService",
    "FetchService",
    "PushService",
    "ReferenceStorageService",
]

# Directories in one GetTree page when the client does not ask for a size: large enough to
# cut round trips, small enough that a page of typical Directory messages stays near 100 KiB.
_DEFAULT_TREE_PAGE = 1000
# Room kept in a GetTree page's message for framing beyond the Directory messages themselves.
_PAGE_FRAMING_BYTES = 64 << 10

# The smallest google.rpc.Status a batch reply entry can carry for a failed blob: the code's
# tag and value (gRPC codes are below 128), with the message dropped (see _fit_reply).
_CODE_ONLY_STATUS_BYTES = 2

# Decimal digits of the largest directory index a GetTree page token can name (int64's 19):
# longer tokens are refused before int() is asked to parse them (it refuses over 4,300).
_PAGE_TOKEN_DIGITS = 19

log = logging.getLogger("casframe.server")

_SHA256 = re_pb2.DigestFunction.SHA256


class _Base:
    """What every servicer shares: the store (refs; ``blobs``, its verified-blob layer, for
    content), the settings and the served instance names."""

    def __init__(self, store: Store, settings: ServerSettings, instances: Instances) -> None:
        self.store = store
        self.blobs = store.verified
        self.settings = settings
        self.instances = instances

    def _check(self, instance: str, digest_function: int = 0) -> str:
        check_digest_function(digest_function)
        return self.instances.check(instance)

    def _check_writable(self) -> None:
        if self.settings.read_only:
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED, "this server is read-only")

    def _get_ref(
        self,
        name: str,
        what: str,
        lookup: Callable[[Store, str], Digest] = Store.get_ref,
    ) -> Digest:
        """The digest a ref holds (found by ``lookup``); a damaged ref is the server's
        ``DATA_LOSS``, not the client's ``INVALID_ARGUMENT``, and its details (where it is
        stored) go to the log."""
        try:
            return lookup(self.store, name)
        except InvalidDigestError as exc:
            log.error("damaged ref %s: %s", name, exc)
            raise StatusError(
                grpc.StatusCode.DATA_LOSS,
                f"{what} is damaged in the server's store; set it again "
                "(the server log has the details)",
            ) from None

    def _set_tree_ref(self, names: Iterable[str], root: Digest, what: str) -> None:
        """Point refs at a tree after checking, once, that the whole tree is stored."""
        # Freshen while checking: prune's grace period then covers the tree from here on.
        missing = missing_in_tree(self.blobs, root, freshen=True)
        if missing:
            raise missing_blobs_error(
                grpc.StatusCode.FAILED_PRECONDITION, f"{what}: tree {root} is incomplete", missing
            )
        for name in names:
            self.store.set_ref(name, root, check_complete=False)


def _digest(message: re_pb2.Digest, what: str = "digest") -> Digest:
    try:
        return Digest.from_proto(message)
    except InvalidDigestError as exc:
        raise InvalidDigestError(f"invalid {what}: {exc}") from None


def _optional_digest(message: re_pb2.Digest) -> Digest | None:
    """A digest field that may be unset (empty hash)."""
    if not message.hash and not message.size_bytes:
        return None
    return Digest.from_proto(message)


class CapabilitiesService(_Base, re_grpc.CapabilitiesServicer):
    @rpc_method
    def GetCapabilities(  # noqa: N802 - gRPC method name
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        self._check(request.instance_name)
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[_SHA256],
                action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                    update_enabled=not self.settings.read_only
                ),
                max_batch_total_size_bytes=self.settings.max_batch_total_size_bytes,
                symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
                supported_compressors=SERVED_COMPRESSORS,
                supported_batch_update_compressors=SERVED_COMPRESSORS,
            ),
            execution_capabilities=re_pb2.ExecutionCapabilities(
                digest_function=_SHA256, digest_functions=[_SHA256], exec_enabled=False
            ),
            deprecated_api_version=semver_pb2.SemVer(major=2, minor=0),
            low_api_version=semver_pb2.SemVer(major=2, minor=0),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )


class CasService(_Base, re_grpc.ContentAddressableStorageServicer):
    """The CAS methods: unary ones run in the server's thread pool; GetTree is a coroutine
    whose store work runs in ``pool``."""

    def __init__(
        self, store: Store, settings: ServerSettings, instances: Instances, pool: Executor
    ) -> None:
        super().__init__(store, settings, instances)
        self.pool = pool

    @rpc_method
    def FindMissingBlobs(  # noqa: N802 - gRPC method name
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.FindMissingBlobsResponse:
        self._check(request.instance_name, request.digest_function)
        digests = [_digest(d) for d in request.blob_digests]
        # REAPI: the server should extend the lifetime of the blobs it reports present, since
        # the client will now refer to them instead of uploading them (prune's grace period).
        missing = self.blobs.find_missing(digests, freshen=True)
        response = re_pb2.FindMissingBlobsResponse()
        for digest in digests:  # request order, each once
            if digest in missing:
                missing.discard(digest)
                response.missing_blob_digests.add(hash=digest.hash, size_bytes=digest.size)
        return response

    def _check_batch_size(self, total: int, least_reply: int, count: int, what: str) -> None:
        """Refuse, before any work, a batch whose blobs or whose reply would be too large.

        ``total`` is the blob bytes the batch carries (each requested blob counted as often as
        it is requested, since the reply repeats it) and ``least_reply`` the size of the
        smallest reply that can answer it (see :func:`_least_entry_bytes`).
        """
        limit = self.settings.max_batch_total_size_bytes
        if total > limit:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} of {total} bytes is over this server's limit of {limit} bytes "
                "(max_batch_total_size_bytes); split it into smaller batches, "
                "and send large blobs through ByteStream",
            )
        message_limit = self.settings.max_message_bytes
        if least_reply > message_limit:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} of {count} blobs needs a reply of at least {least_reply} bytes, over "
                f"this server's message limit of {message_limit} bytes; "
                "split it into smaller batches",
            )

    @rpc_method
    def BatchUpdateBlobs(  # noqa: N802 - gRPC method name
        self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchUpdateBlobsResponse:
        self._check(request.instance_name, request.digest_function)
        self._check_writable()
        items = request.requests
        contents = [item.data for item in items]  # each access copies the bytes: once each
        least_reply = sum(_least_entry_bytes(item.digest, 0) for item in items)
        self._check_batch_size(uncompressed_batch_bytes(items, contents), least_reply,
                               len(items), "batch update")

        statuses = []
        verified: dict[Digest, bytes] = {}
        for item, data in zip(items, contents, strict=True):
            try:
                digest = _digest(item.digest)
                data = decode_update_entry(digest, item.compressor, data, self.settings)
                actual = Digest.of_bytes(data)
                if actual != digest:
                    raise DigestMismatchError(digest, actual)
            except Exception as exc:  # noqa: BLE001 - one bad blob fails alone
                statuses.append(status_proto(exc, self.settings.store_url))
                continue
            if digest.size:
                verified[digest] = data
            statuses.append(None)

        failure = None
        if verified:
            try:
                # Verified just above, blob by blob, so that a bad one fails alone: stored
                # without hashing everything twice. No existence check first: clients send
                # what FindMissingBlobs reported missing, and storing a blob that is there
                # already succeeds and freshens it.
                self.blobs.write_hashed(verified.items())
            except Exception as exc:  # noqa: BLE001 - reported on each blob it concerns
                failure = status_proto(exc, self.settings.store_url)

        response = re_pb2.BatchUpdateBlobsResponse()
        add = response.responses.add
        for item, status in zip(items, statuses, strict=True):
            entry = add()  # filled in place: a third faster than add(digest=..., status=...)
            entry.digest.CopyFrom(item.digest)
            entry.status.CopyFrom(status or failure or OK_STATUS)
        if failure or any(status is not None for status in statuses):
            _fit_reply(response, self.settings.max_message_bytes)
        return response

    @rpc_method
    def BatchReadBlobs(  # noqa: N802 - gRPC method name
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchReadBlobsResponse:
        self._check(request.instance_name, request.digest_function)
        digests: list[Digest | BaseException] = []
        for message in request.digests:
            try:
                digests.append(_digest(message))
            except InvalidDigestError as exc:
                digests.append(exc)
        # The reply has an entry for every requested digest, duplicates included.
        sizes = [d.size if isinstance(d, Digest) else 0 for d in digests]
        least_reply = sum(map(_least_entry_bytes, request.digests, sizes))
        self._check_batch_size(sum(sizes), least_reply, len(digests), "batch read")
        wanted = {d for d in digests if isinstance(d, Digest)}

        results: dict[Digest, bytes | BaseException] = {}
        try:
            # Clients ask for blobs they know are stored, so no existence check first.
            for digest, data in self.blobs.read_many(wanted):
                results[digest] = data
        except (BlobNotFoundError, CorruptBlobError, OSError):
            # One bad blob (missing, damaged, unreadable) ended the batch: read the rest one
            # by one, each with its own status.
            for digest in wanted:
                if digest not in results:
                    try:
                        results[digest] = self.blobs.read_bytes(digest)
                    except (BlobNotFoundError, CorruptBlobError, OSError) as exc:
                        results[digest] = exc

        response = re_pb2.BatchReadBlobsResponse()
        add = response.responses.add
        failed = False
        for message, parsed in zip(request.digests, digests, strict=True):
            outcome = results[parsed] if isinstance(parsed, Digest) else parsed
            if isinstance(outcome, BaseException):
                entry = add()
                entry.status.CopyFrom(status_proto(outcome, self.settings.store_url))
                failed = True
            else:
                data, compressor = encode_read_entry(
                    outcome, request.acceptable_compressors, self.settings
                )
                entry = add(data=data, compressor=compressor)
                entry.status.CopyFrom(OK_STATUS)
            entry.digest.CopyFrom(message)
        if failed:
            _fit_reply(response, self.settings.max_message_bytes)
        return response

    @async_rpc_method
    async def GetTree(  # noqa: N802 - gRPC method name
        self, request: re_pb2.GetTreeRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """A coroutine: each page is read and built in the pool, then sent from the event
        loop, so a client that stops reading holds its stream slot and one page, no thread."""
        async for page in iterate_in_pool(self.pool, self._tree_pages(request)):
            await context.write(page)

    def _tree_pages(self, request: re_pb2.GetTreeRequest) -> Iterator[re_pb2.GetTreeResponse]:
        self._check(request.instance_name, request.digest_function)
        root = _digest(request.root_digest, "root_digest")
        if request.page_size < 0:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        page_size = request.page_size or _DEFAULT_TREE_PAGE
        start = _parse_page_token(request.page_token, root)
        if self.blobs.find_missing([root]):
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"root directory not found: {root}")

        byte_limit = self.settings.max_message_bytes - _PAGE_FRAMING_BYTES
        page = re_pb2.GetTreeResponse()
        page_bytes = 0
        count = 0
        for index, data in enumerate(_tree_directories(self.blobs, root)):
            count = index + 1
            if index < start:
                continue
            if page.directories and (
                len(page.directories) >= page_size or page_bytes + len(data) > byte_limit
            ):
                page.next_page_token = _page_token(index, root)
                yield page
                page = re_pb2.GetTreeResponse()
                page_bytes = 0
            page.directories.add().MergeFromString(data)
            page_bytes += len(data) + 8
        if start and start >= count:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT, f"page_token {request.page_token!r} is past "
                f"the end of tree {root} ({count} directories)"
            )
        yield page


def _varint_bytes(value: int) -> int:
    """Bytes of ``value`` as a protobuf varint (a negative int64 takes ten)."""
    if value < 0:
        return 10
    return max(1, (value.bit_length() + 6) // 7)


def _field_bytes(length: int) -> int:
    """Bytes of a length-delimited protobuf field (tag below 16) carrying ``length`` bytes."""
    return 1 + _varint_bytes(length) + length


def _least_entry_bytes(digest: re_pb2.Digest, data_size: int) -> int:
    """An upper bound on one batch reply entry once :func:`_fit_reply` has run on the reply.

    The entry echoes the request's digest as it was sent, carries ``data_size`` bytes of
    blob (0 for an update or an invalid digest) and a status that is either OK (empty) or a
    code whose message may have been dropped; the compressor, IDENTITY, is not serialized.
    """
    inner = _field_bytes(digest.ByteSize()) + _field_bytes(_CODE_ONLY_STATUS_BYTES)
    if data_size:
        inner += _field_bytes(data_size)
    return _field_bytes(inner)


def _fit_reply(
    response: re_pb2.BatchReadBlobsResponse | re_pb2.BatchUpdateBlobsResponse, limit: int
) -> None:
    """Drop status messages, last entries first, until the reply fits in ``limit`` bytes.

    The codes stay, so every blob keeps its own status as the REAPI asks; only the text that
    explains a failure goes. A reply that fits is left exactly as it is. The batch methods
    refused, before any work, replies that could not fit even without messages, so this
    always ends under ``limit``.
    """
    excess = response.ByteSize() - limit
    for entry in reversed(response.responses):
        if excess <= 0:
            return
        if entry.status.message:
            before = _field_bytes(entry.ByteSize())
            entry.status.message = ""
            excess -= before - _field_bytes(entry.ByteSize())


def _page_token(index: int, root: Digest) -> str:
    # Stateless, so any server behind a load balancer can continue a listing.
    return f"{index}:{root.hash[:16]}"


def _parse_page_token(token: str, root: Digest) -> int:
    if not token:
        return 0
    index, _, root_prefix = token.partition(":")
    # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
    if (
        not (index.isascii() and index.isdigit())
        or len(index) > _PAGE_TOKEN_DIGITS
        or root_prefix != root.hash[:16]
    ):
        shown = token if len(token) <= 64 else f"{token[:64]}... ({len(token)} characters)"
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"page_token {shown!r} was not issued for a tree with root {root}",
        )
    return int(index)


def _tree_directories(blobs: VerifiedBlobs, root: Digest) -> Iterator[bytes]:
    """Serialized Directories of a tree, breadth first, each once, in a stable order.

    As the REAPI asks, a missing subdirectory is left out with its descendants rather than
    failing the whole listing.
    """
    seen = {root}
    level = [root]
    while level:
        absent = blobs.find_missing(level)
        present = [d for d in level if d not in absent]
        fetched = dict(blobs.read_many(present))
        next_level: list[Digest] = []
        for digest in present:
            data = fetched[digest]
            directory = re_pb2.Directory()
            try:
                directory.ParseFromString(data)
            except DecodeError:
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"blob {digest} is not a Directory"
                ) from None
            yield data
            for node in directory.directories:
                child = _digest(node.digest, f"subdirectory digest in {digest}")
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        level = next_level


class ActionCacheService(_Base, re_grpc.ActionCacheServicer):
    @rpc_method
    def GetActionResult(  # noqa: N802 - gRPC method name
        self, request: re_pb2.GetActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        instance = self._check(request.instance_name, request.digest_function)
        action = _digest(request.action_digest, "action_digest")
        not_found = StatusError(
            grpc.StatusCode.NOT_FOUND, f"no action result for {action} in instance {instance!r}"
        )
        try:
            result_digest = self._get_ref(
                action_ref_name(instance, action), f"the action result for {action}"
            )
            data = self.blobs.read_bytes(result_digest)
        except (RefNotFoundError, BlobNotFoundError):
            raise not_found from None
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            raise CorruptBlobError(result_digest, "not an ActionResult message") from None
        missing = self._missing_outputs(result)
        if missing:
            raise missing_blobs_error(
                grpc.StatusCode.NOT_FOUND,
                f"action result for {action} names outputs no longer stored",
                missing,
            )
        return result

    def _missing_outputs(self, result: re_pb2.ActionResult) -> set[Digest]:
        """Every blob the result names that is not stored (outputs, trees, logs)."""
        blobs = self.blobs
        outputs = action_outputs(result)
        missing = blobs.find_missing(outputs.blobs)
        if missing:
            return missing
        named, roots = action_result_outputs(blobs, outputs)
        missing = blobs.find_missing(named - outputs.blobs)
        for root in roots:
            missing |= missing_in_tree(blobs, root)
        return missing

    @rpc_method
    def UpdateActionResult(  # noqa: N802 - gRPC method name
        self, request: re_pb2.UpdateActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        instance = self._check(request.instance_name, request.digest_function)
        self._check_writable()
        action = _digest(request.action_digest, "action_digest")
        _check_output_paths(request.action_result)
        # Every digest it names must be valid now: a bad one stored here would fail each
        # client that later gets the result.
        action_outputs(request.action_result)
        stored = self.blobs.put_bytes(request.action_result.SerializeToString(deterministic=True))
        # Not a Directory, so no completeness check: GetActionResult checks outputs instead.
        self.store.set_ref(action_ref_name(instance, action), stored, check_complete=False)
        return request.action_result


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


_AssetRequest = (
    remote_asset_pb2.FetchBlobRequest
    | remote_asset_pb2.FetchDirectoryRequest
    | remote_asset_pb2.PushBlobRequest
    | remote_asset_pb2.PushDirectoryRequest
)


def _qualifiers(request: _AssetRequest) -> list[tuple[str, str]]:
    return [(q.name, q.value) for q in request.qualifiers]


def _references(digests: Iterable[re_pb2.Digest]) -> list[Digest]:
    return [_digest(d, "referenced digest") for d in digests]


def _uris(uris: Iterable[str]) -> list[str]:
    listed = list(uris)
    if not listed:
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "at least one URI is required")
    return listed


class FetchService(_Base, remote_asset_pb2_grpc.FetchServicer):
    """Remote Asset Fetch over what was pushed; this server never downloads from origins."""

    def _lookup(
        self, kind: str, request: _AssetRequest, uris: list[str]
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
                    return uri, self._get_ref(name, f"the asset {uri!r}", lookup_asset)
                return uri, self._get_ref(name, f"the asset {uri!r}")
            except RefNotFoundError:
                continue
        return None

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
        self._check(request.instance_name, request.digest_function)
        uris = _uris(request.uris)
        found = self._lookup("blob", request, uris)
        if found is None or self.blobs.find_missing([found[1]]):
            raise self._not_found(uris)
        uri, digest = found
        return remote_asset_pb2.FetchBlobResponse(
            status=OK_STATUS, uri=uri, qualifiers=request.qualifiers,
            blob_digest=digest.to_proto(), digest_function=_SHA256,
        )

    @rpc_method
    def FetchDirectory(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.FetchDirectoryRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.FetchDirectoryResponse:
        self._check(request.instance_name, request.digest_function)
        uris = _uris(request.uris)
        found = self._lookup("directory", request, uris)
        # Only the root is checked: refs are set only on complete trees and prune keeps what
        # refs reach, so walking the whole tree on every fetch would buy nothing.
        if found is None or self.blobs.find_missing([found[1]]):
            raise self._not_found(uris)
        uri, digest = found
        return remote_asset_pb2.FetchDirectoryResponse(
            status=OK_STATUS, uri=uri, qualifiers=request.qualifiers,
            root_directory_digest=digest.to_proto(), digest_function=_SHA256,
        )


class PushService(_Base, remote_asset_pb2_grpc.PushServicer):
    @rpc_method
    def PushBlob(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.PushBlobRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.PushBlobResponse:
        self._check(request.instance_name, request.digest_function)
        self._check_writable()
        digest = _digest(request.blob_digest, "blob_digest")
        qualifiers = _qualifiers(request)
        names = [asset_ref_name("blob", request.instance_name, uri, qualifiers)
                 for uri in _uris(request.uris)]
        set_asset(self.store, names, "blob", digest, _references(request.references_blobs),
                  _references(request.references_directories), "PushBlob")
        return remote_asset_pb2.PushBlobResponse()

    @rpc_method
    def PushDirectory(  # noqa: N802 - gRPC method name
        self, request: remote_asset_pb2.PushDirectoryRequest, context: grpc.ServicerContext
    ) -> remote_asset_pb2.PushDirectoryResponse:
        self._check(request.instance_name, request.digest_function)
        self._check_writable()
        root = _digest(request.root_directory_digest, "root_directory_digest")
        qualifiers = _qualifiers(request)
        names = [asset_ref_name("directory", request.instance_name, uri, qualifiers)
                 for uri in _uris(request.uris)]
        refs = [writable_ref_name(name) for name in names
                if not name.startswith(ASSET_REF_PREFIX)]  # URIs naming refs of the user's
        assets = [name for name in names if name.startswith(ASSET_REF_PREFIX)]
        if refs:
            self._set_tree_ref(refs, root, "PushDirectory")
        if assets:
            set_asset(self.store, assets, "directory", root,
                      _references(request.references_blobs),
                      _references(request.references_directories), "PushDirectory")
        return remote_asset_pb2.PushDirectoryResponse()


class ReferenceStorageService(_Base, buildstream_pb2_grpc.ReferenceStorageServicer):
    @rpc_method
    def GetReference(  # noqa: N802 - gRPC method name
        self, request: buildstream_pb2.GetReferenceRequest, context: grpc.ServicerContext
    ) -> buildstream_pb2.GetReferenceResponse:
        self._check(request.instance_name)
        digest = self._get_ref(request.key, f"ref {request.key}")
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
        self._set_tree_ref(keys, _digest(request.digest), "UpdateReference")
        return buildstream_pb2.UpdateReferenceResponse()

    @rpc_method
    def Status(  # noqa: N802 - gRPC method name
        self, request: buildstream_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> buildstream_pb2.StatusResponse:
        self._check(request.instance_name)
        return buildstream_pb2.StatusResponse(allow_updates=not self.settings.read_only)
