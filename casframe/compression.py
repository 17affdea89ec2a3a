"""Blob content compressed for the wire: REAPI's ``compressed-blobs`` encodings (zstd).

Stores keep blobs uncompressed, and digests always name the uncompressed content: compression
lives only between a client and a server (the server's ByteStream and batch calls, the
``grpc://`` backend). This module encodes and decodes; it never touches a store or the network.

Decoding never trusts the sender. Output is counted as it appears and refused as soon as it
passes the size the digest announces (a few kilobytes of zstd can claim gigabytes), and it is
handed on in pieces of at most 256 KiB, so a small, highly compressed message never has to be
held whole. A frame that asks for a decoding window larger than ``max_window`` bytes is refused
before that memory is taken. Every refusal is a :class:`casframe.errors.CompressedDataError`
naming what was decoded and why it failed.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

import zstandard

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.errors import CompressedDataError

__all__ = [
    "COMPRESSOR_VALUES",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_WINDOW",
    "IDENTITY",
    "KNOWN_COMPRESSORS",
    "ZSTD",
    "ZstdDecoder",
    "ZstdEncoder",
    "ZstdFrames",
    "compress",
    "compressor_name",
    "decode_chunks",
    "decompress",
]

IDENTITY = "identity"
ZSTD = "zstd"
#: The encodings casframe speaks, by the lowercase names of REAPI's resource names, with their
#: ``Compressor`` enum values.
COMPRESSOR_VALUES: Mapping[str, int] = {
    IDENTITY: re_pb2.Compressor.IDENTITY,
    ZSTD: re_pb2.Compressor.ZSTD,
}
#: Every name REAPI defines; any other in a resource name is malformed, not merely unsupported.
KNOWN_COMPRESSORS = frozenset({IDENTITY, ZSTD, "deflate", "brotli"})

#: zstd level for content casframe compresses. Level 1 is zstd's fastest standard level: on
#: build outputs (object files, text) it keeps well under half the bytes while compressing at
#: several hundred MB/s a core, so that a transfer over a fast link is not slowed by it.
DEFAULT_LEVEL = 1
#: Largest decoding window accepted, in bytes: the memory one zstd stream may make its decoder
#: hold. 8 MiB is what zstd's own levels up to 19 and Go's klauspost encoder (bazel-remote) use
#: by default; a frame asking for more is refused.
DEFAULT_MAX_WINDOW = 8 << 20
# Decoded output is handed on in pieces of at most this size.
_DECODE_PIECE = 256 << 10
# A piece of a stream that is one whole frame declaring at most this much content is decoded
# in one call, straight into a buffer of its size (what casframe's uploads send: a frame per
# 1 MiB message).
_WHOLE_FRAME = 1 << 20
_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"


def compressor_name(value: int) -> str:
    """The resource-name form of a ``Compressor`` enum value (``"zstd"``), or its number."""
    try:
        return re_pb2.Compressor.Value.Name(value).lower()
    except ValueError:
        return str(value)


def _invalid(what: str, exc: zstandard.ZstdError, max_window: int) -> CompressedDataError:
    text = str(exc)
    if "too much memory" in text:
        return CompressedDataError(
            f"{what}: its zstd frame needs a decoding window larger than the "
            f"{max_window} bytes allowed; compress with a smaller window (a lower level)"
        )
    if "did not decompress full frame" in text:
        return CompressedDataError(f"{what} is cut short: its zstd frame ends early")
    return CompressedDataError(f"{what} is not a valid zstd stream ({text})")


def _too_long(what: str, limit: int) -> CompressedDataError:
    return CompressedDataError(f"{what} decodes to more than the {limit} bytes its digest gives")


class _CountingSink:
    """What the zstd stream writer writes its output to: counted, bounded, passed on."""

    def __init__(self, decoder: ZstdDecoder) -> None:
        self._decoder = decoder

    def write(self, data: bytes) -> int:
        decoder = self._decoder
        decoder.decoded += len(data)
        if decoder.decoded > decoder.limit:
            raise _too_long(decoder.what, decoder.limit)
        decoder.sink(data)
        return len(data)


def _whole_frame(data: bytes | memoryview) -> int:
    """The content size ``data``'s frame header declares if it starts a zstd frame that
    declares one, else -1 (whether it is that one frame and nothing more, the decoding says:
    ``allow_extra_data=False``)."""
    view = memoryview(data).cast("B")
    if bytes(view[:4]) != _FRAME_MAGIC:
        return -1
    try:
        size = zstandard.frame_content_size(view)
    except zstandard.ZstdError:
        return -1
    return size if size >= 0 else -1


class ZstdDecoder:
    """One zstd stream, pushed in pieces with :meth:`write`, its output passed to ``sink`` in
    pieces of at most 256 KiB as soon as it is decoded; a piece that is one whole frame
    declaring at most 1 MiB (and no more than may still come) is decoded in one call and
    passed on whole, as long as every piece before it was such a frame too.

    More than ``limit`` bytes of output raise :class:`CompressedDataError` at once, as does a
    stream that is not zstd or needs a window over ``max_window`` bytes. An error ``sink``
    raises comes out of :meth:`write` as it was. A stream may hold several frames one after
    another. Whether it ended where it should is for the caller to see in :attr:`decoded`.
    """

    def __init__(
        self,
        sink: Callable[[bytes], object],
        *,
        limit: int,
        what: str,
        max_window: int = DEFAULT_MAX_WINDOW,
    ) -> None:
        self.sink = sink
        self.limit = limit
        self.what = what
        self.max_window = max_window
        #: Bytes of output so far.
        self.decoded = 0
        self._frames = True  # whether every piece so far was a whole frame
        self._writer = zstandard.ZstdDecompressor(max_window_size=max_window).stream_writer(
            _CountingSink(self),  # type: ignore[arg-type]  # any object with write() will do
            write_size=_DECODE_PIECE, closefd=False
        )

    def write(self, data: bytes | memoryview) -> None:
        if self._frames and self._whole(data):
            return
        self._frames = False
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise _invalid(self.what, exc, self.max_window) from None

    def _whole(self, data: bytes | memoryview) -> bool:
        """Decode ``data`` in one call if it is one whole frame within the bounds; False (and
        nothing decoded) if not, for the streaming decoder to take, or refuse, it."""
        size = _whole_frame(data)
        if size < 0 or size > min(_WHOLE_FRAME, self.limit - self.decoded):
            return False
        try:
            content = _decompressor(self.max_window).decompress(data, allow_extra_data=False)
        except zstandard.ZstdError:  # not one whole frame (or not valid): streamed instead
            return False
        if len(content) != size:
            return False
        self.decoded += size
        if content:
            self.sink(content)
        return True


_local = threading.local()


def _decompressor(max_window: int) -> zstandard.ZstdDecompressor:
    """This thread's decompressor for ``max_window`` (decompressor objects must not be
    shared between threads, and each holds a context worth reusing)."""
    decompressors: dict[int, zstandard.ZstdDecompressor] | None = getattr(
        _local, "decompressors", None
    )
    if decompressors is None:
        decompressors = _local.decompressors = {}
    found = decompressors.get(max_window)
    if found is None:
        found = decompressors[max_window] = zstandard.ZstdDecompressor(
            max_window_size=max_window
        )
    return found


def decompress(
    data: bytes | memoryview, size: int, *, what: str, max_window: int = DEFAULT_MAX_WINDOW
) -> bytes:
    """The ``size`` bytes a whole zstd stream holds; :class:`CompressedDataError` if it holds
    anything else or is not valid zstd. Takes memory for ``size`` bytes: for content a caller
    has bounded already (a batch entry, one message)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise _invalid(what, exc, max_window) from None
    if declared == size:
        # The frame says how large it is: decoded in one call, straight into a buffer of
        # that size (several times faster than streaming). What follows the frame, if
        # anything, is ignored; the caller verifies the content against its digest.
        try:
            content = _decompressor(max_window).decompress(data)
        except zstandard.ZstdError as exc:
            raise _invalid(what, exc, max_window) from None
        if len(content) == size:
            return content
        declared = len(content)
    if declared >= 0:
        raise CompressedDataError(
            f"{what} decodes to {declared} bytes, not the {size} its digest gives"
        )
    out = bytearray()
    decoder = ZstdDecoder(out.extend, limit=size, what=what, max_window=max_window)
    decoder.write(data)
    if decoder.decoded != size:
        raise CompressedDataError(
            f"{what} decodes to {decoder.decoded} bytes, not the {size} its digest gives "
            "(cut short?)"
        )
    return bytes(out)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``: a compressor context costs an allocation of
    several hundred KiB, so one per thread and level serves every blob (compressor objects
    must not be shared between threads)."""
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if compressors is None:
        compressors = _local.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor


def compress(data: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """``data`` as one zstd frame (recording its size) at ``level``."""
    return _compressor(level).compress(data)


class ZstdEncoder:
    """One zstd stream of one frame, built piece by piece. The output of each :meth:`encode`
    is complete up to that piece (flushed to a block boundary), so it can be sent at once and
    a piece of at most ``n`` bytes never yields much more than ``n`` bytes; :meth:`finish` ends
    the frame.

    ``size``, when known, is recorded in the frame header so a decoder knows what to expect.
    What the server sends: any client's decoder reads one frame.
    """

    def __init__(self, level: int = DEFAULT_LEVEL, size: int = -1) -> None:
        self._compressing = zstandard.ZstdCompressor(level=level).compressobj(size=size)

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        out = self._compressing.compress(data)
        return out + self._compressing.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._compressing.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


class ZstdFrames:
    """One zstd stream built piece by piece, each :meth:`encode` giving a whole frame of its
    own (recording its size) that can be sent at once; :meth:`finish` gives what ends the
    stream. Same interface as :class:`ZstdEncoder`.

    A zstd stream may hold several frames one after another (RFC 8878, section 3), which
    zstd's streaming decoder (:class:`ZstdDecoder`), like any that follows the RFC, reads as
    one content. A piece compressed in one call costs about a fifth less
    CPU than the same piece fed through zstd's streaming interface, which copies its input
    into a window of its own and, once that window wraps around, matches in a slower mode.
    The price, matches across pieces, is a few tenths of a percent of the output on build
    outputs cut into 1 MiB pieces. The stream uploads send (the ``grpc://`` backend makes the
    same frames, each with :func:`compress`, in threads of its own): a server that decodes only
    the first frame finds the content short of its digest and refuses it, so nothing wrong is
    stored.
    """

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self._level = level
        self._framed = False  # whether a frame was given out

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        if not data:
            return b""
        self._framed = True
        return compress(data, self._level)

    def finish(self) -> bytes:
        """Nothing, or an empty frame for a stream that had no content: a zstd stream holds
        at least one frame."""
        return b"" if self._framed else compress(b"", self._level)


class _ChunkSource(io.RawIOBase):
    """A file over an iterator of byte strings: what zstd's stream reader pulls from."""

    def __init__(self, chunks: Iterator[bytes | memoryview]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks)).cast("B")
            except StopIteration:
                return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def decode_chunks(
    chunks: Iterable[bytes | memoryview],
    *,
    limit: int,
    what: str,
    max_window: int = DEFAULT_MAX_WINDOW,
) -> Iterator[bytes]:
    """The output of a zstd stream arriving in ``chunks``, in pieces of at most 256 KiB, pulled
    as the caller consumes them (a reader's memory stays bounded however well the stream
    compresses). More than ``limit`` bytes of output raise :class:`CompressedDataError`; a
    stream cut short simply ends early, for the caller to notice."""
    source = _ChunkSource(iter(chunks))
    reader = zstandard.ZstdDecompressor(max_window_size=max_window).stream_reader(
        source,  # type: ignore[arg-type]  # a readable file, though not typing.IO
        read_size=_DECODE_PIECE, read_across_frames=True, closefd=False
    )
    produced = 0
    while True:
        try:
            piece = reader.read(_DECODE_PIECE)
        except zstandard.ZstdError as exc:
            raise _invalid(what, exc, max_window) from None
        if not piece:
            return
        produced += len(piece)
        if produced > limit:
            raise _too_long(what, limit)
        yield piece
