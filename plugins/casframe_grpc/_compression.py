"""How the ``grpc://`` backend's blobs travel: as they are, or zstd-compressed, and what that saves.

With ``?compression=zstd`` and a server whose capabilities list zstd, ByteStream uploads and
downloads use ``compressed-blobs/zstd/…`` resource names, batch updates send zstd entries and
batch reads accept them; anything the server does not offer travels uncompressed (BuildGrid
offers no compressor, so with it nothing changes). Digests always name the uncompressed content,
and what arrives compressed is decoded within the digest's size before the core verifies it.

:class:`WireStats` counts content and wire bytes each way, so the saving can be seen: the
backend logs it at debug level when it closes, and ``GrpcBlobStore.wire`` holds it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from casframe import CompressedDataError, CorruptBlobError, Digest
from casframe.compression import (
    DEFAULT_LEVEL,
    ZSTD,
    compress,
    compressor_name,
    decode_chunks,
    decompress,
)
from casframe.reapi import remote_execution as reapi

__all__ = ["COMPRESSIONS", "Codec", "Compressing", "WireStats", "negotiate"]

log = logging.getLogger("casframe.grpc")

#: Values of the ``compression`` URL option.
COMPRESSIONS = ("none", ZSTD)
# A batch entry is sent compressed only when that saves at least this many bytes: below it the
# compressor field and the server's decoding cost more than they save.
_LEAST_SAVING = 16
# Threads compressing the messages of ByteStream uploads and large batch entries (zstd releases
# the GIL while it works). 0, the default: each piece is compressed in the thread that cuts it,
# and the max_concurrency calls in flight already compress on every core. Handing every piece
# to threads of its own (one a core, at most 4: what bench/zstd_bench.py's --compare-threads
# sets) took the same user CPU (client 0.60 s against 0.61 s for 96 MiB) but pushed more slowly
# in four of five alternated runs on a loaded machine (0.65x to 0.91x the speed; once 1.20x):
# each hand-over adds a wake-up, a wait for the interpreter's lock and a thread switch, and on
# cores that client and server share, every wake-up can wait its turn.
COMPRESS_THREADS = 0
# Batch entries at least this large are compressed in those threads; smaller ones where they
# are packed: handing one over costs tens of microseconds, about what compressing 10 KiB does.
_COMPRESS_APART = 64 << 10


@dataclass
class WireStats:
    """Bytes of content moved each way, and the bytes they took on the wire."""

    content_sent: int = 0
    wire_sent: int = 0
    content_received: int = 0
    wire_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def sent(self, content: int, wire: int) -> None:
        with self._lock:
            self.content_sent += content
            self.wire_sent += wire

    def received(self, content: int, wire: int) -> None:
        with self._lock:
            self.content_received += content
            self.wire_received += wire

    def describe(self) -> str:
        def one(verb: str, content: int, wire: int) -> str:
            share = f" ({100 * wire / content:.0f}%)" if content else ""
            return f"{verb} {content} bytes of content as {wire} bytes{share}"

        return (f"{one('sent', self.content_sent, self.wire_sent)}; "
                f"{one('received', self.content_received, self.wire_received)}")


class Compressing:
    """Where one store compresses: by default (``COMPRESS_THREADS`` 0) in the thread that
    hands the content over, at once; else in threads of its own, started when first needed
    (zstd releases the interpreter's lock while it works, so content compresses there while the
    thread that handed it over goes on reading and hashing what comes next)."""

    def __init__(self, level: int = DEFAULT_LEVEL, threads: int | None = None) -> None:
        self.level = level
        #: How many threads (0: none, content is compressed when handed over).
        self.threads = COMPRESS_THREADS if threads is None else threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def frame(self, data: bytes | bytearray | memoryview) -> Future[bytes]:
        """``data`` as one zstd frame (recording its size), to come; ``data`` must not change
        until it is there."""
        if not self.threads:
            done: Future[bytes] = Future()
            done.set_result(compress(data, self.level))
            return done
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = ThreadPoolExecutor(
                        max_workers=self.threads, thread_name_prefix="casframe-zstd"
                    )
        return pool.submit(compress, data, self.level)

    def close(self) -> None:
        """Stop the threads (after the work given to them)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


