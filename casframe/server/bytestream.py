"""The ByteStream service: streaming reads and resumable, verified uploads of large blobs.

An upload goes straight into the backend's own writer (``BlobStore.begin_write``) while being
hashed; it becomes visible only when the client finishes it and the content matches the digest
in the resource name. An upload whose stream ends early (the client half-closes without
``finish_write``, or the connection drops) stays open in the :class:`UploadSpool`, keyed by its
resource name, so the client can ask ``QueryWriteStatus`` and continue at ``committed_size``.
Idle uploads are aborted after ``upload_expiry`` seconds, and at most ``max_partial_uploads`` are
kept. Nothing is written twice and no partial content is ever visible under a digest.

Resumption works against the server that holds the partial upload: behind a load balancer
without session affinity a client that reconnects elsewhere is told ``NOT_FOUND`` and starts
again from zero, which every REAPI client handles.

Resource names may name their digest function (``blobs/blake3/{hash}/{size}``,
``uploads/{uuid}/compressed-blobs/zstd/sha512/{hash}/{size}``); without one it is inferred from
the hash's length (:mod:`casframe.server.functions`). Each function's blobs are those of its own
store, and an upload is kept in the spool by its resource name, function included.

``compressed-blobs/zstd/…`` resources travel zstd-compressed (:mod:`casframe.compression`) and
are stored uncompressed. As the REAPI says, a compressed Read's ``read_offset`` counts
uncompressed bytes, and a compressed Write's first ``write_offset`` is where in the uncompressed
content its zstd stream starts (0, or where ``QueryWriteStatus`` says the kept part ends), each
later one that plus the compressed bytes sent before it. The decoded content is hashed and
written as it is decoded, so a stream that decodes past the digest's size is refused at once.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, BinaryIO, TypeVar

import grpc

from casframe._protos.google.bytestream import bytestream_pb2
from casframe._wire import WriteChunk, decode_write_request, encode_read_response
from casframe.compression import ZstdDecoder, ZstdEncoder, decompress
from casframe.digest import Digest
from casframe.errors import CompressedDataError
from casframe.server.counts import NO_COUNTS, ContentCounts
from casframe.server.errors import StatusError, async_rpc_method, rpc_method
from casframe.server.functions import DigestFunctions
from casframe.server.names import (
    Instances,
    ResourceName,
    parse_read_resource,
    parse_write_resource,
)
from casframe.server.pool import in_pool
from casframe.server.settings import ServerSettings
from casframe.store import Store

__all__ = ["ByteStreamService", "UploadSpool", "add_bytestream_to_server"]

log = logging.getLogger("casframe.server")

_T = TypeVar("_T")

# First chunk of a ByteStream Read: what one HTTP/2 stream window holds when a client opens it.
_FIRST_READ_CHUNK = 64 << 10


class _Upload:
    """One upload in progress, kept between Write calls so an interrupted one can resume.

    The hashing and verification are :meth:`casframe.store.Store.open_upload`'s; this adds
    what the spool needs. Only the Write call holding ``busy`` (or the spool, holding it)
    touches an upload.
    """

    def __init__(self, store: Store, resource: str, digest: Digest) -> None:
        self.resource = resource
        self.digest = digest
        self.busy = threading.Lock()
        self.touched = time.monotonic()
        self._upload = store.open_upload(digest)

    @property
    def committed(self) -> int:
        """Bytes received so far: where the next chunk must start."""
        return self._upload.size

    def write(self, data: bytes | memoryview) -> None:
        self._upload.write(data)

    def commit(self) -> None:
        self._upload.commit()

    def abort(self) -> None:
        try:
            self._upload.abort()
        except Exception:  # noqa: BLE001 - an abort failing must not hide the original error
            log.warning("aborting upload %s failed", self.resource, exc_info=True)


class _BlobReader:
    """One Read call's view of a stored blob: verified, through a small buffer, closed after
    its last chunk (or on failure) within the same step that read it; with an ``encoder``,
    each chunk is compressed in the same step."""

    def __init__(self, opened: BinaryIO, encoder: ZstdEncoder | None = None) -> None:
        self._opened = opened
        self._encoder = encoder
        #: Bytes of the blob the last read took (before compression).
        self.last_read = 0
        # The store's reader buffers a whole chunk ahead, which a thousand stalled downloads
        # would each keep resident: read through a small buffer instead.
        raw = getattr(opened, "raw", None)
        self._stream = opened if raw is None else io.BufferedReader(raw, _FIRST_READ_CHUNK)
        self.closed = False

    @classmethod
    def open(
        cls,
        store: Store,
        digest: Digest,
        offset: int,
        size: int,
        last: bool,
        encoder: ZstdEncoder | None = None,
    ) -> tuple[_BlobReader, bytes]:
        """Open ``digest`` at ``offset`` and read its first ``size`` bytes."""
        # Verified: a full read raises CorruptBlobError (DATA_LOSS) instead of returning the
        # last chunk of a corrupt blob; a read from an offset checks the stored size.
        reader = cls(store.open_read(digest, offset, verify=True), encoder)
        return reader, reader.read(size, last)

    def read(self, size: int, last: bool) -> bytes:
        """The next ``size`` bytes (compressed, with an encoder); with ``last``, close the
        blob after them."""
        try:
            data = self._stream.read(size)
        except BaseException:
            self.close()
            raise
        if last:
            self.close()
        self.last_read = len(data)
        if self._encoder is not None:
            data = self._encoder.encode(data)
            if last:
                data += self._encoder.finish()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream.close()
            self._opened.close()


class UploadSpool:
    """Uploads in progress or interrupted, by resource name; bounded and expiring."""

    def __init__(self, *, max_uploads: int, expiry: float) -> None:
        self._max = max_uploads
        self._expiry = expiry
        self._lock = threading.Lock()
        self._uploads: OrderedDict[str, _Upload] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        with self._lock:
            return len(self._uploads)

    def committed(self, resource: str) -> int | None:
        """Bytes received so far for ``resource``, or None when no upload is kept."""
        self.expire()
        with self._lock:
            upload = self._uploads.get(resource)
            return None if upload is None else upload.committed

    def attach(self, resource: str, digest: Digest, store: Store) -> _Upload:
        """The upload for ``resource`` (created if new, into ``store``, the store of its
        digest function), reserved for the calling Write."""
        self.expire()
        while True:
            with self._lock:
                upload = self._uploads.get(resource)
                if upload is not None:
                    self._uploads.move_to_end(resource)
                    if not upload.busy.acquire(blocking=False):
                        raise StatusError(
                            grpc.StatusCode.ABORTED,
                            f"another Write to {resource!r} is in progress; "
                            "retry once it has ended",
                        )
                    return upload
                self._make_room()
            # Outside the lock: a backend may take a round trip to start an upload.
            fresh = _Upload(store, resource, digest)
            fresh.busy.acquire()
            with self._lock:
                if resource not in self._uploads:
                    self._uploads[resource] = fresh
                    return fresh
            fresh.abort()  # another Write started the same upload meanwhile: join that one

    def detach(self, upload: _Upload) -> None:
        """End the calling Write's hold; the upload stays for a later Write to continue."""
        upload.touched = time.monotonic()
        upload.busy.release()

    def remove(self, upload: _Upload, *, abort: bool) -> None:
        with self._lock:
            if self._uploads.get(upload.resource) is upload:
                del self._uploads[upload.resource]
        if abort:
            upload.abort()

    def discard(self, resource: str) -> None:
        """Abort the kept upload for ``resource``, if there is one and no Write holds it."""
        with self._lock:
            upload = self._uploads.get(resource)
            if upload is None or not upload.busy.acquire(blocking=False):
                return
            del self._uploads[resource]
        upload.abort()
        upload.busy.release()

    def expire(self) -> None:
        """Abort uploads idle for longer than the expiry."""
        deadline = time.monotonic() - self._expiry
        expired = []
        with self._lock:
            for resource, upload in list(self._uploads.items()):
                if upload.touched >= deadline:
                    break  # ordered by use: the rest are younger
                if upload.busy.acquire(blocking=False):
                    del self._uploads[resource]
                    expired.append(upload)
        for upload in expired:
            log.info("expiring interrupted upload %s at %d bytes", upload.resource,
                     upload.committed)
            upload.abort()
            upload.busy.release()

    def _make_room(self) -> None:
        # Called with the lock held. Uploads a Write is feeding are bounded by the server's
        # stream limit; of the interrupted ones, keep fewer than the maximum, so that the new
        # upload fits: evict the least recently used.
        idle = [(resource, upload) for resource, upload in self._uploads.items()
                if not upload.busy.locked()]
        for resource, upload in idle[: max(0, len(idle) - self._max + 1)]:
            if upload.busy.acquire(blocking=False):
                del self._uploads[resource]
                log.info("evicting interrupted upload %s at %d bytes (spool full)",
                         resource, upload.committed)
                upload.abort()
                upload.busy.release()

    def close(self) -> None:
        """Abort every kept upload (server shutdown)."""
        with self._lock:
            uploads = list(self._uploads.values())
            self._uploads.clear()
        for upload in uploads:
            upload.abort()


