"""The ``grpc://`` backend's ``?compression=zstd`` against ``casframe serve``: trees pushed and
pulled compressed, stored uncompressed, and the saving counted.

The backend against a server that offers no compressor (BuildGrid) is in
test_grpc_buildgrid.py; against one that sends bad zstd, in test_hostile_remote.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import casframe_grpc._compression as client_compression
import grpc
import pytest
import zstandard
from server_processes import serve_process

from casframe import ConfigError, Digest, Store, open_store
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe._protos.google.bytestream import bytestream_pb2_grpc as byte_grpc
from casframe.compression import ZstdFrames, decode_chunks
from casframe.testing import LARGE_FILE_SIZE, assert_tree_equal, random_bytes, write_files
from casframe.testing.server import CasServers

MiB = 1 << 20


def build_outputs(root: Path) -> Path:
    """Text and object-file-like content that compresses well: small files, a large one."""
    symbols = [f"_ZN6module{n}7process{n % 7}Ev".encode() for n in range(400)]
    files: dict[str, bytes] = {}
    for n in range(40):
        lines = [b"int function_%d(int x) { return x * %d + table[%d]; }" % (i, n, i % 9)
                 for i in range(200)]
        files[f"src/file{n}.c"] = b"\n".join(lines)
        files[f"obj/file{n}.o"] = b"\x7fELF\x02\x01\x01" + b"\x00" * 57 + b"".join(
            symbols[(i * 13 + n) % 400] + bytes([0, 0, n, i % 256]) for i in range(1500))
    files["lib/big.a"] = b"".join(files[f"obj/file{n % 40}.o"] for n in range(120))
    assert len(files["lib/big.a"]) > 3 * MiB  # travels through ByteStream
    return write_files(root, files)


@pytest.fixture
def server_store(memory_store: Store) -> Store:
    return memory_store


@pytest.fixture
def remote(cas_server: CasServers, server_store: Store) -> Callable[[str], Store]:
    url = cas_server(server_store)
    opened: list[Store] = []

    def factory(query: str = "") -> Store:
        store = open_store(url + query)
        opened.append(store)
        return store

    yield factory  # type: ignore[misc]
    for store in opened:
        store.close()


def test_a_tree_pushed_and_pulled_compressed_arrives_whole(
    remote: Callable[[str], Store], server_store: Store, tmp_path: Path
) -> None:
    source = build_outputs(tmp_path / "src")
    zstd = remote("?compression=zstd")
    with open_store(f"file://{tmp_path / 'a'}") as first, \
            open_store(f"file://{tmp_path / 'b'}") as last:
        root = first.import_directory(source)
        pushed = first.push(zstd, root, ref="outputs")
        pulled = last.pull(zstd, "outputs", ref="outputs")
        assert pulled.blobs_sent == pushed.blobs_sent > 80
        last.checkout("outputs", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")
    # Stored uncompressed, under the digests of the content.
    big = (source / "lib" / "big.a").read_bytes()
    assert server_store.read_bytes(Digest.of_bytes(big)) == big

    wire = zstd.blobs.wire  # type: ignore[attr-defined]
    assert wire.content_sent >= pushed.bytes_sent
    assert wire.wire_sent < wire.content_sent / 4
    assert wire.content_received >= len(big)  # (the Directories come through GetTree)
    assert wire.wire_received < wire.content_received / 4


def test_without_the_option_nothing_is_compressed(
    remote: Callable[[str], Store], tmp_path: Path
) -> None:
    source = build_outputs(tmp_path / "src")
    plain = remote("")
    root = plain.import_directory(source)
    plain.checkout(root, tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")
    wire = plain.blobs.wire  # type: ignore[attr-defined]
    assert wire.content_sent == wire.wire_sent > 3 * MiB
    assert wire.content_received == wire.wire_received > 3 * MiB


def test_reads_from_an_offset_and_incompressible_blobs(remote: Callable[[str], Store]) -> None:
    zstd = remote("?compression=zstd")
    noise = random_bytes(LARGE_FILE_SIZE, seed=21)
    digest = zstd.put_bytes(noise)
    for offset in (0, 1, MiB + 5, len(noise) - 1, len(noise)):
        with zstd.open_read(digest, offset) as stream:
            assert stream.read() == noise[offset:]
    small = random_bytes(3000, seed=22)
    assert zstd.read_bytes(zstd.put_bytes(small)) == small
    empty = zstd.put_bytes(b"")
    assert zstd.read_bytes(empty) == b""


def test_uploads_send_each_piece_as_a_zstd_frame_of_its_own() -> None:
    pieces = [b"first piece of text " * 5000, b"", b"second piece, other text " * 3000]
    encoder = ZstdFrames()
    sent = [encoder.encode(piece) for piece in pieces] + [encoder.finish()]
    assert sent[1] == sent[3] == b""  # no frame for no content, nothing to end the stream
    for piece, frame in zip(pieces[::2], sent[::2], strict=True):
        assert zstandard.frame_content_size(frame) == len(piece)
        assert zstandard.ZstdDecompressor().decompress(frame) == piece
    decoded = b"".join(decode_chunks(sent, limit=10 * MiB, what="the upload"))
    assert decoded == b"".join(pieces)
    # A stream without content is still a zstd stream: one empty frame.
    empty = ZstdFrames().finish()
    assert zstandard.frame_content_size(empty) == 0
    assert b"".join(decode_chunks([empty], limit=0, what="nothing")) == b""


@pytest.mark.parametrize("threads", [None, 2])
def test_an_upload_from_a_buffer_refilled_after_each_write_arrives_whole(
    remote: Callable[[str], Store], server_store: Store, threads: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With compressing threads (2), uploads compress their pieces there while the writer goes
    # on: a piece must be taken as it was when written, though the caller refills its buffer
    # at once. Without them (the default), each is compressed as it is written.
    if threads is not None:
        monkeypatch.setattr(client_compression, "COMPRESS_THREADS", threads)
    zstd = remote("?compression=zstd")
    assert zstd.blobs.streams.compressing.threads == (  # type: ignore[attr-defined]
        client_compression.COMPRESS_THREADS)
    pieces = [(b"piece %d of a blob that compresses well; " % n * 30_000)[:MiB]
              for n in range(5)]  # whole messages' worth: not copied into a buffer of its own
    content = b"".join(pieces)
    digest = Digest.of_bytes(content)
    buffer = bytearray()
    upload = zstd.open_upload(digest)
    for piece in pieces:
        buffer[:] = piece
        upload.write(memoryview(buffer))
    buffer[:] = b"x" * len(buffer)
    upload.commit()
    assert server_store.read_bytes(digest) == content
    wire = zstd.blobs.wire  # type: ignore[attr-defined]
    assert wire.content_sent == len(content) > 20 * wire.wire_sent


def test_the_saving_is_logged_when_the_store_closes(
    remote: Callable[[str], Store], caplog: pytest.LogCaptureFixture
) -> None:
    zstd = remote("?compression=zstd")
    zstd.put_bytes(b"compressible text, " * 100_000)
    with caplog.at_level(logging.DEBUG, logger="casframe.grpc"):
        zstd.close()
    [line] = [r.getMessage() for r in caplog.records if r.name == "casframe.grpc"]
    assert line.startswith("grpc://127.0.0.1:")
    assert ": sent 1900000 bytes of content as " in line
    assert "; received 0 bytes of content as 0 bytes" in line


def test_an_unknown_compression_is_refused(remote: Callable[[str], Store]) -> None:
    with pytest.raises(ConfigError) as info:
        remote("?compression=gzip")
    assert "compression='gzip' in grpc://127.0.0.1:" in str(info.value)
    assert str(info.value).endswith("expected one of none, zstd")


def test_casframe_serve_and_the_client_as_processes_apart(tmp_path: Path) -> None:
    """``casframe serve`` as users run it, with --zstd-max-window, against the grpc:// client."""
    source = build_outputs(tmp_path / "src")
    store_url = f"file://{tmp_path / 'served'}"
    with contextlib.ExitStack() as stack:
        _, port = stack.enter_context(serve_process(store_url, "--zstd-max-window", "1MiB"))
        remote = stack.enter_context(open_store(f"grpc://127.0.0.1:{port}?compression=zstd"))
        root = remote.import_directory(source)
        remote.checkout(root, tmp_path / "out")
        assert_tree_equal(source, tmp_path / "out")
        wire = remote.blobs.wire  # type: ignore[attr-defined]
        assert wire.wire_sent < wire.content_sent / 4

        # The client compresses at level 1 (a window well under 1 MiB); a frame asking for
        # 8 MiB, from another client, is refused by this server.
        data = (source / "lib" / "big.a").read_bytes() + b"once more"
        digest = Digest.of_bytes(data)
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=23)
        wide = zstandard.ZstdCompressor(compression_params=params).compress(data)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = byte_pb2.WriteRequest(
            resource_name=f"uploads/u1/compressed-blobs/zstd/{digest.hash}/{digest.size}",
            data=wide, finish_write=True)
        with pytest.raises(grpc.RpcError) as info:
            byte_grpc.ByteStreamStub(channel).Write(iter([request]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs a decoding window larger than the 1048576 bytes allowed" in (
            info.value.details())
    with open_store(store_url) as served:
        big = (source / "lib" / "big.a").read_bytes()
        assert served.read_bytes(Digest.of_bytes(big)) == big  # stored uncompressed
        assert served.find_missing([digest]) == {digest}
