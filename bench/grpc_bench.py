"""Benchmark of `casframe serve` and the grpc:// backend: push and pull through a real server.

    .venv/bin/python bench/grpc_bench.py [--quick] [--out DIR] [--repeat N] [--keep]
                                         [--kinds e2e,local,server,reference,echo,buildgrid]

Builds the trees of bench/run.py (small: 20,000 files of 1-8 KiB in 401 directories, 10% of
them duplicates; large: 8 files of 128 MiB; --quick: 2,000 files and 8 x 16 MiB) and imports
them into a source file:// store (not timed). Then each repetition measures, kind after kind
(A B C D E A B C D E ...), every client and every server in a process of its own, on loopback:

* e2e: casframe to casframe, the measurement with targets. The source store pushes a tree to
  `casframe serve` (python -m casframe.server over a new file:// store) through the grpc://
  backend, then a new file:// store pulls it back:
      push / pull large   target >= 400 MB/s       push / pull small   target >= 5,000 files/s
* local: the same two transfers between file:// stores, without gRPC: what the stores and the
  transfer cost on this machine at this moment (the ceiling of e2e).
* server: a client speaking the REAPI through the generated stubs (FindMissingBlobs, ByteStream
  Write/Read in 1 MiB chunks, BatchUpdateBlobs/BatchReadBlobs, two streams or batches at a
  time, verifying every blob it pulls) against casframe serve: the server alone.
* reference: that client against a server in this script that discards uploads and serves
  zeros: grpcio and the client's own file I/O, without any storage.
* buildgrid: the e2e transfers against BuildGrid 0.9.1's `bgd server` (a new disk storage;
  configured as in bench/serve_bench.py), the tree going by its digest since BuildGrid keeps
  no refs: the Python REAPI server peer (target: e2e at least 2x its throughput).
* echo: raw grpcio, the large tree's size (1 GiB) in 1 MiB messages of plain bytes up one
  stream and down another: what the transport can move on this machine right now. Then, in a
  child, the pieces of work no transfer of the large tree can avoid, each in CPU seconds: read
  the files, hash them, write them anew. The summary adds them up with the echo's CPU (hashing
  counted twice: client and server each verify) into the floor of a push or pull, and the
  best rate that floor allows with both cores free; e2e's large transfers are compared with it
  in rate (target >= 0.85x) and in CPU seconds (client + server), which a busy machine leaves
  comparable. Each BuildGrid row also gives the client's and the server's CPU seconds of both
  (the same client drives both servers) and the most the client's CPU alone allows.

Before each measured child, `sync` writes back what earlier phases left dirty (untimed).
Each part (large, small) gets a server of its own; the large trees' stores are deleted right
after their phases (few files, so no slowdown for later file creation), the rest at the end.
Every client reports its own peak RSS (VmHWM) and CPU seconds; the server's VmHWM is read from
/proc before it is stopped and its CPU seconds around each phase (target: peak RSS below 150
MiB each). On a shared machine CPU seconds vary much less than times. Results go to
DIR/<time>-grpc/results.json; see docs/server.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
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
sys.path.insert(0, str(HERE))
from run import FULL, QUICK, build_large, build_small  # noqa: E402 - the same trees as run.py
from serve_bench import (  # noqa: E402 - the same BuildGrid as serve_bench.py
    BUILDGRID_CONFIG,
    buildgrid_venv,
    free_port,
    wait_for_port,
)

MiB = 1 << 20
T_LARGE_MBPS = 400.0
T_SMALL_FPS = 5_000.0
T_RSS_MIB = 150.0
T_FLOOR_RATIO = 0.85  # single-stream push and pull of the large tree against the floor
PARTS = ("large", "small")
PHASES = ("push-large", "pull-large", "push-small", "pull-small")
KINDS = ("e2e", "local", "server", "reference", "echo", "buildgrid")
STREAMS = 2  # the stub client's concurrent uploads/downloads or batches: one per core


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return -1.0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report(started: float, cpu0: float, files: int, size: int) -> None:
    """Print the child's result: what the parent reads (the last line of stdout)."""
    print(json.dumps({"op_s": time.perf_counter() - started, "cpu_s": cpu_s() - cpu0,
                      "files": files, "bytes": size, "hwm_mib": hwm_mib()}), flush=True)