class ByteStreamService:
    """Read, Write and QueryWriteStatus. Read sends the content of each ``ReadResponse`` and
    Write receives :class:`casframe._wire.WriteChunk` objects: :func:`add_bytestream_to_server`
    registers them with the hand-written codecs of :mod:`casframe._wire`.

    Read and Write are coroutines on the server's event loop: a stream waiting on its client
    holds no thread. Their store work (opening, reading, writing, committing) runs in
    ``pool``, one step at a time. A stream that makes no progress for
    ``settings.stream_idle_timeout`` seconds ends with ``UNAVAILABLE``.
    """

    def __init__(
        self, store: Store, settings: ServerSettings, instances: Instances, pool: Executor, *,
        counts: ContentCounts = NO_COUNTS,
    ) -> None:
        self.store = store
        self.counts = counts  # Writes completed (Reads are counted by the metrics' sink)
        self.functions = DigestFunctions(store)
        self.settings = settings
        self.instances = instances
        self.pool = pool
        self.spool = UploadSpool(
            max_uploads=settings.max_partial_uploads, expiry=settings.upload_expiry
        )

    async def _in_pool(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking store work in the pool (:func:`casframe.server.pool.in_pool`)."""
        return await in_pool(self.pool, function, *args)

    async def _store_of(self, name: ResourceName) -> Store:
        """The store of the resource's digest function (named in it, or inferred); opened
        in the pool the first time."""
        function = self.functions.from_resource(name.digest_function, name.digest.hash)
        store = self.functions.opened(function)
        if store is None:
            store = await self._in_pool(self.functions.store_for, function)
        return store

    def _idle_error(self, what: str) -> StatusError:
        return StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"{what} for {self.settings.stream_idle_timeout:g} s "
            "(the server's stream idle timeout); retry the call",
        )

    @async_rpc_method
    async def Read(  # noqa: N802 - gRPC method name
        self, request: bytestream_pb2.ReadRequest, context: grpc.aio.ServicerContext
    ) -> None:
        name = parse_read_resource(request.resource_name)
        self.instances.check(name.instance)
        store = await self._store_of(name)
        digest = name.digest
        if name.compressed and request.read_limit:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"read_limit must be 0 when reading compressed-blobs, got {request.read_limit}",
            )
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"read_offset {request.read_offset} is outside blob {digest} "
                f"(0 to {digest.size})",
            )
        if request.read_limit < 0:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"read_limit must not be negative, got {request.read_limit}",
            )
        remaining = digest.size - request.read_offset
        if request.read_limit:
            remaining = min(remaining, request.read_limit)
        if digest.size and not remaining:
            if not await self._in_pool(store.contains, digest):
                raise StatusError(grpc.StatusCode.NOT_FOUND, f"blob not found: {digest}")
        encoder = ZstdEncoder(self.settings.zstd_level, remaining) if name.compressed else None
        if not remaining:
            if encoder is not None:  # nothing, as a zstd stream
                await self._send(context, encoder.finish())
            return
        chunk = self.settings.read_chunk_bytes
        # Chunks start small and double up to the full size: a client that stops reading at
        # once leaves the server holding a small chunk, not a full one.
        size = min(_FIRST_READ_CHUNK, chunk, remaining)
        # Opening and the first read are one step in the pool: a blob of one chunk (every
        # Directory a client walks) costs one thread hop, not four.
        reader, data = await self._in_pool(
            _BlobReader.open, store, digest, request.read_offset, size, size == remaining,
            encoder,
        )
        try:
            while True:
                remaining -= reader.last_read
                await self._send(context, data)  # encoded as a ReadResponse by the codec
                if remaining <= 0:
                    return
                size = min(size * 2, chunk, remaining)
                data = await self._in_pool(reader.read, size, size == remaining)
        finally:
            if not reader.closed:
                await self._in_pool(reader.close)

    async def _send(self, context: grpc.aio.ServicerContext, data: bytes) -> None:
        """Send one chunk; a client that takes none for the idle time is told UNAVAILABLE.

        gRPC cannot end a call while a message of it waits for the client's flow-control
        window, so the call (its slot and the chunk) is held until the client reads on or goes
        away; the status then follows the chunk.
        """
        write = asyncio.ensure_future(context.write(data))
        done, _ = await asyncio.wait({write}, timeout=self.settings.stream_idle_timeout)
        if not done:
            log.info("Read stream from %s stalled: the client took no message for %g s",
                     context.peer(), self.settings.stream_idle_timeout)
            await write
            raise self._idle_error("the client took no message")
        write.result()

    async def _next_chunk(self, messages: AsyncIterator[WriteChunk]) -> WriteChunk | None:
        try:
            return await asyncio.wait_for(
                anext(messages), timeout=self.settings.stream_idle_timeout
            )
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise self._idle_error("no message on this Write") from None

    @async_rpc_method
    async def Write(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[WriteChunk], context: grpc.aio.ServicerContext
    ) -> bytestream_pb2.WriteResponse:
        messages = aiter(request_iterator)
        first = await self._next_chunk(messages)
        if first is None:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "Write stream had no request")
        resource = first.resource_name
        name = parse_write_resource(resource)
        self.instances.check(name.instance)
        store = await self._store_of(name)
        if self.settings.read_only:
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED, "this server is read-only")
        digest = name.digest

        if await self._in_pool(store.contains, digest):
            # Already stored: tell the client at once, per the REAPI (-1 for a compressed
            # upload, whose compressed size the server cannot know), and drop any partial copy.
            await self._in_pool(self.spool.discard, resource)
            self.counts.blobs_stored(1, digest.size)
            return bytestream_pb2.WriteResponse(
                committed_size=-1 if name.compressed else digest.size
            )
        single = first.finish_write and first.write_offset == 0
        # A compressed blob is decoded in memory only when it is small: a message of a few
        # MiB may claim gigabytes, which the streaming path writes out as they are decoded.
        small = not name.compressed or digest.size <= self.settings.max_message_bytes
        if single and small and await self._in_pool(self.spool.committed, resource) is None:
            # The whole blob in one message: no need to keep anything for resumption.
            await self._in_pool(self._put_single, store, name, first.data)
            self.counts.blobs_stored(1, digest.size)
            return bytestream_pb2.WriteResponse(committed_size=len(first.data)
                                                if name.compressed else digest.size)

        upload = await self._in_pool(self.spool.attach, resource, digest, store)
        try:
            return await self._receive(name, resource, upload, first, messages)
        except asyncio.CancelledError:
            raise  # the client went away mid-stream: keep the upload for resumption
        except StatusError:
            # A protocol error or a stalled client keeps what was received for a correct
            # retry; an empty upload is not worth a place in the spool.
            if not upload.committed:
                await self._in_pool(functools.partial(self.spool.remove, upload, abort=True))
            raise
        except BaseException:
            # Wrong content, or the backend failed: nothing of this upload can be trusted.
            await self._in_pool(functools.partial(self.spool.remove, upload, abort=True))
            raise
        finally:
            self.spool.detach(upload)

    def _put_single(self, store: Store, name: ResourceName, data: memoryview) -> None:
        if name.compressed:
            # Decoded straight from the message: only the decoded content is a new copy.
            content = decompress(data, name.digest.size, what=self._stream_what(name),
                                 max_window=self.settings.zstd_max_window_bytes)
        else:
            content = bytes(data)
        store.put_bytes(content, name.digest)

    @staticmethod
    def _stream_what(name: ResourceName) -> str:
        return f"the {name.compressor} upload of {name.digest}"

    async def _receive(
        self,
        name: ResourceName,
        resource: str,
        upload: _Upload,
        first: WriteChunk,
        messages: AsyncIterator[WriteChunk],
    ) -> bytestream_pb2.WriteResponse:
        """Feed one Write call's messages into ``upload``; commit on ``finish_write``.

        A compressed call is one zstd stream whose output continues the upload where it
        stands: its first ``write_offset`` must be the upload's (uncompressed) committed
        size, and each later one that plus the compressed bytes received since, which is also
        the ``committed_size`` it answers.
        """
        feed: Callable[[memoryview], None] = upload.write
        if name.compressed:
            feed = ZstdDecoder(upload.write, limit=name.digest.size - upload.committed,
                               what=self._stream_what(name),
                               max_window=self.settings.zstd_max_window_bytes).write
        offset = upload.committed  # where the next message must start
        request: WriteChunk | None = first
        while request is not None:
            if request.resource_name and request.resource_name != resource:
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"resource name changed within one Write: {request.resource_name!r} "
                    f"after {resource!r}",
                )
            if request.write_offset != offset:
                raise self._offset_error(request.write_offset, offset, resource,
                                         first=request is first)
            if request.data:
                await self._in_pool(feed, request.data)  # a view into the message
                offset += len(request.data)
            if request.finish_write:
                if upload.committed < name.digest.size and name.compressed:
                    raise CompressedDataError(
                        f"{self._stream_what(name)} ended after decoding {upload.committed} "
                        f"of its {name.digest.size} bytes (the zstd stream is cut short)"
                    )
                await self._in_pool(upload.commit)
                self.spool.remove(upload, abort=False)
                self.counts.blobs_stored(1, name.digest.size)
                return bytestream_pb2.WriteResponse(committed_size=offset)
            request = await self._next_chunk(messages)
        # The client closed its side without finish_write: keep what arrived.
        return bytestream_pb2.WriteResponse(committed_size=offset)

    @staticmethod
    def _offset_error(given: int, expected: int, resource: str, *, first: bool) -> StatusError:
        if first:
            return StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"write_offset {given} does not match the {expected} bytes committed for "
                f"{resource!r} (ask QueryWriteStatus where to continue)",
            )
        return StatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"write_offset {given} of {resource!r} is not where the stream stands: expected "
            f"{expected} (the first write_offset plus the bytes sent after it)",
        )

    @rpc_method
    def QueryWriteStatus(  # noqa: N802 - gRPC method name
        self, request: bytestream_pb2.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> bytestream_pb2.QueryWriteStatusResponse:
        name = parse_write_resource(request.resource_name)
        self.instances.check(name.instance)
        function = self.functions.from_resource(name.digest_function, name.digest.hash)
        if self.functions.store_for(function).contains(name.digest):
            return bytestream_pb2.QueryWriteStatusResponse(
                committed_size=name.digest.size, complete=True
            )
        committed = self.spool.committed(request.resource_name)
        if committed is None:
            raise StatusError(
                grpc.StatusCode.NOT_FOUND,
                f"no upload in progress for {request.resource_name!r}: start at offset 0",
            )
        return bytestream_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)

    def close(self) -> None:
        self.spool.close()


def add_bytestream_to_server(service: ByteStreamService, server: grpc.aio.Server) -> None:
    """Register the ByteStream service, its bulk messages going through :mod:`casframe._wire`."""
    handlers = {
        "Read": grpc.unary_stream_rpc_method_handler(
            service.Read,
            request_deserializer=bytestream_pb2.ReadRequest.FromString,
            response_serializer=encode_read_response,
        ),
        "Write": grpc.stream_unary_rpc_method_handler(
            service.Write,
            request_deserializer=decode_write_request,
            response_serializer=bytestream_pb2.WriteResponse.SerializeToString,
        ),
        "QueryWriteStatus": grpc.unary_unary_rpc_method_handler(
            service.QueryWriteStatus,
            request_deserializer=bytestream_pb2.QueryWriteStatusRequest.FromString,
            response_serializer=bytestream_pb2.QueryWriteStatusResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("google.bytestream.ByteStream", handlers),)
    )