class Codec:
    """One encoding (``none`` or ``zstd``) for one kind of call, with the stats it feeds."""

    def __init__(self, compression: str, stats: WireStats, compressing: Compressing) -> None:
        self.compression = compression
        self.compressed = compression == ZSTD
        self.stats = stats
        self._level = compressing.level
        #: Where content is compressed ahead of being sent (shared by a store's codecs).
        self.compressing = compressing
        #: What a ByteStream resource name has between the instance and the digest.
        self.resource_part = f"compressed-blobs/{ZSTD}" if self.compressed else "blobs"

    def compress_later(self, data: bytes | bytearray | memoryview) -> Future[bytes]:
        """``data`` as a zstd frame of its own, compressed in :attr:`compressing`'s threads.
        The frames of one upload, one a message, sent one after another make one zstd stream
        (RFC 8878, section 3; :class:`casframe.compression.ZstdFrames` says why a frame per
        message); a batch entry is one frame."""
        return self.compressing.frame(data)

    def pack_later(self, data: bytes) -> Future[bytes] | None:
        """The start of :meth:`pack` for a batch entry of 64 KiB or more: its frame, compressed
        meanwhile; None for any other entry."""
        if self.compressed and self.compressing.threads and len(data) >= _COMPRESS_APART:
            return self.compress_later(data)
        return None

    def read_chunks(
        self, responses: Iterable[memoryview], digest: Digest, limit: int, where: str
    ) -> Iterator[bytes | memoryview]:
        """The content of a ByteStream Read's ``responses`` (their data), counted; decoded
        content past ``limit`` bytes is :class:`CorruptBlobError`."""
        if not self.compressed:
            for data in responses:
                self.stats.received(len(data), len(data))
                yield data
            return

        def counted() -> Iterator[memoryview]:
            for data in responses:
                self.stats.received(0, len(data))
                yield data

        try:
            for piece in decode_chunks(counted(), limit=limit,
                                       what=f"the zstd stream {where} sent for {digest}"):
                self.stats.received(len(piece), 0)
                yield piece
        except CompressedDataError as exc:
            raise CorruptBlobError(digest, str(exc)) from None

    def pack(self, data: bytes, frame: Future[bytes] | None = None) -> tuple[bytes, int]:
        """A BatchUpdateBlobs entry's data and compressor (``frame``: what :meth:`pack_later`
        gave for it)."""
        if frame is not None or (self.compressed and len(data) > _LEAST_SAVING):
            packed = frame.result() if frame is not None else compress(data, self._level)
            if len(packed) + _LEAST_SAVING <= len(data):
                self.stats.sent(len(data), len(packed))
                return packed, reapi.Compressor.ZSTD
        self.stats.sent(len(data), len(data))
        return data, reapi.Compressor.IDENTITY

    def unpack(self, digest: Digest, data: bytes, compressor: int, where: str) -> bytes:
        """The content of a BatchReadBlobs entry, decoded within the digest's size."""
        if compressor == reapi.Compressor.IDENTITY:
            self.stats.received(len(data), len(data))
            return data
        if compressor != reapi.Compressor.ZSTD or not self.compressed:
            raise CorruptBlobError(
                digest, f"{where} sent it encoded as {compressor_name(compressor)}, "
                "which this client did not ask for"
            )
        try:
            content = decompress(data, digest.size,
                                 what=f"the zstd data {where} sent for {digest}")
        except CompressedDataError as exc:
            raise CorruptBlobError(digest, str(exc)) from None
        self.stats.received(len(content), len(data))
        return content


def negotiate(
    compression: str, capabilities: reapi.ServerCapabilities | None, where: str, stats: WireStats
) -> tuple[Codec, Codec]:
    """The codecs for ByteStream (and batch reads) and for batch updates: ``compression`` where
    the server offers it, none elsewhere."""
    cache = capabilities.cache_capabilities if capabilities is not None else None
    streams = batches = "none"
    if compression == ZSTD and cache is not None:
        if reapi.Compressor.ZSTD in cache.supported_compressors:
            streams = ZSTD
        if reapi.Compressor.ZSTD in cache.supported_batch_update_compressors:
            batches = ZSTD
    plain = [what for what, chosen in (("ByteStream and batch reads", streams),
                                       ("batch updates", batches)) if chosen == "none"]
    if compression != "none" and plain:
        log.debug("%s does not offer %s for %s: those go uncompressed", where, compression,
                  " or ".join(plain))
    compressing = Compressing()
    return Codec(streams, stats, compressing), Codec(batches, stats, compressing)
