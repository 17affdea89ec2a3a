"""What observing a call costs the server, per call, without gRPC or a client in the way.

    .venv/bin/python bench/observe_cost.py [--quick] [--calls 4000] [--instructions]
                                           [--method Write]

The server's real handlers (``Server``'s services over a ``file://`` store) are called in this
process as grpc.aio would call them, through the real interceptor chain (the call observer,
then the stream limit), with bench/load.py's mix: FindMissingBlobs of 16 digests,
BatchReadBlobs of 4 blobs of 4 KiB, GetActionResult, ByteStream Read of 256 KiB and Write of
64 KiB. Calls are made plain (no sink enabled: what ``casframe serve`` does without
``--metrics-listen``), with the Prometheus metrics (prometheus_client's multiprocess mode, as
``casframe serve`` runs it), with the access log, and with both, in alternating rounds; the
CPU time per call of each (``time.process_time``, every thread) is printed with its ratio to
the plain calls of the same rounds.

``--instructions`` counts instructions instead (``valgrind --tool=callgrind``, the same on a
busy machine as on an idle one): each kind runs as a child process making N and 2N calls, and
the difference over N is the cost of one call, start-up cancelled out; ``--method NAME`` makes
only the mix's calls of that method. ``--quick``: fewer calls.

The figure is the server's own share of a call: gRPC's part of a real call (about 0.3 ms of
CPU on each side on this machine kind) comes on top, so a real server's ratio is closer to 1
than this one (bench/metrics_bench.py measures that, with a real load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KINDS = ("plain", "observer", "metrics", "access-log", "both")
METHODS = ("FindMissingBlobs", "BatchReadBlobs", "GetActionResult", "Read", "Write")
# A memory:// store: no file system whose state and timing change what a call does, so that
# instruction counts repeat; the calls' own work is then smaller than over file://, so the
# ratios here are upper bounds of a file:// server's.
STORE = "memory://"


def _digest(data: bytes) -> Any:
    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class _Context:
    """The servicer context surface the handlers use."""

    def __init__(self, serializer: Any) -> None:
        self._serializer = serializer
        self.sent: list[Any] = []

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def abort(self, code: Any, details: str = "") -> Any:
        raise RuntimeError(f"call aborted: {code} {details}")

    async def write(self, message: Any) -> None:
        self.sent.append(message if self._serializer is None else self._serializer(message))


class _Details(NamedTuple):
    """What grpc tells interceptors of a call."""

    method: str
    invocation_metadata: tuple[()] = ()


class _Collector:
    """Stands for a grpc.aio server while the services are added: keeps their handlers."""

    def __init__(self) -> None:
        self.generic: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass


class Harness:
    """The services of a ``Server`` over ``store``, called through its interceptor chain."""

    def __init__(self, store: Any, sinks: list[Any]) -> None:
        import grpc

        from casframe.server.app import Server
        from casframe.server.interceptors import StreamLimitInterceptor
        from casframe.server.observe import CallObserverInterceptor

        self._grpc = grpc
        server = Server(store, call_sinks=sinks, use_plugins=False)
        server._executor = self.pool = ThreadPoolExecutor(4)
        collector = _Collector()
        server._add_services(collector)  # type: ignore[arg-type]
        self._generic = collector.generic
        self._chain = [CallObserverInterceptor(server._call_sinks),
                       StreamLimitInterceptor(server.streams)]

    async def _handler(self, method: str) -> Any:
        details = _Details(method)

        async def at(index: int, details: Any) -> Any:
            if index == len(self._chain):
                for generic in self._generic:
                    found = generic.service(details)
                    if found is not None:
                        return found
                return None
            return await self._chain[index].intercept_service(
                lambda d: at(index + 1, d), details)

        return await at(0, details)

    async def call(self, method: str, requests: list[bytes]) -> list[Any]:
        """Make one call as grpc.aio does: decode, run the behaviour, encode."""
        handler = await self._handler(method)
        decode = handler.request_deserializer or (lambda raw: raw)
        encode = handler.response_serializer or (lambda message: message)
        context = _Context(handler.response_serializer)
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        request: Any
        if handler.request_streaming:
            async def messages() -> AsyncIterator[Any]:
                for raw in requests:
                    yield decode(raw)
            request = messages()
        else:
            request = decode(requests[0])
        if inspect.isasyncgenfunction(behavior):
            async for response in behavior(request, context):
                context.sent.append(encode(response))
            return context.sent
        response = behavior(request, context)
        if inspect.isawaitable(response):
            response = await response
        if handler.response_streaming:
            for message in response or ():
                context.sent.append(encode(message))
        elif response is not None:
            context.sent.append(encode(response))
        return context.sent


class Load:
    """bench/load.py's mix, as serialized requests made by a seeded generator."""

    def __init__(self, store: Any) -> None:
        from casframe import Digest
        from casframe._protos.build.bazel.remote.execution.v2 import (
            remote_execution_pb2 as re_pb2,
        )

        self.re_pb2 = re_pb2
        rng = random.Random(1)
        self.small = [store.put_bytes(rng.randbytes(4 << 10)) for _ in range(256)]
        self.large = [store.put_bytes(rng.randbytes(256 << 10)) for _ in range(8)]
        self.actions = []
        for index in range(64):
            action = Digest.of_bytes(b"action %d" % index)
            result = re_pb2.ActionResult(exit_code=0)
            result.output_files.add(path=f"out/{index}", digest=self.small[index].to_proto())
            stored = store.put_bytes(result.SerializeToString(deterministic=True))
            store.set_ref(f"ac/_/{action.hash}/{action.size}", stored, check_complete=False)
            self.actions.append(action)

    def calls(self, count: int, seed: int,
              method: str | None = None) -> Iterator[tuple[str, list[bytes]]]:
        """``count`` calls of the mix, or of its calls of ``method`` (a method's own name,
        ``Write``) alone."""
        made = 0
        for call in self._mix(seed):
            if method is None or call[0].endswith("/" + method):
                yield call
                made += 1
                if made == count:
                    return

    def _mix(self, seed: int) -> Iterator[tuple[str, list[bytes]]]:
        from casframe._protos.google.bytestream import bytestream_pb2

        re_pb2 = self.re_pb2
        rng = random.Random(seed)
        cas = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
        while True:
            kind = rng.randrange(100)
            if kind < 30:
                asked = [d.to_proto() for d in rng.sample(self.small, 8)]
                asked += [_digest(b"absent %d" % rng.getrandbits(64)) for _ in range(8)]
                body = re_pb2.FindMissingBlobsRequest(blob_digests=asked)
                yield cas + "FindMissingBlobs", [body.SerializeToString()]
            elif kind < 55:
                body = re_pb2.BatchReadBlobsRequest(
                    digests=[d.to_proto() for d in rng.sample(self.small, 4)])
                yield cas + "BatchReadBlobs", [body.SerializeToString()]
            elif kind < 75:
                body = re_pb2.GetActionResultRequest(
                    action_digest=rng.choice(self.actions).to_proto())
                yield ("/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                       [body.SerializeToString()])
            elif kind < 90:
                blob = rng.choice(self.large)
                read = bytestream_pb2.ReadRequest(resource_name=f"blobs/{blob.hash}/{blob.size}")
                yield "/google.bytestream.ByteStream/Read", [read.SerializeToString()]
            else:
                data = rng.randbytes(64 << 10)
                digest = _digest(data)
                name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
                write = bytestream_pb2.WriteRequest(resource_name=name, data=data,
                                                    finish_write=True)
                yield "/google.bytestream.ByteStream/Write", [write.SerializeToString()]


class _NothingSink:
    """A sink that wants every call and does nothing with it: what observing costs alone."""

    def enabled(self) -> bool:
        return True

    def call_started(self, call: Any) -> None:
        pass

    def call_ended(self, call: Any) -> None:
        pass


def _sinks(kind: str, store: Any, stack: contextlib.ExitStack, work: str) -> list[Any]:
    sinks: list[Any] = []
    if kind == "observer":
        sinks.append(_NothingSink())
    if kind in ("access-log", "both"):
        from casframe.server.accesslog import AccessLog

        sinks.append(stack.enter_context(AccessLog.open(os.path.join(work, "access.log"))))
    if kind in ("metrics", "both"):
        from casframe.server.metrics import ServerMetrics

        sinks.append(ServerMetrics(store))
    return sinks


async def _run(harness: Harness, calls: list[tuple[str, list[bytes]]]) -> float:
    """CPU seconds per call of ``calls``, made one after another."""
    started = time.process_time()
    for method, requests in calls:
        await harness.call(method, requests)
    return (time.process_time() - started) / len(calls)


def child(kind: str, count: int, method: str | None) -> None:
    """Make ``count`` calls of ``kind`` after a warm-up (what --instructions counts), of
    ``method`` alone when given."""
    from casframe import open_store

    with tempfile.TemporaryDirectory(prefix="casframe-observe-") as work, \
            contextlib.ExitStack() as stack:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = work
        store = stack.enter_context(open_store(STORE.format(work=work)))
        load = Load(store)
        harness = Harness(store, _sinks(kind, store, stack, work))
        asyncio.run(_run(harness, list(load.calls(200, 1, method))))
        asyncio.run(_run(harness, list(load.calls(count, 2, method))))
        harness.pool.shutdown()


# Compiled modules written once (by an untimed run of each kind), and the same dictionaries'
# layout in every run: counts that repeat.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
       "PYTHONHASHSEED": "0"}


