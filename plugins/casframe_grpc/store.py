"""The ``grpc://`` and ``grpcs://`` stores: any REAPI v2 server as a casframe backend.

Blobs travel through the ContentAddressableStorage batch calls when they are small and through
ByteStream when they are large; refs through BuildStream's ReferenceStorage or the Remote Asset
API, whichever the server offers. The server's capabilities are read once, on open, and its
batch limit is respected.

Like every backend, this one only moves bytes: it never hashes or verifies content (the core
does, above it), and it never lets a grpc error escape (see :mod:`casframe_grpc._connection`).
REAPI has no call to list or delete blobs or refs, so neither is offered.
"""

from __future__ import annotations

import io
import logging
import queue
import tempfile
import threading
import uuid
from collections.abc import Collection, Iterable, Iterator
from typing import Any, BinaryIO, cast

import grpc

from casframe import (
    EMPTY_DIGEST,
    BackendUnavailableError,
    BlobLimits,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    CasframeError,
    CorruptBlobError,
    Digest,
    PermissionDeniedError,
    RefCapability,
    RefInfo,
    RefStore,
    RemoteProtocolError,
    Store,
    StoreURL,
    UnsupportedOperationError,
)
from casframe.digest import CHUNK_SIZE
from casframe.reapi import buildstream as bst
from casframe.reapi import buildstream_grpc as bst_grpc
from casframe.reapi import (
    bytestream,
    decode_read_response,
    encode_write_request,
    finish_write_request,
)
from casframe.reapi import remote_asset as asset
from casframe.reapi import remote_asset_grpc as asset_grpc
from casframe.reapi import remote_execution as reapi
from casframe.reapi import remote_execution_grpc as reapi_grpc

from ._answers import (
    TreeListing,
    answered_entry,
    answered_missing,
    answered_ref_digest,
    check_capabilities,
)
from ._compression import Codec, WireStats, negotiate
from ._connection import Connection, GrpcOptions, translate_error, translate_status

__all__ = ["GrpcBlobStore", "GrpcRefStore", "open_grpc_store", "ref_uri"]

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
# ByteStream chunk: the size REAPI clients conventionally use (Bazel, BuildStream); large
# enough that per-message cost vanishes, small enough to stay far below message limits.
_STREAM_CHUNK = CHUNK_SIZE
# Spooled writers keep this much in memory before moving to a temporary file.
_SPOOL_IN_MEMORY = CHUNK_SIZE
# Chunks a streaming upload queues ahead of its Write call: enough to keep the call busy while
# the writer reads and hashes the next one, few enough that an upload stays near 3 MiB.
_QUEUED_CHUNKS = 2
# A stream's deadline grows with its size at this rate (bytes/s) on top of ``timeout``, so a
# large transfer is not cut off by the per-call timeout while a stuck one still ends.
_SLOWEST_STREAM_RATE = 1 << 20

_REF_URI_PREFIX = "casframe:ref/"


def _add_digests(field: Any, digests: Iterable[Digest]) -> None:
    """Append digests to a repeated Digest field (faster than building messages first)."""
    add = field.add
    for hash_, size in digests:
        add(hash=hash_, size_bytes=size)


def ref_uri(name: str) -> str:
    """The Remote Asset URI under which ref ``name`` is pushed and fetched."""
    return _REF_URI_PREFIX + name


