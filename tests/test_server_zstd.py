"""zstd on the wire, as the REAPI text describes it, against an in-process ``casframe serve``.

No installable client speaks ``compressed-blobs`` (Bazel 4.2 predates it), so these tests are
written from remote_execution.proto itself: resource names with and without an instance name,
``read_offset`` counted in uncompressed bytes and ``write_offset`` in compressed bytes after a
stream's first message, the uncompressed digest verified, the batch calls' ``compressor`` and
``acceptable_compressors`` fields. They talk to the server through the generated stubs, never
through casframe's own grpc:// client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import zstandard
from server_processes import ClientStubs

from casframe import CompressedDataError, ConfigError, Digest, Store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.compression import ZstdDecoder, ZstdEncoder
from casframe.server import Server
from casframe.testing import random_bytes
from casframe.testing.server import CasServers

MiB = 1 << 20
ZSTD = re_pb2.Compressor.ZSTD
IDENTITY = re_pb2.Compressor.IDENTITY
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def compressible(size: int, seed: int = 0) -> bytes:
    """Text-like content that zstd shrinks several times over, different for each seed."""
    words = [f"symbol_{seed}_{n:05d}" for n in range(2000)]
    out = bytearray()
    n = seed
    while len(out) < size:
        n = (n * 1103515245 + 12345) % (1 << 31)
        out += words[n % len(words)].encode() + b" "
    return bytes(out[:size])


def zstd(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


@dataclass
class Served(ClientStubs):
    server: Server
    store: Store
    channel: grpc.Channel

    def read(self, resource: str, offset: int = 0, limit: int = 0) -> bytes:
        """The bytes a Read sends, as they come (compressed for compressed-blobs)."""
        return b"".join(r.data for r in self.bytestream.Read(byte_pb2.ReadRequest(
            resource_name=resource, read_offset=offset, read_limit=limit)))

    def write(self, resource: str, pieces: list[bytes], *, start: int = 0,
              finish: bool = True) -> byte_pb2.WriteResponse:
        """One Write call sending ``pieces``: the first at ``start``, each later one at
        ``start`` plus the bytes sent before it."""
        return self.bytestream.Write(write_requests(resource, pieces, start=start,
                                                    finish=finish))

    def committed(self, resource: str) -> tuple[int, bool]:
        status = self.bytestream.QueryWriteStatus(
            byte_pb2.QueryWriteStatusRequest(resource_name=resource))
        return status.committed_size, status.complete


def write_requests(resource: str, pieces: list[bytes], *, start: int = 0,
                   finish: bool = True) -> Iterator[byte_pb2.WriteRequest]:
    offset = start
    for index, piece in enumerate(pieces):
        yield byte_pb2.WriteRequest(
            resource_name=resource if index == 0 else "", write_offset=offset, data=piece,
            finish_write=finish and index == len(pieces) - 1)
        offset += len(piece)


@pytest.fixture
def serve(cas_server: CasServers, memory_store: Store) -> Iterator[Callable[..., Served]]:
    channels: list[grpc.Channel] = []

    def factory(**settings: object) -> Served:
        url = cas_server(memory_store, **settings)
        channel = grpc.insecure_channel(url.removeprefix("grpc://").split("/")[0])
        channels.append(channel)
        served = Served(cas_server.servers[url], memory_store, channel)
        served.attach_stubs(channel)
        return served

    try:
        yield factory
    finally:
        for channel in channels:
            channel.close()


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


def rpc_error(code: grpc.StatusCode, call: Callable[..., object], *args: object) -> str:
    """Call, expect a gRPC error with ``code``, return its message."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if isinstance(result, Iterator):
            list(result)
    assert info.value.code() == code, (info.value.code(), info.value.details())
    return info.value.details()


def read_name(digest: Digest, instance: str = "") -> str:
    return f"{instance}/" * bool(instance) + f"compressed-blobs/zstd/{digest.hash}/{digest.size}"


def upload_name(digest: Digest, instance: str = "", upload: str = "5b0c1f3e-1d2a") -> str:
    prefix = f"{instance}/" * bool(instance)
    return f"{prefix}uploads/{upload}/compressed-blobs/zstd/{digest.hash}/{digest.size}"


def in_pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


# -- Capabilities -------------------------------------------------------------------------------


def test_capabilities_offer_zstd_for_bytestream_and_batch_updates(served: Served) -> None:
    cache = served.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest()).cache_capabilities
    assert list(cache.supported_compressors) == [ZSTD]
    assert list(cache.supported_batch_update_compressors) == [ZSTD]