def instructions(kind: str, count: int, method: str | None = None) -> int:
    env = ENV
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", kind, "--calls", str(count), *_method_args(method)],
        env=env, capture_output=True, text=True, check=True).stderr
    found = re.search(r"Collected : ([\d,]+)", out)
    assert found, out
    return int(found.group(1).replace(",", ""))


def _method_args(method: str | None) -> list[str]:
    return ["--method", method] if method else []


def count_instructions(calls: int, kinds: list[str], method: str | None = None) -> None:
    kinds = ["plain", *(kind for kind in kinds if kind != "plain")]
    for kind in kinds:
        subprocess.run([sys.executable, __file__, "--child", kind, "--calls", "10",
                        *_method_args(method)], env=ENV, check=True)
    per_call = {}
    for kind in kinds:
        per_call[kind] = (instructions(kind, 2 * calls, method)
                          - instructions(kind, calls, method)) / calls
        more = per_call[kind] - per_call["plain"]
        print(f"{kind}: {per_call[kind]:,.0f} instructions a call"
              + (f" ({per_call[kind] / per_call['plain']:.3f}x plain, {more:+,.0f})"
                 if kind != "plain" else ""), flush=True)
    print(json.dumps({"instructions_per_call": per_call, "calls": calls, "method": method,
                      "load_average": os.getloadavg()}))


