"""The ``grpc://`` blob store, :class:`GrpcBlobStore`: CAS batch calls for small blobs,
ByteStream (see :mod:`casframe_grpc._streams`) for large ones, within the server's limits."""

from __future__ import annotations

import io
import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, BinaryIO

import grpc

from casframe import (
    DIGEST_FUNCTIONS,
    BlobLimits,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    CasframeError,
    CorruptBlobError,
    Digest,
    RemoteProtocolError,
    UnsupportedOperationError,
)
from casframe.digest import CHUNK_SIZE
from casframe.reapi import bytestream, decode_read_response
from casframe.reapi import remote_execution as reapi
from casframe.reapi import remote_execution_grpc as reapi_grpc

from ._answers import TreeListing, answered_entry, answered_missing
from ._compression import Codec, WireStats, negotiate
from ._connection import Connection, translate_status
from ._streams import STREAM_CHUNK, ByteStreamReader, SpoolingWriter, StreamingWriter

__all__ = ["GrpcBlobStore"]

log = logging.getLogger("casframe.grpc")

# REAPI's advice when a server advertises no batch limit (max_batch_total_size_bytes = 0):
# grpc's default largest message, 4 MiB.
_DEFAULT_BATCH_LIMIT = 4 << 20
# Room kept in every batch request for the instance name and the message's own framing.
_REQUEST_OVERHEAD = 1024
# What one blob adds to a batch message besides its bytes: its Digest (64 hex characters and
# a size), field tags and length prefixes, and a status in responses. Measured at 80-90 bytes.
_ENTRY_OVERHEAD = 128
# Payload the core groups into one batch call, although servers accept more (casframe's 3 MiB,
# most 4 MiB): a call's own cost is small next to 1 MiB of blobs, while each call in flight
# holds about four times its payload (blobs, message, serialized copy, grpcio's buffer). A push
# of 20,000 small files on loopback was as fast with 1 MiB as with 3 MiB batches and peaked
# at 90 instead of 126 MiB (4 calls in flight).
_BATCH_TARGET = 1 << 20
# Entries per batch call, whatever their size: bounds the work one call asks of the server.
_MAX_BATCH_ENTRIES = 1000
# Digests per FindMissingBlobs call: ~80 bytes each, so 10,000 make ~800 KB, far below the
# 4 MiB message that every server accepts.
_FIND_MISSING_BATCH = 10_000
# Spooled writers keep this much in memory before moving to a temporary file.
_SPOOL_IN_MEMORY = CHUNK_SIZE
# A stream's deadline grows with its size at this rate (bytes/s) on top of ``timeout``, so a
# large transfer is not cut off by the per-call timeout while a stuck one still ends.
_SLOWEST_STREAM_RATE = 1 << 20


def _add_digests(field: Any, digests: Iterable[Digest]) -> None:
    """Append digests to a repeated Digest field (faster than building messages first)."""
    add = field.add
    for hash_, size in digests:
        add(hash=hash_, size_bytes=size)