# -- ByteStream Read ------------------------------------------------------------------------------


@pytest.mark.parametrize("instance", ["", "main", "team/linux"])
def test_compressed_read_with_and_without_instance_name(serve: Callable[..., Served],
                                                        instance: str) -> None:
    served = serve(instance_names=(instance,))
    data = compressible(3 * MiB + 5, seed=1)
    digest = served.store.put_bytes(data)
    sent = served.read(read_name(digest, instance))
    assert len(sent) < len(data) // 3
    assert zstandard.ZstdDecompressor().decompressobj().decompress(sent) == data


def test_compressed_read_offset_counts_uncompressed_bytes(served: Served) -> None:
    data = compressible(2 * MiB + 77, seed=2)
    digest = served.store.put_bytes(data)
    name = read_name(digest)
    for offset in (1, MiB + 3, len(data) - 1, len(data)):
        sent = served.read(name, offset=offset)
        assert zstandard.ZstdDecompressor().decompressobj().decompress(sent) == data[offset:]
    message = rpc_error(grpc.StatusCode.OUT_OF_RANGE, served.read, name, len(data) + 1)
    assert str(len(data) + 1) in message


def test_compressed_read_of_a_corrupt_blob_is_data_loss(served: Served) -> None:
    data = compressible(2 * MiB + 1, seed=17)
    digest = served.store.put_bytes(data)
    bad = bytearray(data)
    bad[-1] ^= 1
    served.store.blobs.blobs[digest] = (bytes(bad), 0.0)  # type: ignore[attr-defined]
    decoder = zstandard.ZstdDecompressor().decompressobj()
    received = bytearray()
    with pytest.raises(grpc.RpcError) as info:
        for response in served.bytestream.Read(
                byte_pb2.ReadRequest(resource_name=read_name(digest))):
            received += decoder.decompress(response.data)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert len(received) < len(data)  # the last chunk is never sent


def test_compressed_read_refuses_a_read_limit(served: Served) -> None:
    digest = served.store.put_bytes(compressible(1000))
    message = rpc_error(INVALID, served.read, read_name(digest), 0, 10)
    assert message == "read_limit must be 0 when reading compressed-blobs, got 10"


def test_compressed_read_of_the_empty_blob_is_an_empty_zstd_stream(served: Served) -> None:
    empty = Digest.of_bytes(b"")
    sent = served.read(read_name(empty))
    assert sent and zstandard.ZstdDecompressor().decompressobj().decompress(sent) == b""


def test_compressed_read_of_a_missing_blob_is_not_found(served: Served) -> None:
    missing = Digest.of_bytes(b"never stored")
    assert "blob not found" in rpc_error(grpc.StatusCode.NOT_FOUND, served.read,
                                         read_name(missing))


# -- ByteStream Write -----------------------------------------------------------------------------


@pytest.mark.parametrize("instance, suffix", [("", ""), ("main", ""), ("main", "/meta/data")])
def test_compressed_upload_in_several_messages(serve: Callable[..., Served], instance: str,
                                               suffix: str) -> None:
    served = serve(instance_names=(instance,))
    data = compressible(5 * MiB + 11, seed=3)
    digest = Digest.of_bytes(data)
    stream = zstd(data)
    pieces = in_pieces(stream, 64 << 10)
    assert len(pieces) > 2
    # write_offset: 0 (the uncompressed offset the stream starts at), then the compressed
    # bytes sent so far; committed_size: the compressed bytes of the whole stream.
    response = served.write(upload_name(digest, instance) + suffix, pieces)
    assert response.committed_size == len(stream)
    assert served.store.read_bytes(digest) == data  # stored uncompressed
    assert served.server.partial_uploads == 0


def test_compressed_upload_of_one_frame_per_message(served: Served) -> None:
    # A zstd stream may hold several frames one after another (RFC 8878, section 3): the
    # grpc:// client sends each message's piece as a frame of its own.
    data = compressible(3 * MiB + 11, seed=23)
    digest = Digest.of_bytes(data)
    frames = [zstd(data[start:start + MiB], level=1) for start in range(0, len(data), MiB)]
    response = served.write(upload_name(digest), frames)
    assert response.committed_size == sum(map(len, frames))
    assert served.store.read_bytes(digest) == data