# -- data -------------------------------------------------------------------------------------


def make_data(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Build both trees and list every distinct content in them with its digest."""
    trees = {"small": build_small(root / "small", spec["small_files"], spec["small_dirs"]),
             "large": build_large(root / "large", spec["large_files"], spec["large_size"])}
    manifest: dict[str, Any] = {"trees": trees}
    for part in PARTS:
        seen: dict[str, dict[str, Any]] = {}
        for path in sorted((root / part).rglob("*")):
            if path.is_file():
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(MiB):
                        h.update(chunk)
                seen.setdefault(h.hexdigest(), {"path": str(path), "hash": h.hexdigest(),
                                                "size": path.stat().st_size})
        manifest[part] = list(seen.values())
    return manifest


def prepare_source(store_url: str, data: str) -> None:
    """Import both trees into the source store, as refs bench/large and bench/small."""
    from casframe import open_store

    with open_store(store_url) as store:
        for part in PARTS:
            store.set_ref(f"bench/{part}", store.import_directory(Path(data) / part))


# -- client phases (each in its own process) -------------------------------------------------


def transfer_phase(phase: str, source_url: str, dest_url: str, manifest_path: str,
                   by_digest_from: str | None = None) -> None:
    """e2e, local and buildgrid: ``source`` pushes the tree to ``dest``, or ``dest`` pulls it
    from it. ``by_digest_from``: the tree goes by its digest (read from that store's ref), and
    no ref is set, for a server without refs (BuildGrid)."""
    from casframe import open_store

    manifest = json.loads(Path(manifest_path).read_text())
    direction, part = phase.split("-")
    tree = manifest["trees"][part]
    name: Any = f"bench/{part}"
    if by_digest_from is not None:
        with open_store(by_digest_from) as origin:
            name = origin.get_ref(name, touch=False)
    with open_store(source_url) as source, open_store(dest_url) as dest:
        started, cpu0 = time.perf_counter(), cpu_s()
        if direction == "push":
            source.push(dest, name)
        else:
            dest.pull(source, name)
        report(started, cpu0, tree["files"], tree["bytes"])


def stub_phase(phase: str, port: int, manifest_path: str, dest: str, check: bool) -> None:
    """server and reference: the REAPI through the generated stubs, on the distinct contents."""
    import grpc

    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as re_grpc,
    )
    from casframe._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

    manifest = json.loads(Path(manifest_path).read_text())
    options = [("grpc.max_receive_message_length", 8 * MiB),
               ("grpc.max_send_message_length", 8 * MiB),
               ("grpc.http2.bdp_probe", 0)]  # bounded receive windows, as casframe's own
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
        resource_name = f"uploads/{upload}/blobs/{entry['hash']}/{entry['size']}"

        def requests() -> Any:
            buf = bytearray(MiB)
            offset = 0
            with open(entry["path"], "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    last = offset + n >= entry["size"]
                    yield bytestream_pb2.WriteRequest(
                        resource_name=resource_name if offset == 0 else "", write_offset=offset,
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

    started, cpu0 = time.perf_counter(), cpu_s()
    entries = manifest["large" if phase.endswith("large") else "small"]
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
    report(started, cpu0, len(entries), sum(e["size"] for e in entries))
    channel.close()


def echo_phase(phase: str, port: int, manifest_path: str) -> None:
    """echo: as many bytes as the large tree holds, in 1 MiB plain-bytes messages, up one
    stream (push) or down one (pull)."""
    import grpc

    chunks = json.loads(Path(manifest_path).read_text())["trees"]["large"]["bytes"] // MiB
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=ECHO_OPTIONS)
    chunk = os.urandom(MiB)
    started, cpu0 = time.perf_counter(), cpu_s()
    if phase == "push-large":
        up = channel.stream_unary("/casframe.bench.Echo/Up")
        received = int(up(chunk for _ in range(chunks)))
    else:
        down = channel.unary_stream("/casframe.bench.Echo/Down")
        received = sum(len(message) for message in down(str(chunks).encode()))
    assert received == chunks * MiB, received
    report(started, cpu0, 1, received)
    channel.close()


def floor_phase(manifest_path: str, dest: str) -> None:
    """What every push or pull of the large tree must do at least, piece by piece, in CPU
    seconds: read the files (warm), hash them (done once on each side), write them anew."""
    manifest = json.loads(Path(manifest_path).read_text())
    entries = manifest["large"]
    buf = bytearray(MiB)
    view = memoryview(buf)
    parts = {"read": 0.0, "sha256": 0.0, "write": 0.0}
    started, cpu0 = time.perf_counter(), cpu_s()
    Path(dest).mkdir(parents=True, exist_ok=True)
    for index, entry in enumerate(entries):
        h = hashlib.sha256()
        with open(entry["path"], "rb", buffering=0) as src, \
                open(Path(dest) / f"copy{index}", "wb", buffering=0) as out:
            while True:
                t = cpu_s()
                n = src.readinto(buf)
                parts["read"] += cpu_s() - t
                if not n:
                    break
                t = cpu_s()
                h.update(view[:n])
                parts["sha256"] += cpu_s() - t
                t = cpu_s()
                out.write(view[:n])
                parts["write"] += cpu_s() - t
        assert h.hexdigest() == entry["hash"]
    print(json.dumps({"op_s": time.perf_counter() - started, "cpu_s": cpu_s() - cpu0,
                      "parts_cpu_s": parts, "bytes": sum(e["size"] for e in entries),
                      "files": len(entries), "hwm_mib": hwm_mib()}), flush=True)


# -- servers in this script --------------------------------------------------------------------

# The options casframe's server and grpc:// backend use, so the echo is the same transport.
ECHO_OPTIONS = [("grpc.max_receive_message_length", 4 * MiB),
                ("grpc.max_send_message_length", 4 * MiB), ("grpc.http2.bdp_probe", 0)]


def serve_until_terminated(server: Any, name: str, port: int) -> None:
    server.start()
    print(f"{name}: serving on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(None)


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
    serve_until_terminated(server, "reference", server.add_insecure_port("127.0.0.1:0"))


def echo_server() -> None:
    """Up counts what a stream brings (answering the count as text); Down sends as many 1 MiB
    messages as the request (text) asks for."""
    from concurrent import futures

    import grpc

    chunk = os.urandom(MiB)

    def up(requests: Any, context: Any) -> bytes:
        return str(sum(len(message) for message in requests)).encode()

    def down(request: bytes, context: Any) -> Any:
        for _ in range(int(request)):
            yield chunk

    handlers = {"Up": grpc.stream_unary_rpc_method_handler(up),
                "Down": grpc.unary_stream_rpc_method_handler(down)}
    server = grpc.server(futures.ThreadPoolExecutor(4),
                         options=[*ECHO_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("casframe.bench.Echo", handlers)])
    serve_until_terminated(server, "echo", server.add_insecure_port("127.0.0.1:0"))


# -- the run ----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return -1.0


class Served:
    """A server child process: started, measured (CPU, peak RSS) and stopped."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start, see {log}")
        self.port = int(line.strip().rpartition(":")[2])

    def cpu_s(self) -> float:
        return proc_cpu_s(self.process.pid)

    def stop(self) -> float:
        """Stop the server; return its peak RSS in MiB (VmHWM, read just before)."""
        peak = proc_hwm_mib(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait()
        self.log.close()
        if status != 0:
            raise RuntimeError(f"server exited with {status}")
        return peak


class BuildGridServed(Served):
    """BuildGrid 0.9.1's ``bgd server`` over a new disk storage in ``work``."""

    def __init__(self, work: Path, log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115
        self.port = free_port()
        (work / "cas").mkdir(parents=True)
        config = work / "bgd.yml"
        config.write_text(BUILDGRID_CONFIG.format(port=self.port, path=work / "cas"))
        self.process = subprocess.Popen(
            [str(buildgrid_venv() / "bin" / "bgd"), "server", "start", str(config)], cwd=work,
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_port(self.process, self.port, log)

    def stop(self) -> float:
        peak = proc_hwm_mib(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()  # bgd's exit status after SIGTERM is not 0
        self.log.close()
        return peak


def run_child(args: list[str], log: Path, server: Served | None = None) -> dict[str, Any]:
    # Untimed, as in run.py: the previous phase's dirty pages (a pushed GiB) are written back
    # now, not by the kernel's flusher threads on the same two cores during this phase.
    os.sync()
    before = server.cpu_s() if server else 0.0
    with open(log, "ab") as err:
        done = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                              stderr=err, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client {args[:2]} failed, see {log}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    if server:
        result["server_cpu_s"] = server.cpu_s() - before
    return result


def casframe_server(store: Path) -> list[str]:
    # One process: the peak RSS and CPU measured are those of the process serving.
    return [sys.executable, "-m", "casframe.server", f"file://{store}",
            "--listen", "127.0.0.1:0", "--log-level", "warning", "--workers", "1"]


def one_round(kind: str, work: Path, run_dir: Path, log: Path) -> dict[str, Any]:
    """All four phases of one kind; fresh stores and servers, large stores deleted after use."""
    manifest = str(run_dir / "manifest.json")
    source = f"file://{run_dir / 'source'}"
    results: dict[str, Any] = {"server_hwm_mib": 0.0}
    for part in PARTS:
        push, pull = f"push-{part}", f"pull-{part}"
        pushed, pulled = work / f"{part}-pushed", work / f"{part}-pulled"
        server = None
        if kind in ("e2e", "server"):
            server = Served(casframe_server(pushed), log)
        elif kind == "reference":
            server = Served([sys.executable, __file__, "reference"], log)
        elif kind == "echo" and part == "large":
            server = Served([sys.executable, __file__, "echo"], log)
        elif kind == "buildgrid":
            server = BuildGridServed(pushed, log)
        try:
            for phase in (push, pull):
                if kind in ("e2e", "local"):
                    remote = (f"grpc://127.0.0.1:{server.port}" if server
                              else f"file://{pushed}")
                    args = (["transfer", phase, source, remote] if phase == push
                            else ["transfer", phase, remote, f"file://{pulled}"])
                    results[phase] = run_child([*args, manifest], log, server)
                elif kind == "buildgrid":
                    assert server is not None
                    remote = f"grpc://127.0.0.1:{server.port}"
                    args = (["transfer", phase, source, remote] if phase == push
                            else ["transfer", phase, remote, f"file://{pulled}"])
                    results[phase] = run_child([*args, manifest, source], log, server)
                elif kind in ("server", "reference"):
                    assert server is not None
                    results[phase] = run_child(
                        ["stub", phase, str(server.port), manifest, str(pulled),
                         "check" if kind == "server" else "nocheck"], log, server)
                elif kind == "echo" and server is not None:
                    results[phase] = run_child(
                        ["echo-client", phase, str(server.port), manifest], log, server)
            if kind == "echo" and part == "large":
                results["floor"] = run_child(["floor", manifest, str(pulled)], log)
        finally:
            if server:
                results["server_hwm_mib"] = max(results["server_hwm_mib"], server.stop())
        if part == "large":  # 8 big files each: deleting them does not slow file creation
            shutil.rmtree(pushed, ignore_errors=True)
            shutil.rmtree(pulled, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the data and stores")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"which kinds to run, in this order (default {','.join(KINDS)})")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")

    run_dir = args.out / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-grpc")
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    print(f"run directory: {run_dir}", flush=True)
    load = {"start": os.getloadavg()}
    manifest = make_data(run_dir / "data", spec)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    subprocess.run([sys.executable, __file__, "prepare", f"file://{run_dir / 'source'}",
                    str(run_dir / "data")], check=True)
    load["after_generate"] = os.getloadavg()

    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    try:
        for index in range(args.repeat):
            for kind in kinds:  # alternating: A B C A B C ...
                result = one_round(kind, run_dir / f"{kind}{index}", run_dir, log)
                rounds[kind].append(result)
                print(f"  [{index + 1}/{args.repeat}] {kind:<9} " + " | ".join(
                    f"{p} {result[p]['op_s']:.2f} s" for p in PHASES if p in result), flush=True)
    finally:
        load["end"] = os.getloadavg()
        (run_dir / "results.json").write_text(json.dumps(
            {"spec": spec, "trees": manifest["trees"], "rounds": rounds, "load": load},
            indent=2))
    summary = summarise(rounds, manifest["trees"], load, args.repeat)
    (run_dir / "summary.txt").write_text(summary)
    if not args.keep:
        shutil.rmtree(run_dir / "data")
        shutil.rmtree(run_dir / "source")
        for kind in kinds:
            for index in range(args.repeat):
                shutil.rmtree(run_dir / f"{kind}{index}", ignore_errors=True)


def _paired(rounds: dict[str, list[dict[str, Any]]], kind: str, phase: str,
            key: str) -> float | None:
    values = [r[phase][key] for r in rounds.get(kind, []) if phase in r]
    return statistics.median(values) if values else None


def _against_floor(rounds: dict[str, list[dict[str, Any]]], phase: str, least: float,
                   size: int) -> str:
    """e2e against the floor of the same run, in rate (the target) and in CPU seconds (what
    a busy machine leaves comparable): target >= 0.85x."""
    times = [r[phase]["op_s"] for r in rounds.get("e2e", []) if phase in r]
    client, server = _paired(rounds, "e2e", phase, "cpu_s"), _paired(
        rounds, "e2e", phase, "server_cpu_s")
    if not times or client is None or server is None:
        return f"  {phase}: no e2e run to compare with the floor"
    scale = size / rounds["e2e"][0][phase]["bytes"]  # the floor's size over the e2e tree's
    rate = size / scale / statistics.median(times) / 1e6
    best = size / (least / 2) / 1e6
    cpu = (client + server) * scale
    verdict = "yes" if rate / best >= T_FLOOR_RATIO else "NO"
    return (f"  e2e {phase}: {rate:,.0f} MB/s = x{rate / best:.2f} the floor's rate (target >= "
            f"{T_FLOOR_RATIO}: {verdict}); CPU: floor {least:.2f} s / e2e {cpu:.2f} s (client "
            f"{client * scale:.2f} + server {server * scale:.2f}) = x{least / cpu:.2f}")


def _bound(rounds: dict[str, list[dict[str, Any]]], phase: str) -> str:
    """Which side's CPU bounds a row against BuildGrid, both driven by the same client (the
    grpc:// backend): a transfer cannot take less wall time than its busier side's CPU time,
    so with the client's CPU as it is, casframe's rate is at most BuildGrid's times
    (BuildGrid's time / casframe's client CPU)."""
    ours = [_paired(rounds, "e2e", phase, k) for k in ("cpu_s", "server_cpu_s")]
    theirs = [_paired(rounds, "buildgrid", phase, k) for k in ("cpu_s", "server_cpu_s", "op_s")]
    if None in ours or None in theirs:
        return ""
    assert ours[0] is not None and ours[1] is not None and theirs[2] is not None
    side = "client" if ours[0] >= ours[1] else "server"
    return (f"; CPU s client/server: casframe {ours[0]:.2f}/{ours[1]:.2f}, BuildGrid "
            f"{theirs[0]:.2f}/{theirs[1]:.2f}; casframe's {side} is the busier side; "
            f"the client's CPU alone allows at most x{theirs[2] / ours[0]:.2f}")


def summarise(rounds: dict[str, list[dict[str, Any]]], trees: dict[str, Any],
              load: dict[str, Any], repeat: int) -> str:
    def rate(report: dict[str, Any], phase: str) -> float:
        if phase.endswith("large"):
            return report["bytes"] / report["op_s"] / 1e6
        return report["files"] / report["op_s"]

    def median(kind: str, phase: str, key: str | None = None) -> float | None:
        values = [(r[phase][key] if key else rate(r[phase], phase))
                  for r in rounds.get(kind, []) if phase in r]
        return statistics.median(values) if values else None

    def show(value: float | None, unit: str = "", fmt: str = ",.0f") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    lines = [f"load average (1 min): start {load['start'][0]:.2f}, after generating "
             f"{load['after_generate'][0]:.2f}, end {load['end'][0]:.2f}; {os.cpu_count()} cores",
             f"medians of {repeat} alternating runs; small = {trees['small']['files']:,} files "
             f"in {trees['small']['dirs']} directories, large = {trees['large']['files']} x "
             f"{trees['large']['bytes'] // trees['large']['files'] // MiB} MiB", ""]
    header = (f"{'phase':<11}{'e2e':>14}{'target':>12}  ok  {'client/server CPU s':>20}"
              f"{'local':>14}{'e2e/local':>10}{'server':>14}{'reference':>14}{'echo':>12}")
    lines += [header, "-" * len(header)]
    for phase in PHASES:
        unit, target = (" MB/s", T_LARGE_MBPS) if phase.endswith("large") else (" f/s",
                                                                                T_SMALL_FPS)
        ours, local = median("e2e", phase), median("local", phase)
        ok = "-" if ours is None else ("yes" if ours >= target else "NO")
        cpu = (f"{show(median('e2e', phase, 'cpu_s'), fmt='.2f')} / "
               f"{show(median('e2e', phase, 'server_cpu_s'), fmt='.2f')}")
        ratio = "-" if ours is None or not local else f"{ours / local:.2f}"
        lines.append(f"{phase:<11}{show(ours, unit):>14}{show(target, unit):>12}  {ok:<4}"
                     f"{cpu:>20}{show(local, unit):>14}{ratio:>10}"
                     f"{show(median('server', phase), unit):>14}"
                     f"{show(median('reference', phase), unit):>14}"
                     f"{show(median('echo', phase), unit):>12}")
    lines.append("")
    floors = [r["floor"] for r in rounds.get("echo", []) if "floor" in r]
    if floors:
        parts = {k: statistics.median(f["parts_cpu_s"][k] for f in floors)
                 for k in floors[0]["parts_cpu_s"]}
        transport = {p: median("echo", p, "cpu_s") + median("echo", p, "server_cpu_s")
                     for p in ("push-large", "pull-large")}
        size = floors[0]["bytes"]
        for phase, cpu in transport.items():
            if cpu is None:
                continue
            least = parts["read"] + 2 * parts["sha256"] + parts["write"] + cpu
            lines.append(
                f"floor of {phase}: CPU s no transfer of {size / MiB:,.0f} MiB can avoid = "
                f"read {parts['read']:.2f} + sha256 twice {2 * parts['sha256']:.2f} + write "
                f"{parts['write']:.2f} + grpcio (echo, both ends) {cpu:.2f} = {least:.2f} s: "
                f"with both cores free, at most {size / (least / 2) / 1e6:,.0f} MB/s")
            lines.append(_against_floor(rounds, phase, least, size))
        lines.append("")
    if rounds.get("buildgrid"):
        for phase in PHASES:
            unit = " MB/s" if phase.endswith("large") else " f/s"
            theirs, ours = median("buildgrid", phase), median("e2e", phase)
            ratio = "-" if not theirs or ours is None else f"x{ours / theirs:.2f}"
            lines.append(f"BuildGrid {phase:<11}{show(theirs, unit):>14}   casframe e2e / "
                         f"BuildGrid {ratio} (target >= x2)" + _bound(rounds, phase))
        lines.append("")
    if rounds.get("buildgrid"):
        theirs = max(r["server_hwm_mib"] for r in rounds["buildgrid"])
        lines.append(f"peak RSS of BuildGrid's server (no target): {theirs:.0f} MiB")
    for kind in ("e2e", "server"):
        if rounds.get(kind):
            server = max(r["server_hwm_mib"] for r in rounds[kind])
            client = max(r[p]["hwm_mib"] for r in rounds[kind] for p in PHASES if p in r)
            worst = max(server, client)
            lines.append(f"peak RSS ({kind}): server {server:.0f} MiB, client {client:.0f} MiB "
                         f"(target < {T_RSS_MIB:.0f}) {'yes' if worst < T_RSS_MIB else 'NO'}")
    lines += [
        "",
        "e2e: file:// -> casframe serve -> file:// through the grpc:// backend (files/s counts "
        "the tree's files); local: the same transfers file:// -> file://; server: REAPI stubs "
        "against casframe serve and reference: against a sink serving zeros (both count "
        "distinct blobs); echo: raw grpcio, one stream of 1 MiB messages each way",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "prepare":
        prepare_source(sys.argv[2], sys.argv[3])
    elif command == "transfer":
        transfer_phase(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5],
                       sys.argv[6] if len(sys.argv) > 6 else None)
    elif command == "stub":
        stub_phase(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5],
                   sys.argv[6] == "check")
    elif command == "floor":
        floor_phase(sys.argv[2], sys.argv[3])
    elif command == "echo-client":
        echo_phase(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif command == "reference":
        reference_server()
    elif command == "echo":
        echo_server()
    else:
        main()