class GrpcBlobStore(BlobStore):
    """Blobs on a REAPI server: CAS batch calls for small ones, ByteStream for large ones."""

    capabilities = frozenset()  # REAPI offers no listing, deleting or touching of blobs
    # REAPI 2.3 requests name their digest function: any of casframe's may be asked for, and
    # each store, once open, declares those its server lists (checked on open).
    digest_functions = frozenset(DIGEST_FUNCTIONS)

    def __init__(self, conn: Connection, capabilities: reapi.ServerCapabilities | None) -> None:
        self.conn = conn
        self.digest_function = conn.function
        self._function = conn.function_value
        offered = set(capabilities.cache_capabilities.digest_functions if capabilities else ())
        # A server that lists none (or has no Capabilities service) holds SHA-256 alone.
        offered = offered or {reapi.DigestFunction.SHA256}
        self.digest_functions = frozenset(
            f.name for f in DIGEST_FUNCTIONS.values() if f.reapi_value in offered
        )
        self._cas = reapi_grpc.ContentAddressableStorageStub(conn.channel)
        # ByteStream's bulk messages go through casframe._wire instead of protobuf (the
        # method names and wire format are ByteStream's own).
        self._read = conn.channel.unary_stream(
            "/google.bytestream.ByteStream/Read",
            request_serializer=bytestream.ReadRequest.SerializeToString,
            response_deserializer=decode_read_response,
        )
        self._write = conn.channel.stream_unary(
            "/google.bytestream.ByteStream/Write",
            request_serializer=None,  # the requests are encoded already
            response_deserializer=bytestream.WriteResponse.FromString,
        )
        self._timeout = conn.options.timeout
        #: Content and wire bytes moved so far (see casframe_grpc._compression).
        self.wire = WireStats()
        #: How ByteStream transfers and batch reads travel, and how batch updates do.
        self.streams: Codec
        self.batch_updates: Codec
        self.streams, self.batch_updates = negotiate(
            conn.options.compression, capabilities, conn.where, self.wire
        )
        cache = capabilities.cache_capabilities if capabilities is not None else None
        server_limit = cache.max_batch_total_size_bytes if cache is not None else 0
        #: Largest batch request or response, in bytes, counting messages' own framing.
        self.batch_limit = (
            min(server_limit or _DEFAULT_BATCH_LIMIT, conn.options.max_message_size)
            - _REQUEST_OVERHEAD
        )
        #: Largest blob the server accepts (0: no limit advertised).
        self.max_blob_size = cache.max_cas_blob_size_bytes if cache is not None else 0
        # The core groups batches by payload only; leave room for a thousand entries' framing.
        framing = _MAX_BATCH_ENTRIES * _ENTRY_OVERHEAD
        self.limits = BlobLimits(
            max_batch_bytes=min(_BATCH_TARGET, max(64 << 10, self.batch_limit - framing)),
            # The core may hand over many digests at once: they are split into calls here.
            max_batch_digests=_FIND_MISSING_BATCH * 10,
            max_concurrency=conn.options.max_concurrency,
        )

    def describe(self) -> str:
        return self.conn.where

    def close(self) -> None:
        if self.wire.content_sent or self.wire.content_received:
            log.debug("%s: %s", self.conn.where, self.wire.describe())
        self.streams.compressing.close()
        self.conn.close()

    # -- batching -----------------------------------------------------------------------------

    def fits_batch(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes can travel in a batch call on its own."""
        return size + _ENTRY_OVERHEAD <= self.batch_limit

    def _batches(self, digests: Iterable[Digest]) -> Iterator[list[Digest]]:
        """Group digests whose blobs fit batch calls, each group under the batch limit."""
        group: list[Digest] = []
        total = 0
        for digest in digests:
            cost = digest.size + _ENTRY_OVERHEAD
            if group and (total + cost > self.batch_limit or len(group) >= _MAX_BATCH_ENTRIES):
                yield group
                group, total = [], 0
            group.append(digest)
            total += cost
        if group:
            yield group

    def _stream_timeout(self, size: int) -> float:
        return self._timeout + size / _SLOWEST_STREAM_RATE

    # -- primitives -----------------------------------------------------------------------------

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        # Keyed by (hash, size), which a Digest is: answers are looked up, not parsed.
        asked: dict[tuple[str, int], Digest] = {d: d for d in digests if d.size}
        missing: set[tuple[str, int]] = set()
        pending = list(asked.values())
        while pending:
            # Some servers (BuildGrid) answer once per hash in a request, so that one size
            # being present hides another being missing: a hash goes at most once per call.
            hashes: set[str] = set()
            now: list[Digest] = []
            later: list[Digest] = []
            for digest in pending:
                (later if digest.hash in hashes else now).append(digest)
                hashes.add(digest.hash)
            # Calls of 10,000 digests, up to max_concurrency of them in flight: the server
            # answers them in parallel (its lookups wait on the disk or the network).
            window = _FIND_MISSING_BATCH * self.limits.max_concurrency
            for start in range(0, len(now), window):
                calls = []
                try:
                    for first in range(start, min(start + window, len(now)), _FIND_MISSING_BATCH):
                        request = reapi.FindMissingBlobsRequest(
                            instance_name=self.conn.instance, digest_function=self._function)
                        _add_digests(request.blob_digests,
                                     now[first : first + _FIND_MISSING_BATCH])
                        calls.append(self._cas.FindMissingBlobs.future(
                            request, timeout=self._timeout))
                    for first, call in zip(
                        range(start, min(start + window, len(now)), _FIND_MISSING_BATCH),
                        calls, strict=True,
                    ):
                        with self.conn.calling("FindMissingBlobs"):
                            response = call.result()
                        missing.update(answered_missing(
                            self.conn.where, response, now[first : first + _FIND_MISSING_BATCH]
                        ))
                finally:
                    for call in calls:
                        call.cancel()  # after an error: the rest are not needed (else no-op)
            pending = later
        return {asked[key] for key in missing}

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        if digest.size == 0 or offset >= digest.size:
            # Nothing to read, but a missing blob must still be reported as missing.
            if digest.size and self.find_missing_blobs([digest]):
                raise self._not_found(digest)
            return io.BytesIO(b"")
        if digest.size <= STREAM_CHUNK and self.fits_batch(digest.size):
            # One unary call costs less than setting up a stream for a single message.
            data = self._read_batch([digest])[digest]
            stream = io.BytesIO(data)
            stream.seek(offset)
            return stream
        request = bytestream.ReadRequest(
            resource_name=(f"{self.conn.resource_prefix()}{self.streams.resource_part}/"
                           f"{self.conn.function_segment}{digest.hash}/{digest.size}"),
            read_offset=offset,
        )
        responses = self._read(
            request, timeout=self._stream_timeout(digest.size - offset)
        )
        reader = ByteStreamReader(self, digest, offset, responses)
        try:
            reader.prefetch()
        except BaseException:
            reader.close()
            raise
        return reader  # type: ignore[return-value]

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        # A blob known to fit a batch call is kept in memory until it is sent in one.
        if size_hint is not None and self.fits_batch(size_hint):
            return SpoolingWriter(self, max(size_hint, _SPOOL_IN_MEMORY))
        return SpoolingWriter(self, _SPOOL_IN_MEMORY)

    def begin_write_for(self, digest: Digest) -> BlobWriter:
        """Large blobs stream to the server as they are written (the resource name needs
        only the digest); small ones are collected for one batch call."""
        self._check_size(digest)
        if self.fits_batch(digest.size):
            return self.begin_write(digest.size)
        return StreamingWriter(self, digest)

    # -- batch fast paths ---------------------------------------------------------------------

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        small: list[Digest] = []
        for digest in dict.fromkeys(digests):
            if digest.size == 0:
                yield digest, b""
            elif self.fits_batch(digest.size):
                small.append(digest)
            else:
                with self.open_blob(digest) as stream:
                    yield digest, stream.read()
        for group in self._batches(small):
            yield from self._read_batch(group).items()

    def _read_batch(self, group: list[Digest]) -> dict[Digest, bytes]:
        request = reapi.BatchReadBlobsRequest(instance_name=self.conn.instance,
                                              digest_function=self._function)
        if self.streams.compressed:
            request.acceptable_compressors.append(reapi.Compressor.ZSTD)
        _add_digests(request.digests, group)
        with self.conn.calling("BatchReadBlobs"):
            response = self._cas.BatchReadBlobs(request, timeout=self._timeout)
        wanted: dict[tuple[str, int], Digest] = {d: d for d in group}
        found: dict[Digest, bytes] = {}
        missing: list[Digest] = []
        answered_already: set[Digest] = set()
        for entry in response.responses:
            digest = answered_entry(self.conn.where, "BatchReadBlobs", entry.digest, wanted,
                                    answered_already)
            if entry.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                missing.append(digest)
            elif entry.status.code:
                raise translate_status(entry.status.code, entry.status.message,
                                       self.conn.where, f"BatchReadBlobs of {digest}",
                                       digest=digest)
            else:
                data = self.streams.unpack(digest, entry.data, entry.compressor,
                                           self.conn.where)
                if len(data) != digest.size:
                    raise CorruptBlobError(
                        digest, f"{self.conn.where} sent {len(data)} bytes for it"
                    )
                found[digest] = data
        missing += [d for d in group if d not in found and d not in missing]
        if missing:
            raise self._not_found_all(missing)
        return found

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        small: dict[Digest, bytes] = {}
        # Compressed, each entry's frame is made in the codec's threads while the next blob
        # is read (``blobs`` is often a reader's generator).
        frames: dict[Digest, Future[bytes] | None] = {}
        try:
            for digest, data in blobs:
                if digest.size == 0:
                    continue
                self._check_size(digest)
                if self.fits_batch(digest.size):
                    small[digest] = data
                    frames[digest] = self.batch_updates.pack_later(data)
                else:
                    self.upload(digest, io.BytesIO(data))
            for group in self._batches(small):
                self._update_batch([(digest, small[digest]) for digest in group], frames)
        finally:
            for frame in frames.values():
                if frame is not None:
                    frame.cancel()  # after an error: not needed (else a no-op)

    def _update_batch(
        self,
        blobs: list[tuple[Digest, bytes]],
        frames: Mapping[Digest, Future[bytes] | None] | None = None,
    ) -> None:
        request = reapi.BatchUpdateBlobsRequest(instance_name=self.conn.instance,
                                                digest_function=self._function)
        add = request.requests.add
        for digest, data in blobs:
            hash_, size = digest
            packed, compressor = self.batch_updates.pack(
                data, frames.get(digest) if frames is not None else None
            )
            # Filled in place: building Request messages first and passing them in copies
            # every blob once more (and took four times as long).
            entry = add(data=packed)
            if compressor:
                entry.compressor = compressor
            entry.digest.hash = hash_
            entry.digest.size_bytes = size
        with self.conn.calling("BatchUpdateBlobs"):
            response = self._cas.BatchUpdateBlobs(request, timeout=self._timeout)
        wanted: dict[tuple[str, int], Digest] = {d: d for d, _ in blobs}
        stored: set[Digest] = set()
        for entry in response.responses:
            digest = answered_entry(self.conn.where, "BatchUpdateBlobs", entry.digest, wanted,
                                    stored)
            if entry.status.code:
                raise translate_status(entry.status.code, entry.status.message,
                                       self.conn.where, f"BatchUpdateBlobs of {digest}",
                                       digest=digest)
        unanswered = [d for d in wanted.values() if d not in stored]
        if unanswered:
            raise RemoteProtocolError(
                f"{self.conn.where} did not confirm storing {len(unanswered)} "
                f"blob(s) of a BatchUpdateBlobs call, e.g. {unanswered[0]}"
            )

    def upload(self, digest: Digest, stream: BinaryIO) -> None:
        """Store a blob whose content ``stream`` holds (verified by the core already)."""
        self._check_size(digest)
        if self.fits_batch(digest.size):
            self._update_batch([(digest, stream.read())])
            return
        writer = StreamingWriter(self, digest)
        try:
            offset = 0
            while offset < digest.size:
                chunk = stream.read(min(STREAM_CHUNK, digest.size - offset))
                if not chunk:
                    raise CasframeError(f"upload of {digest} ended after {offset} bytes")
                writer.write(chunk)
                offset += len(chunk)
            writer.commit(digest)
        except BaseException:
            writer.abort()
            raise

    def check_writable(self) -> None:
        """Upload the empty blob: a read-only server or instance refuses it (PERMISSION_DENIED).

        REAPI has no call that says whether the CAS accepts writes (``update_enabled`` in the
        capabilities concerns the ActionCache only, which many servers keep read-only for
        clients that may still upload blobs), so the probe is a write that changes nothing.
        The refusal arrives as :class:`PermissionDeniedError`, with the server's reason.
        """
        self._update_batch([(Digest.empty(self.digest_function), b"")])

    # -- GetTree -------------------------------------------------------------------------------

    def get_tree(self, root: Digest) -> Iterator[bytes]:
        """Every Directory of the tree under ``root`` (serialized), in a few streamed pages.

        One call instead of one round of batch reads per level of the tree. The messages are
        serialized again here (deterministically); a server that stored them in another
        encoding yields bytes that hash to other digests, which a caller must treat as
        unknown, never as the tree's. Raises :class:`BlobNotFoundError` when ``root`` is
        missing, and :class:`RemoteProtocolError` when the server repeats a page token, sends
        more than a few empty pages, or more Directories (or bytes of them) than the URL's
        ``get_tree_max_directories`` (``get_tree_max_bytes``) allow: a server paging forever is
        stopped within bounded memory.
        """
        listing = TreeListing(self.conn.where, root, self.conn.options.get_tree_max_directories,
                              self.conn.options.get_tree_max_bytes)
        token = ""
        while True:
            request = reapi.GetTreeRequest(
                instance_name=self.conn.instance, root_digest=root.to_proto(), page_token=token,
                digest_function=self._function,
            )
            token = ""
            with self.conn.calling("GetTree", digest=root):
                # A server may send every page in one stream (each but the last naming the
                # next) or end the stream after a page: then ask again from its token.
                call = self._cas.GetTree(request, timeout=self._stream_timeout(0))
                try:
                    for page in call:
                        listing.count(page)
                        for directory in page.directories:
                            yield directory.SerializeToString(deterministic=True)
                        token = page.next_page_token
                finally:
                    call.cancel()  # after an error or an early stop: no more pages wanted
            if not token:
                return

    def _check_size(self, digest: Digest) -> None:
        if self.max_blob_size and digest.size > self.max_blob_size:
            raise UnsupportedOperationError(
                f"{self.conn.where} accepts blobs of at most {self.max_blob_size} bytes; "
                f"{digest} is larger"
            )

    def _not_found_all(self, digests: list[Digest]) -> BlobNotFoundError:
        return BlobNotFoundError(digests, self.conn.where)