class _ByteStreamReader(io.RawIOBase):
    """A blob read through ByteStream.Read: messages are pulled one at a time, as consumed.

    ``read(n)`` and ``readinto`` fill what they are given unless the stream ends, like a file.
    """

    def __init__(
        self, store: GrpcBlobStore, digest: Digest, offset: int, responses: grpc.Call
    ) -> None:
        super().__init__()
        self._store = store
        self._digest = digest
        self._remaining = digest.size - offset  # bytes the server may still send
        self._responses = responses
        # The content, decoded when it travels compressed.
        self._chunks = store.streams.read_chunks(
            responses, digest, self._remaining, store.conn.where
        )
        self._pending = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def prefetch(self) -> None:
        """Wait for the first message, so that a missing blob is reported on open."""
        self._pull()

    def _pull(self) -> bool:
        """Fetch the next non-empty message into ``_pending``; False at the end."""
        if self._ended:
            return False
        with self._store.conn.calling("ByteStream.Read", digest=self._digest):
            for data in self._chunks:  # views of received ReadResponses' data, or decoded
                if data:
                    if len(data) > self._remaining:
                        self.close()  # a server sending more than the blob holds: stop it
                        raise CorruptBlobError(
                            self._digest,
                            f"{self._store.conn.where} sent more than its {self._digest.size} "
                            "bytes through ByteStream.Read",
                        )
                    self._remaining -= len(data)
                    self._pending = memoryview(data)
                    return True
        self._ended = True
        if self._remaining:
            raise CorruptBlobError(
                self._digest,
                f"{self._store.conn.where} ended ByteStream.Read {self._remaining} bytes short",
            )
        return False

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._pending and not self._pull():
                break
            n = min(len(self._pending), len(view) - filled)
            view[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return filled

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buffer = bytearray(size)
        n = self.readinto(buffer)
        del buffer[n:]
        return bytes(buffer)

    def readall(self) -> bytes:
        parts = [bytes(self._pending)]
        self._pending = memoryview(b"")
        while self._pull():
            parts.append(bytes(self._pending))
        self._pending = memoryview(b"")
        return b"".join(parts)

    def close(self) -> None:
        if not self._ended:
            self._ended = True
            self._responses.cancel()
        super().close()


class _SpoolingWriter(BlobWriter):
    """Collects an upload whose digest is not known yet until commit: in memory up to
    ``in_memory`` bytes, then in a temporary file.

    ByteStream resource names carry the digest, so nothing can be sent before ``commit``.
    """

    def __init__(self, store: GrpcBlobStore, in_memory: int) -> None:
        self._store = store
        self._spool: tempfile.SpooledTemporaryFile[bytes] | None = tempfile.SpooledTemporaryFile(
            max_size=in_memory
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._spool is not None, "write after commit or abort"
        self._spool.write(data)

    def commit(self, digest: Digest) -> None:
        spool = self._spool
        assert spool is not None, "commit after commit or abort"
        try:
            spool.seek(0)
            self._store.upload(digest, spool)  # type: ignore[arg-type]
        finally:
            self.abort()

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


_STOP = object()  # queued by abort: end the request stream


class _StreamingWriter(BlobWriter):
    """A ByteStream upload of a blob whose digest is known up front, sent while it is written.

    ``write`` cuts the content into 1 MiB messages and queues them for the Write call, whose
    request stream grpcio consumes in a thread of its own, so hashing and reading the source
    go on while earlier chunks travel. The queue holds at most ``_QUEUED_CHUNKS`` messages: a
    slow server slows the writer down instead of filling memory. The last message is held
    back until ``commit`` (which the core calls only once the content matched the digest) and
    then sent with ``finish_write``; ``abort`` cancels the call instead, so a server never
    commits an upload the core refused. A server that answers early (it has the blob) ends
    the call: the rest is then discarded.
    """

    def __init__(self, store: GrpcBlobStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        codec = store.streams
        self._resource = (f"{store.conn.resource_prefix()}uploads/{uuid.uuid4()}"
                          f"/{codec.resource_part}/{digest.hash}/{digest.size}")
        # Compressed, the stream is one zstd stream whose pieces are sent as they come.
        self._compressed = codec.compressed
        self._encoder = codec.stream_encoder(digest.size)
        self._stats = codec.stats
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._buffer = bytearray()  # content not yet a whole chunk
        self._offset = 0  # bytes already put into messages (compressed ones, compressed)
        self._held: bytes | None = None  # the newest message, not sent: it may be the last
        self._held_any = False  # whether a message was made (the first names the resource)
        self._call: grpc.Future | None = None
        self._done = False
        # Asking first costs one round trip and can save sending the whole blob.
        self._present = not store.find_missing_blobs([digest])

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            message, last = cast("tuple[bytes, bool]", item)
            yield message
            if last:
                return

    def _send(self, message: bytes, *, last: bool = False) -> None:
        """Queue a message, waiting for room while the call is still running."""
        if self._call is None:
            self._call = self._store._write.future(
                self._requests(), timeout=self._store._stream_timeout(self._digest.size)
            )
        while not self._call.done():
            try:
                self._queue.put((message, last), timeout=0.05)
                return
            except queue.Full:
                continue

    def _hold(self, chunk: bytes | bytearray | memoryview, *, last: bool = False) -> None:
        if self._held is not None:
            self._send(self._held)
        payload = self._encoder.encode(chunk)
        if last:
            tail = self._encoder.finish()
            if tail:
                payload = b"".join((payload, tail))
        # Uncompressed, the one copy of a chunk: straight into the message that carries it.
        self._held = encode_write_request(
            "" if self._held_any else self._resource, self._offset, payload, finish_write=False
        )
        self._held_any = True
        self._offset += len(payload)
        self._stats.sent(len(chunk), len(payload))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self._done, "write after commit or abort"
        if self._present:
            return  # nothing to send: the core still hashes what arrives
        if self._call is not None and self._call.done():
            self._outcome()  # raises if the call failed; else the server has the blob
            return
        view = memoryview(data).cast("B")
        if not self._buffer and len(view) == _STREAM_CHUNK:
            self._hold(view)  # the usual case: one whole chunk
            return
        self._buffer += view
        while len(self._buffer) >= _STREAM_CHUNK:
            chunk = self._buffer[:_STREAM_CHUNK]
            del self._buffer[:_STREAM_CHUNK]
            self._hold(chunk)

    def commit(self, digest: Digest) -> None:
        assert not self._done, "commit after commit or abort"
        if digest != self._digest:
            self.abort()
            raise CasframeError(f"upload announced as {self._digest} turned out to be {digest}")
        self._done = True
        if self._present:
            return
        if self._buffer or self._held is None or self._compressed:
            self._hold(self._buffer, last=True)  # (compressed: the end of the zstd stream)
            self._buffer = bytearray()
        assert self._held is not None
        self._send(finish_write_request(self._held), last=True)
        self._held = None
        self._outcome()

    def _outcome(self) -> None:
        """Wait for the call's answer; raise unless the server stored the whole blob."""
        assert self._call is not None
        with self._store.conn.calling("ByteStream.Write", digest=self._digest):
            response = self._call.result()
        # -1 is how servers answer a compressed upload of a blob they had already; the whole
        # compressed stream's size, how they answer one they stored.
        expected = self._offset if self._compressed else self._digest.size
        if response.committed_size not in (expected, -1):
            raise RemoteProtocolError(f"{self._store.conn.where} committed "
                                      f"{response.committed_size} bytes of {self._digest}")

    def abort(self) -> None:
        self._done = True
        self._held = None
        self._buffer = bytearray()
        call, self._call = self._call, None
        if call is None:
            return
        call.cancel()
        while True:  # let the request stream end, wherever grpcio's thread is waiting
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass


class GrpcBlobStore(BlobStore):
    """Blobs on a REAPI server: CAS batch calls for small ones, ByteStream for large ones."""

    capabilities = frozenset()  # REAPI offers no listing, deleting or touching of blobs

    def __init__(self, conn: Connection, capabilities: reapi.ServerCapabilities | None) -> None:
        self.conn = conn
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
                        request = reapi.FindMissingBlobsRequest(instance_name=self.conn.instance)
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
        if digest.size <= _STREAM_CHUNK and self.fits_batch(digest.size):
            # One unary call costs less than setting up a stream for a single message.
            data = self._read_batch([digest])[digest]
            stream = io.BytesIO(data)
            stream.seek(offset)
            return stream
        request = bytestream.ReadRequest(
            resource_name=(f"{self.conn.resource_prefix()}{self.streams.resource_part}/"
                           f"{digest.hash}/{digest.size}"),
            read_offset=offset,
        )
        responses = self._read(
            request, timeout=self._stream_timeout(digest.size - offset)
        )
        reader = _ByteStreamReader(self, digest, offset, responses)
        try:
            reader.prefetch()
        except BaseException:
            reader.close()
            raise
        return reader  # type: ignore[return-value]

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        # A blob known to fit a batch call is kept in memory until it is sent in one.
        if size_hint is not None and self.fits_batch(size_hint):
            return _SpoolingWriter(self, max(size_hint, _SPOOL_IN_MEMORY))
        return _SpoolingWriter(self, _SPOOL_IN_MEMORY)

    def begin_write_for(self, digest: Digest) -> BlobWriter:
        """Large blobs stream to the server as they are written (the resource name needs
        only the digest); small ones are collected for one batch call."""
        self._check_size(digest)
        if self.fits_batch(digest.size):
            return self.begin_write(digest.size)
        return _StreamingWriter(self, digest)

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
        request = reapi.BatchReadBlobsRequest(instance_name=self.conn.instance)
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
        for digest, data in blobs:
            if digest.size == 0:
                continue
            self._check_size(digest)
            if self.fits_batch(digest.size):
                small[digest] = data
            else:
                self.upload(digest, io.BytesIO(data))
        for group in self._batches(small):
            self._update_batch([(digest, small[digest]) for digest in group])

    def _update_batch(self, blobs: list[tuple[Digest, bytes]]) -> None:
        request = reapi.BatchUpdateBlobsRequest(instance_name=self.conn.instance)
        add = request.requests.add
        for (hash_, size), data in blobs:
            packed, compressor = self.batch_updates.pack(data)
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
        writer = _StreamingWriter(self, digest)
        try:
            offset = 0
            while offset < digest.size:
                chunk = stream.read(min(_STREAM_CHUNK, digest.size - offset))
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
        self._update_batch([(EMPTY_DIGEST, b"")])

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
                instance_name=self.conn.instance, root_digest=root.to_proto(), page_token=token
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


class GrpcRefStore(RefStore):
    """Refs on a REAPI server, over ReferenceStorage or Remote Asset.

    Neither protocol can list or delete names, nor report when a name was last used: refs
    here can be set and read, and expiring them is the server's business.
    """

    capabilities: frozenset[RefCapability] = frozenset()  # neither list nor delete

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._wanted = conn.options.ref_protocol
        self._protocol: str | None = None if self._wanted == "auto" else self._wanted
        self._lock = threading.Lock()
        self._references = bst_grpc.ReferenceStorageStub(conn.channel)
        self._fetch = asset_grpc.FetchStub(conn.channel)
        self._push = asset_grpc.PushStub(conn.channel)

    def protocol(self) -> str:
        """``reference-storage`` or ``asset``: probed on first use when ``ref_protocol=auto``."""
        with self._lock:
            if self._protocol is None:
                try:
                    self._references.Status(
                        bst.StatusRequest(instance_name=self.conn.instance),
                        timeout=self.conn.options.timeout,
                    )
                    self._protocol = "reference-storage"
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise translate_error(
                            exc, self.conn.where, "ReferenceStorage.Status"
                        ) from None
                    self._protocol = "asset"
            return self._protocol

    def check_writable(self) -> None:
        """With ReferenceStorage, ask its ``Status``: ``allow_updates`` false means read-only.

        The Remote Asset API has no such question; its servers are assumed to accept pushes
        (the blob probe of :class:`GrpcBlobStore` still catches a read-only server).
        """
        if self.protocol() != "reference-storage":
            return
        with self.conn.calling("ReferenceStorage.Status"):
            status = self._references.Status(
                bst.StatusRequest(instance_name=self.conn.instance),
                timeout=self.conn.options.timeout,
            )
        if not status.allow_updates:
            raise PermissionDeniedError(
                f"{self.conn.where} refuses writes: its ReferenceStorage status does not "
                "allow updates"
            )

    def _unsupported(self, what: str, error: UnsupportedOperationError) -> CasframeError:
        if self._wanted == "auto":
            return UnsupportedOperationError(
                f"{self.conn.where} cannot {what}: it offers neither BuildStream's "
                f"ReferenceStorage nor the Remote Asset API ({error})"
            )
        return error

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        # ``touch`` cannot be honoured: neither protocol has a way to look without using.
        timeout = self.conn.options.timeout
        try:
            if self.protocol() == "reference-storage":
                with self.conn.calling("ReferenceStorage.GetReference", ref=name):
                    found = self._references.GetReference(
                        bst.GetReferenceRequest(instance_name=self.conn.instance, key=name),
                        timeout=timeout,
                    )
                return answered_ref_digest(
                    self.conn.where, "ReferenceStorage.GetReference", name, found.digest
                )
            with self.conn.calling("Fetch.FetchDirectory", ref=name):
                fetched = self._fetch.FetchDirectory(
                    asset.FetchDirectoryRequest(
                        instance_name=self.conn.instance, uris=[ref_uri(name)]
                    ),
                    timeout=timeout,
                )
        except UnsupportedOperationError as exc:
            raise self._unsupported("read refs", exc) from None
        if fetched.status.code:
            raise translate_status(fetched.status.code, fetched.status.message,
                                   self.conn.where, "Fetch.FetchDirectory", ref=name)
        return answered_ref_digest(
            self.conn.where, "Fetch.FetchDirectory", name, fetched.root_directory_digest
        )

    def set_ref(self, name: str, digest: Digest) -> None:
        timeout = self.conn.options.timeout
        try:
            if self.protocol() == "reference-storage":
                with self.conn.calling("ReferenceStorage.UpdateReference"):
                    self._references.UpdateReference(
                        bst.UpdateReferenceRequest(
                            instance_name=self.conn.instance, keys=[name],
                            digest=digest.to_proto(),
                        ),
                        timeout=timeout,
                    )
                return
            with self.conn.calling("Push.PushDirectory"):
                self._push.PushDirectory(
                    asset.PushDirectoryRequest(
                        instance_name=self.conn.instance,
                        uris=[ref_uri(name)],
                        root_directory_digest=digest.to_proto(),
                    ),
                    timeout=timeout,
                )
        except UnsupportedOperationError as exc:
            raise self._unsupported("store refs", exc) from None

    def conflicting_ref(self, name: str) -> str | None:
        # The server decides, as it sets the ref: a casframe server refuses a conflict with
        # FAILED_PRECONDITION naming both refs, which comes back as RefConflictError. Asking
        # first would cost a round trip a folder and could not see refs under the name.
        return None

    def delete_ref(self, name: str) -> None:
        raise UnsupportedOperationError(
            f"{self.conn.where} cannot delete refs: REAPI has no such call"
        )

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        raise UnsupportedOperationError(
            f"{self.conn.where} cannot list refs: REAPI has no such call"
        )


def _read_capabilities(conn: Connection) -> reapi.ServerCapabilities | None:
    """The server's capabilities (None when it has no Capabilities service); fail fast."""
    stub = reapi_grpc.CapabilitiesStub(conn.channel)
    try:
        capabilities = stub.GetCapabilities(
            reapi.GetCapabilitiesRequest(instance_name=conn.instance),
            timeout=conn.options.timeout,
        )
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return None  # an old or minimal server: assume REAPI's defaults
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise BackendUnavailableError(
                f"cannot reach {conn.where}: {exc.details() or code.name}"
            ) from None
        raise translate_error(exc, conn.where, "GetCapabilities") from None
    check_capabilities(conn.where, capabilities)
    functions = capabilities.cache_capabilities.digest_functions
    if functions and reapi.DigestFunction.SHA256 not in functions:
        offered = ", ".join(reapi.DigestFunction.Value.Name(f) for f in functions)
        raise UnsupportedOperationError(
            f"{conn.where} does not store SHA256 digests (it offers {offered}); "
            "casframe needs SHA256"
        )
    return capabilities


def open_grpc_store(url: StoreURL) -> Store:
    """Factory for ``grpc://HOST:PORT[/INSTANCE]`` and ``grpcs://...``.

    Connects and reads the server's capabilities at once, so an unreachable server or one
    without SHA256 is reported here rather than at the first transfer.
    """
    conn = Connection(GrpcOptions.from_url(url))
    try:
        capabilities = _read_capabilities(conn)
    except BaseException:
        conn.close()
        raise
    return Store(GrpcBlobStore(conn, capabilities), GrpcRefStore(conn), url=url.url)

