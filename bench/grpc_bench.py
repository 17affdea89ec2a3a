"""Server-side benchmark of `casframe serve`: push and pull through a real server on loopback.

    .venv/bin/python bench/grpc_bench.py [--quick] [--out DIR] [--repeat N] [--keep]

The client speaks the REAPI with the generated stubs directly (FindMissingBlobs, ByteStream
Write/Read for large blobs in 1 MiB chunks, BatchUpdateBlobs/BatchReadBlobs for small ones, two
streams or batches at a time, verifying every blob it pulls), so the figures measure the server,
not casframe's grpc:// backend. Each repetition starts a fresh `python -m casframe.server` over
a new `file://` store, then measures in turn:

* push of 8 large blobs (1 GiB in all; --quick: 128 MiB)       target >= 400 MB/s
* pull of the same blobs into files                              target >= 400 MB/s
* push of 20,000 small files (1-8 KiB; --quick: 2,000)          target >= 5,000 files/s
* pull of the same files into a directory                        target >= 5,000 files/s

and, in the same run, alternating with it (A B C A B C ...), the same transfers against a
reference server in this script that discards uploads and serves zeros (the raw grpcio
ceiling), and straight into and out of a file:// store without gRPC (the backend's own
ceiling on this machine at this moment). The casframe figures are quoted as ratios of both.
Every client phase and every server runs in its own process; peak RSS comes from os.wait4
(target: below 150 MiB each). Results go to DIR/<time>-grpc/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
SEED = 20240614
FULL = {"large_files": 8, "large_size": 128 * MiB, "small_files": 20_000}
QUICK = {"large_files": 8, "large_size": 16 * MiB, "small_files": 2_000}
T_LARGE_MBPS = 400.0
T_SMALL_FPS = 5_000.0
T_RSS_MIB = 150.0
PHASES = ("push-large", "pull-large", "push-small", "pull-small")
STREAMS = 2  # concurrent uploads/downloads or batches: one per core of the benchmark machine


# -- data -------------------------------------------------------------------------------------


def make_data(root: Path, spec: dict[str, int]) -> dict[str, Any]:
    """Write the large blobs and the small tree; return a manifest with every digest."""
    rng = random.Random(SEED)
    large = []
    for index in range(spec["large_files"]):
        path = root / "large" / f"blob{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for _ in range(spec["large_size"] // MiB):
                chunk = rng.randbytes(MiB)
                h.update(chunk)
                f.write(chunk)
        large.append({"path": str(path), "hash": h.hexdigest(), "size": spec["large_size"]})
    small = []
    for index in range(spec["small_files"]):
        path = root / "small" / f"d{index % 64:02d}" / f"f{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1024, 8192))
        path.write_bytes(data)
        small.append({"path": str(path), "hash": hashlib.sha256(data).hexdigest(),
                      "size": len(data)})
    return {"large": large, "small": small}


# -- client phases (each in its own process) -------------------------------------------------


def client(phase: str, port: int, manifest_path: str, dest: str, check: bool) -> None:
    import grpc

    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as re_grpc,
    )
    from casframe._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

    manifest = json.loads(Path(manifest_path).read_text())
    options = [("grpc.max_receive_message_length", 8 * MiB),
               ("grpc.max_send_message_length", 8 * MiB),
               ("grpc.http2.bdp_probe", 0)]  # bounded receive windows, as the server has
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    cas = re_grpc.ContentAddressableStorageStub(channel)
    bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
    caps = re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
    limit = caps.cache_capabilities.max_batch_total_size_bytes or 4 * MiB
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)

    def digest(entry: dict[str, Any]) -> Any:
        return re_pb2.Digest(hash=entry["hash"], size_bytes=entry["size"])

    def batches(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        groups: list[list[dict[str, Any]]] = [[]]
        size = 0
        for entry in entries:
            if groups[-1] and size + entry["size"] > limit:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += entry["size"]
        return groups

    def find_missing(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        missing = set()
        for start in range(0, len(entries), 10_000):
            response = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                blob_digests=[digest(e) for e in entries[start:start + 10_000]]))
            missing.update(d.hash for d in response.missing_blob_digests)
        return [e for e in entries if e["hash"] in missing]

    def write(entry: dict[str, Any]) -> None:
        upload = f"{os.getpid()}-{entry['hash'][:8]}"
        resource = f"uploads/{upload}/blobs/{entry['hash']}/{entry['size']}"

        def requests() -> Any:
            buf = bytearray(MiB)
            offset = 0
            with open(entry["path"], "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    last = offset + n >= entry["size"]
                    yield bytestream_pb2.WriteRequest(
                        resource_name=resource if offset == 0 else "", write_offset=offset,
                        data=bytes(buf[:n]), finish_write=last)
                    offset += n
                    if last:
                        return

        assert bytestream.Write(requests()).committed_size == entry["size"]

    def read(entry: dict[str, Any]) -> None:
        h = hashlib.sha256()
        with open(out / entry["hash"], "wb") as f:
            for response in bytestream.Read(bytestream_pb2.ReadRequest(
                    resource_name=f"blobs/{entry['hash']}/{entry['size']}")):
                h.update(response.data)
                f.write(response.data)
        # The reference server sends zeros: hash all the same, so both clients work alike.
        assert not check or h.hexdigest() == entry["hash"], "pulled content does not match"

    def update(group: list[dict[str, Any]]) -> None:
        request = re_pb2.BatchUpdateBlobsRequest()
        for entry in group:
            with open(entry["path"], "rb") as f:
                request.requests.add(digest=digest(entry), data=f.read())
        response = cas.BatchUpdateBlobs(request)
        assert all(r.status.code == 0 for r in response.responses)

    def batch_read(group: list[dict[str, Any]]) -> None:
        response = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            digests=[digest(e) for e in group]))
        for item in response.responses:
            assert item.status.code == 0, item.status.message
            matches = hashlib.sha256(item.data).hexdigest() == item.digest.hash
            assert matches or not check, "pulled content does not match"
            (out / item.digest.hash).write_bytes(item.data)

    started = time.perf_counter()
    kind = "large" if phase.endswith("large") else "small"
    entries = manifest[kind]
    with ThreadPoolExecutor(STREAMS) as pool:
        if phase == "push-large":
            list(pool.map(write, find_missing(entries)))
        elif phase == "pull-large":
            list(pool.map(read, entries))
        elif phase == "push-small":
            list(pool.map(update, batches(find_missing(entries))))
        elif phase == "pull-small":
            list(pool.map(batch_read, batches(entries)))
        else:
            raise SystemExit(f"unknown phase {phase}")
    elapsed = time.perf_counter() - started
    channel.close()
    print(json.dumps({"op_s": elapsed, "files": len(entries),
                      "bytes": sum(e["size"] for e in entries)}))


def direct(phase: str, store_url: str, manifest_path: str, dest: str) -> None:
    """The same transfers straight into and out of a store, without gRPC: the backend ceiling."""
    from casframe import Digest, open_store

    manifest = json.loads(Path(manifest_path).read_text())
    store = open_store(store_url)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    kind = "large" if phase.endswith("large") else "small"
    entries = manifest[kind]
    limit = 3 * MiB
    groups: list[list[dict[str, Any]]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry["size"] > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry["size"]

    def push_large(entry: dict[str, Any]) -> None:
        with open(entry["path"], "rb", buffering=0) as f:
            store.put_stream(f, Digest(entry["hash"], entry["size"]))

    def pull_large(entry: dict[str, Any]) -> None:
        buf = bytearray(MiB)
        with store.open_read(Digest(entry["hash"], entry["size"])) as stream, \
                open(out / entry["hash"], "wb") as f:
            while n := stream.readinto(buf):
                f.write(memoryview(buf)[:n])

    def push_small(group: list[dict[str, Any]]) -> None:
        blobs = []
        for entry in group:
            with open(entry["path"], "rb") as f:
                blobs.append((Digest(entry["hash"], entry["size"]), f.read()))
        missing = store.find_missing(d for d, _ in blobs)
        store.put_many([(d, b) for d, b in blobs if d in missing])

    def pull_small(group: list[dict[str, Any]]) -> None:
        for digest, data in store.read_many(Digest(e["hash"], e["size"]) for e in group):
            (out / digest.hash).write_bytes(data)

    work = {"push-large": (push_large, entries), "pull-large": (pull_large, entries),
            "push-small": (push_small, groups), "pull-small": (pull_small, groups)}
    function, items = work[phase]
    started = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        list(pool.map(function, items))
    elapsed = time.perf_counter() - started
    store.close()
    print(json.dumps({"op_s": elapsed, "files": len(entries),
                      "bytes": sum(e["size"] for e in entries)}))


def end_to_end(phase: str, port: int, manifest_path: str, dest: str) -> None:
    """casframe to casframe: a file:// store pushes a tree to grpc:// (the server), and a fresh
    file:// store pulls it back; the issue's own measurement."""
    from casframe import open_store

    manifest = json.loads(Path(manifest_path).read_text())
    kind = "large" if phase.endswith("large") else "small"
    data_dir = Path(manifest[kind][0]["path"]).parent
    while data_dir.name != kind:
        data_dir = data_dir.parent
    remote = open_store(f"grpc://127.0.0.1:{port}")
    local = open_store(f"file://{Path(dest) / 'store'}")
    if phase.startswith("push"):
        root = local.import_directory(data_dir)  # not timed: the source store exists already
        started = time.perf_counter()
        local.push(remote, root, ref=f"bench/{kind}")
    else:
        started = time.perf_counter()
        local.pull(remote, f"bench/{kind}")
    elapsed = time.perf_counter() - started
    remote.close()
    local.close()
    print(json.dumps({"op_s": elapsed, "files": len(manifest[kind]),
                      "bytes": sum(e["size"] for e in manifest[kind])}))


