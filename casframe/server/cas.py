"""The REAPI ContentAddressableStorage service: FindMissingBlobs, the batch methods and GetTree.

Uploads are verified blob by blob before they are stored, so a bad blob fails alone and
nothing unverified becomes visible; batch replies are kept under the server's message limit
(requests whose smallest reply could not fit are refused before any work). GetTree pages are
stateless, so any server behind a load balancer can continue a listing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Executor

import grpc
from google.protobuf.message import DecodeError

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidDigestError,
)
from casframe.server.compressed import (
    decode_update_entry,
    encode_read_entry,
    uncompressed_batch_bytes,
)
from casframe.server.counts import NO_COUNTS, ContentCounts
from casframe.server.errors import (
    OK_STATUS,
    StatusError,
    async_rpc_method,
    rpc_method,
    status_proto,
)
from casframe.server.names import Instances
from casframe.server.pool import iterate_in_pool
from casframe.server.servicebase import ServicerBase, parse_digest
from casframe.server.settings import ServerSettings
from casframe.store import Store

__all__ = ["CasService"]


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
class CasService(ServicerBase, re_grpc.ContentAddressableStorageServicer):
    """The CAS methods: unary ones run in the server's thread pool; GetTree is a coroutine
    whose store work runs in ``pool``."""

    def __init__(
        self, store: Store, settings: ServerSettings, instances: Instances, pool: Executor, *,
        counts: ContentCounts = NO_COUNTS,
    ) -> None:
        super().__init__(store, settings, instances, counts=counts)
        self.pool = pool

    @rpc_method
    def FindMissingBlobs(  # noqa: N802 - gRPC method name
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.FindMissingBlobsResponse:
        self._check(request.instance_name)
        digests = [parse_digest(d) for d in request.blob_digests]
        blobs = self._store_for(request.digest_function, digests).verified
        # REAPI: the server should extend the lifetime of the blobs it reports present, since
        # the client will now refer to them instead of uploading them (prune's grace period).
        missing = blobs.find_missing(digests, freshen=True)
        response = re_pb2.FindMissingBlobsResponse()
        reported = 0
        for digest in digests:  # request order, each once
            if digest in missing:
                missing.discard(digest)
                response.missing_blob_digests.add(hash=digest.hash, size_bytes=digest.size)
                reported += 1
        self.counts.digests_found(len(digests), reported)
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
        self._check(request.instance_name)
        self._check_writable()
        items = request.requests
        contents = [item.data for item in items]  # each access copies the bytes: once each
        least_reply = sum(_least_entry_bytes(item.digest, 0) for item in items)
        self._check_batch_size(uncompressed_batch_bytes(items, contents), least_reply,
                               len(items), "batch update")

        parsed = _parse_digests(item.digest for item in items)
        blobs = self._store_for(request.digest_function,
                                (d for d in parsed if isinstance(d, Digest))).verified
        statuses = []
        verified: dict[Digest, bytes] = {}
        for item, data, digest in zip(items, contents, parsed, strict=True):
            try:
                if not isinstance(digest, Digest):
                    raise digest
                data = decode_update_entry(digest, item.compressor, data, self.settings)
                actual = Digest.of_bytes(data, blobs.function)
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
                blobs.write_hashed(verified.items())
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
        if failure is None:
            stored = [d.size for d, status in zip(parsed, statuses, strict=True)
                      if status is None and isinstance(d, Digest)]
            self.counts.blobs_stored(len(stored), sum(stored))
        return response

    @rpc_method
    def BatchReadBlobs(  # noqa: N802 - gRPC method name
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchReadBlobsResponse:
        self._check(request.instance_name)
        digests = _parse_digests(request.digests)
        blobs = self._store_for(request.digest_function,
                                (d for d in digests if isinstance(d, Digest))).verified
        # The reply has an entry for every requested digest, duplicates included.
        sizes = [d.size if isinstance(d, Digest) else 0 for d in digests]
        least_reply = sum(map(_least_entry_bytes, request.digests, sizes))
        self._check_batch_size(sum(sizes), least_reply, len(digests), "batch read")
        wanted = {d for d in digests if isinstance(d, Digest)}

        results: dict[Digest, bytes | BaseException] = {}
        try:
            # Clients ask for blobs they know are stored, so no existence check first.
            for digest, data in blobs.read_many(wanted):
                results[digest] = data
        except (BlobNotFoundError, CorruptBlobError, OSError):
            # One bad blob (missing, damaged, unreadable) ended the batch: read the rest one
            # by one, each with its own status.
            for digest in wanted:
                if digest not in results:
                    try:
                        results[digest] = blobs.read_bytes(digest)
                    except (BlobNotFoundError, CorruptBlobError, OSError) as exc:
                        results[digest] = exc

        response = re_pb2.BatchReadBlobsResponse()
        add = response.responses.add
        failed = False
        served = served_bytes = 0
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
                served += 1
                served_bytes += len(outcome)  # the blob's own (uncompressed) size
            entry.digest.CopyFrom(message)
        if failed:
            _fit_reply(response, self.settings.max_message_bytes)
        self.counts.blobs_served(served, served_bytes)
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
        self._check(request.instance_name)
        root = parse_digest(request.root_digest, "root_digest")
        blobs = self._store_for(request.digest_function, [root]).verified
        if request.page_size < 0:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        page_size = request.page_size or _DEFAULT_TREE_PAGE
        start = _parse_page_token(request.page_token, root)
        if blobs.find_missing([root]):
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"root directory not found: {root}")

        byte_limit = self.settings.max_message_bytes - _PAGE_FRAMING_BYTES
        page = re_pb2.GetTreeResponse()
        page_bytes = 0
        count = 0
        for index, data in enumerate(_tree_directories(blobs, root)):
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


def _parse_digests(messages: Iterable[re_pb2.Digest]) -> list[Digest | InvalidDigestError]:
    """The digests of a batch call, each invalid one as its error (it fails alone)."""
    digests: list[Digest | InvalidDigestError] = []
    for message in messages:
        try:
            digests.append(parse_digest(message))
        except InvalidDigestError as exc:
            digests.append(exc)
    return digests


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
                child = parse_digest(node.digest, f"subdirectory digest in {digest}")
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        level = next_level

