"""Compressed blobs in the CAS batch calls: what GetCapabilities offers, how a
BatchUpdateBlobs entry is decoded and a BatchReadBlobs entry encoded.

Blobs are stored uncompressed whatever the client sends; compression is only how they travel
(:mod:`casframe.compression`). Decoding is bounded by the digest's size, and a batch's blobs
count against ``max_batch_total_size_bytes`` by their uncompressed size, so a small batch of
compressed bytes cannot make the server hold more than an uncompressed batch would.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.compression import COMPRESSOR_VALUES, IDENTITY, compress, compressor_name, decompress
from casframe.digest import Digest
from casframe.server.errors import StatusError
from casframe.server.settings import ServerSettings

__all__ = [
    "SERVED_COMPRESSORS",
    "decode_update_entry",
    "encode_read_entry",
    "uncompressed_batch_bytes",
]

_IDENTITY = re_pb2.Compressor.IDENTITY
_ZSTD = re_pb2.Compressor.ZSTD
#: What GetCapabilities lists in ``supported_compressors`` (ByteStream) and
#: ``supported_batch_update_compressors``: every encoding casframe speaks but identity.
SERVED_COMPRESSORS: tuple[re_pb2.Compressor.Value, ...] = tuple(
    re_pb2.Compressor.Value.Value(name.upper()) for name in COMPRESSOR_VALUES if name != IDENTITY
)
# Bytes a compressed read entry must save to be sent compressed: its compressor field costs
# two, and the reply's size bounds (casframe.server.cas) count entries uncompressed.
_LEAST_SAVING = 16


def uncompressed_batch_bytes(
    items: Iterable[re_pb2.BatchUpdateBlobsRequest.Request], contents: Iterable[bytes]
) -> int:
    """The blob bytes a batch update stores: what its digests say for compressed entries
    (checked as they are decoded), the data's own length for the others (``contents``, the
    items' data, read once)."""
    return sum(
        len(data) if item.compressor == _IDENTITY else max(0, item.digest.size_bytes)
        for item, data in zip(items, contents, strict=True)
    )


def decode_update_entry(
    digest: Digest, compressor: int, data: bytes, settings: ServerSettings
) -> bytes:
    """The uncompressed content of one BatchUpdateBlobs entry (still to be verified against
    ``digest``); ``INVALID_ARGUMENT`` for a compressor the server does not offer, and
    :class:`casframe.errors.CompressedDataError` for a stream that does not decode to
    ``digest.size`` bytes."""
    if compressor == _IDENTITY:
        return data
    if compressor not in SERVED_COMPRESSORS:
        offered = ", ".join(compressor_name(c) for c in SERVED_COMPRESSORS)
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"blob {digest}: compressor {compressor_name(compressor)} is not supported "
            f"(this server offers {offered})",
        )
    return decompress(data, digest.size, what=f"the zstd data of blob {digest}",
                      max_window=settings.zstd_max_window_bytes)


def encode_read_entry(
    data: bytes, acceptable: Iterable[int], settings: ServerSettings
) -> tuple[bytes, int]:
    """A BatchReadBlobs entry's data and compressor: zstd when the client accepts it and it
    makes the blob smaller, else the blob as it is."""
    if _ZSTD in acceptable and len(data) > _LEAST_SAVING:
        packed = compress(data, settings.zstd_level)
        if len(packed) + _LEAST_SAVING <= len(data):
            return packed, _ZSTD
    return data, _IDENTITY