# -- reference server: raw grpcio, no storage --------------------------------------------------


def reference_server() -> None:
    """ByteStream and CAS that store nothing and serve zeros: the ceiling of the transport."""
    from concurrent import futures

    import grpc

    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as re_grpc,
    )
    from casframe._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

    zeros = bytes(MiB)

    class Sink(bytestream_pb2_grpc.ByteStreamServicer, re_grpc.ContentAddressableStorageServicer,
               re_grpc.CapabilitiesServicer):
        def Write(self, requests, context):  # noqa: N802
            size = 0
            for request in requests:
                size += len(request.data)
            return bytestream_pb2.WriteResponse(committed_size=size)

        def Read(self, request, context):  # noqa: N802
            size = int(request.resource_name.rsplit("/", 1)[1])
            while size > 0:
                yield bytestream_pb2.ReadResponse(data=zeros[:min(size, MiB)])
                size -= MiB

        def FindMissingBlobs(self, request, context):  # noqa: N802
            return re_pb2.FindMissingBlobsResponse(missing_blob_digests=request.blob_digests)

        def BatchUpdateBlobs(self, request, context):  # noqa: N802
            response = re_pb2.BatchUpdateBlobsResponse()
            for item in request.requests:
                response.responses.add(digest=item.digest)
            return response

        def BatchReadBlobs(self, request, context):  # noqa: N802
            response = re_pb2.BatchReadBlobsResponse()
            for d in request.digests:
                response.responses.add(digest=d, data=zeros[:d.size_bytes])
            return response

        def GetCapabilities(self, request, context):  # noqa: N802
            return re_pb2.ServerCapabilities(cache_capabilities=re_pb2.CacheCapabilities(
                max_batch_total_size_bytes=3 * MiB))

    server = grpc.server(futures.ThreadPoolExecutor(32), options=[
        ("grpc.max_receive_message_length", 4 * MiB), ("grpc.so_reuseport", 0)])
    sink = Sink()
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(sink, server)
    re_grpc.add_ContentAddressableStorageServicer_to_server(sink, server)
    re_grpc.add_CapabilitiesServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"reference: serving on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(None)


