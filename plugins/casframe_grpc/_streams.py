"""ByteStream transfers of the ``grpc://`` blob store: a blob read as it is consumed, and the
two upload writers (spooled until the digest is known, or streamed while written)."""

from __future__ import annotations

import io
import queue
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, cast

import grpc

from casframe import BlobWriter, CasframeError, CorruptBlobError, Digest, RemoteProtocolError
from casframe.digest import CHUNK_SIZE
from casframe.reapi import encode_write_request, finish_write_request

if TYPE_CHECKING:
    from .blobs import GrpcBlobStore

__all__ = ["STREAM_CHUNK", "ByteStreamReader", "SpoolingWriter", "StreamingWriter"]

# ByteStream chunk: the size REAPI clients conventionally use (Bazel, BuildStream); large
# enough that per-message cost vanishes, small enough to stay far below message limits.
STREAM_CHUNK = CHUNK_SIZE
# Chunks a streaming upload queues ahead of its Write call: enough to keep the call busy while
# the writer reads and hashes the next one, few enough that an upload stays near 3 MiB.
_QUEUED_CHUNKS = 2


class ByteStreamReader(io.RawIOBase):
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


class SpoolingWriter(BlobWriter):
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


class _Piece:
    """A piece of a compressed upload: its frame, being compressed, and its content's size."""

    __slots__ = ("content", "frame")

    def __init__(self, frame: Future[bytes], content: int) -> None:
        self.frame = frame
        self.content = content


class StreamingWriter(BlobWriter):
    """A ByteStream upload of a blob whose digest is known up front, sent while it is written.

    ``write`` cuts the content into 1 MiB messages and queues them for the Write call, whose
    request stream grpcio consumes in a thread of its own, so hashing and reading the source
    go on while earlier chunks travel. The queue holds at most ``_QUEUED_CHUNKS`` messages: a
    slow server slows the writer down instead of filling memory. The last message is held
    back until ``commit`` (which the core calls only once the content matched the digest) and
    then sent with ``finish_write``; ``abort`` cancels the call instead, so a server never
    commits an upload the core refused. A server that answers early (it has the blob) ends
    the call: the rest is then discarded.

    Compressed, each message's content is handed to the codec's threads as it is cut
    (:meth:`Codec.compress_later`) and queued as the promise of its frame; the request stream
    takes the frames in order and frames them into messages (a message's ``write_offset``
    counts the compressed bytes before it). Reading, hashing, compressing (on every core:
    several pieces of one upload at once) and sending thus overlap instead of taking turns.
    """

    def __init__(self, store: GrpcBlobStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        codec = store.streams
        self._resource = (f"{store.conn.resource_prefix()}uploads/{uuid.uuid4()}"
                          f"/{codec.resource_part}/{store.conn.function_segment}"
                          f"{digest.hash}/{digest.size}")
        # Compressed, the stream is one zstd stream whose pieces are sent as they come.
        self._codec = codec
        self._compressed = codec.compressed
        self._stats = codec.stats
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._buffer = bytearray()  # content not yet a whole chunk
        self._offset = 0  # bytes already put into messages (compressed ones, compressed)
        # The newest message (compressed: its frame to come), not sent: it may be the last.
        self._held: bytes | _Piece | None = None
        self._framed_any = False  # whether a message was made (the first names the resource)
        self._call: grpc.Future | None = None
        self._done = False
        # Asking first costs one round trip and can save sending the whole blob.
        self._present = not store.find_missing_blobs([digest])

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            message, last = cast("tuple[bytes | _Piece, bool]", item)
            if isinstance(message, _Piece):  # compressed: wait for its frame, in order
                try:
                    payload = message.frame.result()
                except CancelledError:
                    return  # aborted: the call is cancelled already
                self._stats.sent(message.content, len(payload))
                message = self._framed(payload, finish_write=last)
            yield message
            if last:
                return

    def _framed(self, payload: bytes | bytearray | memoryview, *, finish_write: bool) -> bytes:
        """The next message, carrying ``payload`` (the one copy of it: into the message)."""
        message = encode_write_request(
            "" if self._framed_any else self._resource, self._offset, payload,
            finish_write=finish_write
        )
        self._framed_any = True
        self._offset += len(payload)
        return message

    def _send(self, message: bytes | _Piece, *, last: bool = False) -> None:
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

    def _hold(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            self._send(self._held)
        if self._compressed:
            # Compressed later, in another thread: it needs content that stays as it is (a
            # caller may refill its buffer once write returns), copied unless immutable.
            owned = chunk
            if (isinstance(chunk, memoryview) and not isinstance(chunk.obj, bytes)
                    and self._codec.compressing.threads):
                owned = bytes(chunk)
            self._held = _Piece(self._codec.compress_later(owned), len(chunk))
            return
        # Uncompressed, the one copy of a chunk: straight into the message that carries it.
        self._held = self._framed(chunk, finish_write=False)
        self._stats.sent(len(chunk), len(chunk))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self._done, "write after commit or abort"
        if self._present:
            return  # nothing to send: the core still hashes what arrives
        if self._call is not None and self._call.done():
            self._outcome()  # raises if the call failed; else the server has the blob
            return
        view = memoryview(data).cast("B")
        if not self._buffer and len(view) == STREAM_CHUNK:
            self._hold(view)  # the usual case: one whole chunk
            return
        self._buffer += view
        while len(self._buffer) >= STREAM_CHUNK:
            chunk = self._buffer[:STREAM_CHUNK]
            del self._buffer[:STREAM_CHUNK]
            self._hold(chunk)

    def commit(self, digest: Digest) -> None:
        assert not self._done, "commit after commit or abort"
        if digest != self._digest:
            self.abort()
            raise CasframeError(f"upload announced as {self._digest} turned out to be {digest}")
        self._done = True
        if self._present:
            return
        if self._buffer or self._held is None:
            # (An empty piece still makes a frame: a zstd stream holds at least one.)
            self._hold(self._buffer)
            self._buffer = bytearray()
        held, self._held = self._held, None
        assert held is not None
        self._send(held if isinstance(held, _Piece) else finish_write_request(held), last=True)
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
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple) and isinstance(item[0], _Piece):
                item[0].frame.cancel()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