def test_compressed_upload_in_one_message(served: Served) -> None:
    data = compressible(200_000, seed=4)
    digest = Digest.of_bytes(data)
    stream = zstd(data)
    assert served.write(upload_name(digest), [stream]).committed_size == len(stream)
    assert served.store.read_bytes(digest) == data


def test_compressed_upload_of_a_stored_blob_answers_minus_one(served: Served) -> None:
    data = compressible(2 * MiB, seed=5)
    digest = served.store.put_bytes(data)
    response = served.write(upload_name(digest), [zstd(data)[:100]], finish=False)
    assert response.committed_size == -1
    assert served.committed(upload_name(digest)) == (len(data), True)


def test_compressed_write_offsets_count_compressed_bytes(served: Served) -> None:
    data = compressible(3 * MiB, seed=6)
    digest = Digest.of_bytes(data)
    stream = zstd(data)
    pieces = in_pieces(stream, 32 << 10)

    def uncompressed_offsets() -> Iterator[byte_pb2.WriteRequest]:
        yield byte_pb2.WriteRequest(resource_name=upload_name(digest), data=pieces[0])
        yield byte_pb2.WriteRequest(write_offset=MiB, data=pieces[1])

    message = rpc_error(INVALID, served.bytestream.Write, uncompressed_offsets())
    assert message == (
        f"write_offset {MiB} of {upload_name(digest)!r} is not where the stream stands: "
        f"expected {len(pieces[0])} (the first write_offset plus the bytes sent after it)"
    )
    assert served.store.find_missing([digest]) == {digest}


def test_interrupted_compressed_upload_resumes_at_the_uncompressed_size(served: Served) -> None:
    data = compressible(4 * MiB + 99, seed=7)
    digest = Digest.of_bytes(data)
    name = upload_name(digest)
    half = 2 * MiB
    # The first stream carries the first half, flushed to a block boundary, then stops
    # without finish_write (a dropped connection).
    first = ZstdEncoder(level=3).encode(data[:half])
    assert served.write(name, [first], finish=False).committed_size == len(first)
    # QueryWriteStatus says where the kept content ends, in uncompressed bytes: the first
    # write_offset of the stream that continues it.
    assert served.committed(name) == (half, False)
    assert served.store.find_missing([digest]) == {digest}

    rest = in_pieces(zstd(data[half:]), 100_000)
    response = served.write(name, rest, start=half)
    assert response.committed_size == half + sum(map(len, rest))
    assert served.store.read_bytes(digest) == data
    assert served.committed(name) == (len(data), True)


def test_compressed_upload_of_other_content_is_refused(served: Served) -> None:
    data = compressible(3 * MiB, seed=8)
    digest = Digest.of_bytes(data)
    other = bytearray(data)
    other[MiB] ^= 1
    message = rpc_error(INVALID, served.write, upload_name(digest),
                        in_pieces(zstd(bytes(other)), MiB))
    assert "does not match its digest" in message
    small = Digest.of_bytes(b"small")
    message = rpc_error(INVALID, served.write, upload_name(small), [zstd(b"llams")])
    assert "does not match its digest" in message
    assert served.store.find_missing([digest, small]) == {digest, small}
    assert served.server.partial_uploads == 0


def test_compressed_upload_decoding_past_the_digest_size_is_refused(served: Served) -> None:
    data = compressible(2 * MiB, seed=9)
    digest = Digest.of_bytes(data[:MiB])  # announces the first MiB, sends both
    message = rpc_error(INVALID, served.write, upload_name(digest),
                        in_pieces(zstd(data), 256 << 10))
    assert message == (f"the zstd upload of {digest} decodes to more than the {MiB} bytes "
                       "its digest gives")
    assert served.store.find_missing([digest]) == {digest}
    assert served.server.partial_uploads == 0


def test_decoding_stops_as_soon_as_output_passes_the_limit() -> None:
    # 1 GiB of zeros is a few tens of KiB of zstd: the decoder must not produce it all.
    bomb = ZstdEncoder(level=1)
    stream = b"".join(bomb.encode(bytes(64 * MiB)) for _ in range(16)) + bomb.finish()
    assert len(stream) < MiB
    received: list[int] = []
    decoder = ZstdDecoder(lambda piece: received.append(len(piece)), limit=MiB, what="bomb")
    with pytest.raises(CompressedDataError, match="decodes to more than the 1048576 bytes"):
        decoder.write(stream)
    assert sum(received) <= MiB
    assert max(received) <= 256 << 10