def timed(calls: int, rounds: int, method: str | None = None) -> None:
    from casframe import open_store

    with tempfile.TemporaryDirectory(prefix="casframe-observe-") as work, \
            contextlib.ExitStack() as stack:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = work
        store = stack.enter_context(open_store(STORE.format(work=work)))
        load = Load(store)
        harnesses = {kind: Harness(store, _sinks(kind, store, stack, work)) for kind in KINDS}
        for harness in harnesses.values():
            asyncio.run(_run(harness, list(load.calls(200, 1, method))))
        cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for index in range(rounds):
            for kind in KINDS:
                batch = list(load.calls(calls, 10 + index, method))  # the same for every kind
                cpu[kind].append(asyncio.run(_run(harnesses[kind], batch)))
        plain = statistics.median(cpu["plain"])
        summary: dict[str, Any] = {"calls": calls, "rounds": rounds, "method": method,
                                   "load_average": os.getloadavg()}
        for kind in KINDS:
            median = statistics.median(cpu[kind])
            summary[kind] = {"cpu_ms_per_call": median * 1000, "ratio": median / plain}
            print(f"{kind}: {median * 1e6:,.0f} us CPU a call ({median / plain:.3f}x plain)")
        print(json.dumps(summary))
        for harness in harnesses.values():
            harness.pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with callgrind instead of timing")
    parser.add_argument("--kinds", default=",".join(KINDS[1:]),
                        help="what to compare with plain calls (default: all of %(default)s)")
    parser.add_argument("--method", choices=METHODS,
                        help="calls of this method of the mix alone")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls, args.method)
    elif args.instructions:
        count_instructions(args.calls or (100 if args.quick else 400), args.kinds.split(","),
                           args.method)
    else:
        timed(args.calls or (500 if args.quick else 2000), 2 if args.quick else args.rounds,
              args.method)


if __name__ == "__main__":
    main()