# -- the run ----------------------------------------------------------------------------------


class Served:
    """A server child process; its peak RSS is read when it is stopped."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start, see {log}")
        self.port = int(line.strip().rpartition(":")[2])

    def stop(self) -> float:
        self.process.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(self.process.pid, 0)
        self.log.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"server exited with {os.waitstatus_to_exitcode(status)}")
        return usage.ru_maxrss / 1024


def run_client(phase: str, port: int | str, manifest: Path, dest: Path, log: Path,
               check: bool) -> dict[str, Any]:
    mode = "client" if isinstance(port, int) else "direct"
    if phase.startswith("e2e-"):
        mode, phase = "e2e", phase[4:]
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, __file__, mode, phase, str(port),
                                 str(manifest), str(dest), "check" if check else "nocheck"],
                                stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"client {phase} failed, see {log}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    report["client_rss_mib"] = usage.ru_maxrss / 1024
    return report


def one_round(kind: str, workdir: Path, manifest: Path, log: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if kind == "direct":
        for phase in PHASES:
            results[phase] = run_client(phase, f"file://{workdir / 'store'}", manifest,
                                        workdir / phase, log, check=True)
        results["server_rss_mib"] = 0.0
        return results
    if kind in ("casframe", "e2e"):
        store = workdir / "store"
        cmd = [sys.executable, "-m", "casframe.server", f"file://{store}",
               "--listen", "127.0.0.1:0", "--log-level", "warning"]
    else:
        cmd = [sys.executable, __file__, "reference"]
    server = Served(cmd, log)
    try:
        for phase in PHASES:
            results[phase] = run_client(("e2e-" if kind == "e2e" else "") + phase, server.port,
                                        manifest, workdir / phase, log, check=kind != "reference")
    finally:
        results["server_rss_mib"] = server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the data and stores")
    parser.add_argument("--e2e", action="store_true",
                        help="also push and pull between file:// stores through the grpc:// "
                             "backend (casframe on both ends)")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL

    run_dir = args.out / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-grpc")
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    print(f"run directory: {run_dir}")
    manifest_data = make_data(run_dir / "data", spec)
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps(manifest_data))
    load_before = os.getloadavg()

    rounds: dict[str, list[dict[str, Any]]] = {"casframe": [], "reference": [], "direct": []}
    if args.e2e:
        rounds["e2e"] = []
    try:
        for index in range(args.repeat):
            for kind in rounds:  # alternating: A B C A B C ...
                workdir = run_dir / f"{kind}{index}"
                rounds[kind].append(one_round(kind, workdir, manifest, log))
    finally:
        load_after = os.getloadavg()
        (run_dir / "results.json").write_text(json.dumps(
            {"spec": spec, "rounds": rounds, "load": [load_before, load_after]}, indent=2))

    def median(kind: str, phase: str, key: str) -> float:
        values = []
        for r in rounds[kind]:
            report = r[phase]
            values.append(report["bytes"] / report["op_s"] / 1e6 if key == "MB/s"
                          else report["files"] / report["op_s"])
        return statistics.median(values)

    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"{'phase':<12}{'casframe':>14}{'raw grpcio':>14}{'ratio':>7}"
          f"{'direct':>14}{'ratio':>7}{'target':>14}  ok")
    for phase, key, target in (("push-large", "MB/s", T_LARGE_MBPS),
                               ("pull-large", "MB/s", T_LARGE_MBPS),
                               ("push-small", "files/s", T_SMALL_FPS),
                               ("pull-small", "files/s", T_SMALL_FPS)):
        ours, ref = median("casframe", phase, key), median("reference", phase, key)
        store = median("direct", phase, key)
        print(f"{phase:<12}{ours:>8.0f} {key:<7}{ref:>8.0f} {key:<7}{ours / ref:>5.2f}"
              f"{store:>8.0f} {key:<7}{ours / store:>5.2f}{target:>8.0f} {key:<7}"
              f"{'yes' if ours >= target else 'NO'}")
    if args.e2e:
        print("end to end (file:// -> casframe serve -> file://, casframe's grpc:// backend):")
        for phase, key, target in (("push-large", "MB/s", T_LARGE_MBPS),
                                   ("pull-large", "MB/s", T_LARGE_MBPS),
                                   ("push-small", "files/s", T_SMALL_FPS),
                                   ("pull-small", "files/s", T_SMALL_FPS)):
            ours = median("e2e", phase, key)
            print(f"{phase:<12}{ours:>8.0f} {key:<7}{target:>8.0f} {key:<7}"
                  f"{'yes' if ours >= target else 'NO'}")
    served_kinds = [k for k in ("casframe", "e2e") if k in rounds]
    server_rss = max(r["server_rss_mib"] for k in served_kinds for r in rounds[k])
    client_rss = max(r[p]["client_rss_mib"] for k in served_kinds for r in rounds[k] for p in r
                     if p != "server_rss_mib")
    rss_ok = "yes" if max(server_rss, client_rss) < T_RSS_MIB else "NO"
    print(f"peak RSS: server {server_rss:.0f} MiB, client {client_rss:.0f} MiB "
          f"(target < {T_RSS_MIB:.0f}) {rss_ok}")
    if not args.keep:
        shutil.rmtree(run_dir / "data")
        for kind in rounds:
            for index in range(args.repeat):
                shutil.rmtree(run_dir / f"{kind}{index}", ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] == "check")
    elif len(sys.argv) > 1 and sys.argv[1] == "e2e":
        end_to_end(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "direct":
        direct(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "reference":
        reference_server()
    else:
        main()