def test_whole_frames_are_decoded_in_one_call_and_anything_else_streamed() -> None:
    data = compressible(3 * MiB + 5, seed=12)
    pieces = [data[start : start + MiB] for start in range(0, len(data), MiB)]
    frames = [zstandard.ZstdCompressor(level=1).compress(piece) for piece in pieces]
    checked = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(pieces[0])
    two = frames[0] + frames[1]
    for label, sent, whole in [
        ("a frame a message, as casframe's uploads", frames, [MiB, MiB, MiB, 5]),
        ("with checksums", [checked, *frames[1:]], [MiB, MiB, MiB, 5]),
        ("two frames in one message", [two, *frames[2:]], []),
        ("a frame cut across messages", [frames[0][:999], frames[0][999:], *frames[1:]], []),
        ("streamed from the first message that is not one frame",
         [frames[0], frames[1] + frames[2][:500], frames[2][500:], frames[3]], [MiB]),
    ]:
        received: list[bytes] = []
        decoder = ZstdDecoder(received.append, limit=len(data), what=label)
        for message in sent:
            decoder.write(memoryview(message))
        assert b"".join(received) == data, label
        assert decoder.decoded == len(data), label
        # Whole frames were handed on whole; streamed output in pieces of 256 KiB at most.
        assert [len(r) for r in received[: len(whole)]] == whole, label
        assert all(len(r) <= 256 << 10 for r in received[len(whole) :]), label


def test_a_whole_frame_declaring_more_than_may_come_is_streamed_and_refused() -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(MiB))
    received: list[int] = []
    decoder = ZstdDecoder(lambda piece: received.append(len(piece)), limit=1000, what="it")
    with pytest.raises(CompressedDataError, match="decodes to more than the 1000 bytes"):
        decoder.write(frame)
    assert sum(received) <= 1000


