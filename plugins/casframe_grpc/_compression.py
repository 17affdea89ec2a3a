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
from dataclasses import dataclass, field

from casframe import CompressedDataError, CorruptBlobError, Digest
from casframe.compression import (
    DEFAULT_LEVEL,
    ZSTD,
    ZstdFrames,
    compress,
    compressor_name,
    decode_chunks,
    decompress,
)
from casframe.reapi import remote_execution as reapi

__all__ = ["COMPRESSIONS", "Codec", "WireStats", "negotiate"]

log = logging.getLogger("casframe.grpc")

#: Values of the ``compression`` URL option.
COMPRESSIONS = ("none", ZSTD)
# A batch entry is sent compressed only when that saves at least this many bytes: below it the
# compressor field and the server's decoding cost more than they save.
_LEAST_SAVING = 16


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


class _Identity:
    """An encoder that leaves the content as it is."""

    def encode(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        return data

    def finish(self) -> bytes:
        return b""


class Codec:
    """One encoding (``none`` or ``zstd``) for one kind of call, with the stats it feeds."""

    def __init__(self, compression: str, stats: WireStats, level: int = DEFAULT_LEVEL) -> None:
        self.compression = compression
        self.compressed = compression == ZSTD
        self.stats = stats
        self._level = level
        #: What a ByteStream resource name has between the instance and the digest.
        self.resource_part = f"compressed-blobs/{ZSTD}" if self.compressed else "blobs"

    def stream_encoder(self) -> ZstdFrames | _Identity:
        """An encoder for one upload: each ``encode`` output (a zstd frame of its own, see
        :class:`casframe.compression.ZstdFrames`) can be sent at once, and ``finish`` gives
        what ends the stream."""
        return ZstdFrames(self._level) if self.compressed else _Identity()

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

    def pack(self, data: bytes) -> tuple[bytes, int]:
        """A BatchUpdateBlobs entry's data and compressor."""
        if self.compressed and len(data) > _LEAST_SAVING:
            packed = compress(data, self._level)
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
    return Codec(streams, stats), Codec(batches, stats)