def test_truncated_compressed_upload_is_refused(served: Served) -> None:
    data = compressible(3 * MiB, seed=10)
    digest = Digest.of_bytes(data)
    stream = zstd(data)
    message = rpc_error(INVALID, served.write, upload_name(digest),
                        in_pieces(stream[: len(stream) // 2], 64 << 10))
    assert message.startswith(f"the zstd upload of {digest} ended after decoding ")
    assert message.endswith(f"of its {len(data)} bytes (the zstd stream is cut short)")
    small = Digest.of_bytes(b"tiny blob")
    message = rpc_error(INVALID, served.write, upload_name(small), [zstd(b"tiny blob")[:-3]])
    assert message == f"the zstd upload of {small} is cut short: its zstd frame ends early"
    assert served.store.find_missing([digest, small]) == {digest, small}
    assert served.server.partial_uploads == 0


@pytest.mark.parametrize("garbage", [b"not zstd at all, just text" * 100,
                                     b"(\xb5/\xfd" + bytes(64)],
                         ids=["text", "zstd-magic-then-zeros"])
def test_corrupt_compressed_upload_is_refused(served: Served, garbage: bytes) -> None:
    digest = Digest.of_bytes(compressible(3 * MiB, seed=11))
    message = rpc_error(INVALID, served.write, upload_name(digest), [garbage, garbage])
    assert message.startswith(f"the zstd upload of {digest} is not a valid zstd stream (")
    assert served.server.partial_uploads == 0


def test_a_frame_asking_for_a_window_over_the_limit_is_refused(serve: Callable[..., Served]
                                                               ) -> None:
    served = serve(zstd_max_window_bytes=1 * MiB)
    data = compressible(6 * MiB, seed=12)
    digest = Digest.of_bytes(data)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=23)
    wide = zstandard.ZstdCompressor(compression_params=params).compress(data)
    message = rpc_error(INVALID, served.write, upload_name(digest), in_pieces(wide, MiB))
    assert message == (f"the zstd upload of {digest}: its zstd frame needs a decoding window "
                       f"larger than the {MiB} bytes allowed; compress with a smaller window "
                       "(a lower level)")
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=20)
    narrow = zstandard.ZstdCompressor(compression_params=params).compress(data)
    assert served.write(upload_name(digest), in_pieces(narrow, MiB)).committed_size == len(narrow)


def test_unsupported_and_unknown_compressors_are_refused(served: Served) -> None:
    digest = Digest.of_bytes(b"12345")
    for name, code, text in [
        (f"compressed-blobs/deflate/{digest.hash}/5", grpc.StatusCode.UNIMPLEMENTED,
         "compressor 'deflate' is not supported by this server (GetCapabilities lists zstd)"),
        (f"compressed-blobs/lz4/{digest.hash}/5", INVALID, "unknown compressor 'lz4'"),
    ]:
        assert text in rpc_error(code, served.read, name)
        upload = f"uploads/u/{name}"
        assert text in rpc_error(code, served.write, upload, [b"12345"])


# -- Batch calls --------------------------------------------------------------------------------


def test_batch_update_decodes_and_verifies_zstd_entries(served: Served) -> None:
    good = compressible(300_000, seed=13)
    plain = b"sent as it is"
    lying = compressible(1000, seed=14)
    request = re_pb2.BatchUpdateBlobsRequest()
    request.requests.add(digest=Digest.of_bytes(good).to_proto(), data=zstd(good),
                         compressor=ZSTD)
    request.requests.add(digest=Digest.of_bytes(plain).to_proto(), data=plain)
    request.requests.add(digest=Digest.of_bytes(lying).to_proto(), data=zstd(lying[:-1] + b"!"),
                         compressor=ZSTD)
    request.requests.add(digest=Digest.of_bytes(lying[:500]).to_proto(), data=zstd(lying),
                         compressor=ZSTD)
    # Without its size in the frame header: found out while decoding.
    unsized = zstandard.ZstdCompressor().compressobj()
    request.requests.add(digest=Digest.of_bytes(lying[:400]).to_proto(),
                         data=unsized.compress(lying) + unsized.flush(), compressor=ZSTD)
    request.requests.add(digest=Digest.of_bytes(b"x" * 40).to_proto(), data=b"x" * 40,
                         compressor=ZSTD)
    request.requests.add(digest=Digest.of_bytes(plain[:5]).to_proto(), data=plain[:5],
                         compressor=re_pb2.Compressor.DEFLATE)
    statuses = [r.status for r in served.cas.BatchUpdateBlobs(request).responses]
    assert [s.code for s in statuses] == [0, 0, 3, 3, 3, 3, 3]
    assert "does not match its digest" in statuses[2].message
    assert "decodes to 1000 bytes, not the 500 its digest gives" in statuses[3].message
    assert "decodes to more than the 400 bytes its digest gives" in statuses[4].message
    assert "is not a valid zstd stream" in statuses[5].message
    assert "compressor deflate is not supported (this server offers zstd)" in statuses[6].message
    assert served.store.read_bytes(Digest.of_bytes(good)) == good
    assert served.store.read_bytes(Digest.of_bytes(plain)) == plain
    assert served.store.find_missing([Digest.of_bytes(lying)]) == {Digest.of_bytes(lying)}


def test_batch_update_counts_zstd_entries_uncompressed_against_the_limit(
    serve: Callable[..., Served],
) -> None:
    served = serve(max_message_bytes=2 * MiB)
    limit = served.server.settings.max_batch_total_size_bytes
    zeros = bytes(limit + 1)  # a few hundred bytes of zstd
    request = re_pb2.BatchUpdateBlobsRequest()
    request.requests.add(digest=Digest.of_bytes(zeros).to_proto(), data=zstd(zeros),
                         compressor=ZSTD)
    message = rpc_error(INVALID, served.cas.BatchUpdateBlobs, request)
    assert f"batch update of {limit + 1} bytes is over this server's limit" in message


def test_batch_read_sends_zstd_to_clients_that_accept_it(served: Served) -> None:
    text = compressible(100_000, seed=15)
    noise = random_bytes(5000, seed=16)
    digests = [served.store.put_bytes(text), served.store.put_bytes(noise)]
    protos = [d.to_proto() for d in digests]
    plain = served.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=protos))
    assert [(r.compressor, r.data) for r in plain.responses] == [(IDENTITY, text),
                                                                  (IDENTITY, noise)]
    packed = served.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=protos, acceptable_compressors=[ZSTD]))
    first, second = packed.responses
    assert first.compressor == ZSTD and len(first.data) < len(text) // 3
    assert zstandard.ZstdDecompressor().decompress(first.data) == text
    assert (second.compressor, second.data) == (IDENTITY, noise)  # zstd would not save bytes


def test_zstd_settings_are_checked(memory_store: Store) -> None:
    with pytest.raises(ConfigError) as info:
        Server(memory_store, zstd_max_window_bytes=512)
    assert str(info.value) == ("zstd max window 512 is too small: at least 1024 bytes "
                               "(zstd's smallest window)")
    with pytest.raises(ConfigError) as info:
        Server(memory_store, zstd_level=0)
    assert str(info.value) == "zstd level must be from 1 to 19, got 0"
