"""A load generator for REAPI servers: many concurrent clients, the calls of a build's cache.

    .venv/bin/python bench/load.py HOST:PORT[,HOST:PORT...] [--requests 20000] [--clients 64]
                                   [--deadline 300] [--instance NAME] [--seed 1]
                                   [--server-pids PID,PID...] [--warmup N] [--burst 1000]

First it stores what the load reads (not timed): 2,048 blobs of 4 KiB, 64 blobs of 256 KiB and
256 action results naming some of them, through BatchUpdateBlobs, ByteStream Write and
UpdateActionResult. Then ``--clients`` clients, each on a connection of its own (so a server of
several processes sharing a port sees them spread), make ``--requests`` calls in all, one at a
time each, in this mix (every client's sequence fixed by ``--seed``):

    FindMissingBlobs of 16 digests (half stored)      30%
    BatchReadBlobs of 4 blobs of 4 KiB                25%
    GetActionResult of a stored result                20%
    ByteStream Read of a 256 KiB blob                 15%
    ByteStream Write of a new 64 KiB blob             10%

and it prints one JSON line: requests/s, p50/p99 latency (all calls and per kind), errors,
and the CPU seconds this process used. The run stops at ``--deadline`` seconds whatever is left
(counted as errors), so a stuck server cannot hang a benchmark.

Kept light, because on a small machine it competes with the server for the CPU: one process,
one asyncio event loop, no thread per client, raw calls (no codecs: bytes in, bytes out); every
request is built and serialized before the timed part (a Write's blob is made when it is sent:
all of them at once would hold 128 MiB), and answers are compared as bytes with the answer the
same request got first (FindMissingBlobs, BatchReadBlobs, GetActionResult), never parsed; a
Read counts the bytes it got. Its own CPU time is reported so that a benchmark can say how much
of the machine it took. A Python gRPC client costs about 0.25-0.35 ms of CPU per unary call
whatever is done around it (asyncio, threads or futures alike, measured with rusage).

``--warmup N``: before the timed part, N calls of the same mix (another sequence, Writes of other
blobs) on connections of their own, not counted: a server process that was just started then
has its code paths run, its thread pool grown and its caches filled before it is timed.

**Several servers** (comma-separated, all over one store, as bench/metrics_bench.py runs
them): each is stored and warmed in turn, then every server answers the same ``--requests``
calls, in bursts of ``--burst``: a burst to each server one after the other, their order
changing from burst to burst (every order in turn), each over ``--clients`` connections of its
own opened before the first burst and kept. The JSON line then has one entry per server under
``targets`` (requests/s over its bursts' seconds, p50/p99, and with ``--server-pids``, one
process per server, its CPU time per request, its busy share and each burst's figures).

``--server-pids``: the processes serving; their CPU seconds during the timed part are read
from ``/proc`` (so CPU per request can be compared on a busy machine), and once every client is
connected, the connections each process holds on the target's port are counted (how
``SO_REUSEPORT`` spread them over the workers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from casframe._protos.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)
from casframe._protos.google.bytestream import bytestream_pb2  # noqa: E402

SMALL_BLOBS = 2048
SMALL_SIZE = 4 << 10
READ_BLOBS = 64
READ_SIZE = 256 << 10
WRITE_SIZE = 64 << 10
ACTIONS = 256
FIND_DIGESTS = 16
BATCH_READ = 4
MIX = (("FindMissingBlobs", 30), ("BatchReadBlobs", 25), ("GetActionResult", 20),
       ("Read", 15), ("Write", 10))
CHUNK = 1 << 20

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_AC = "/build.bazel.remote.execution.v2.ActionCache/"
_BS = "/google.bytestream.ByteStream/"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1),
                  ("grpc.max_receive_message_length", 16 << 20)]


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _blob(seed: int, index: int, size: int) -> bytes:
    head = f"casframe load {seed} {index} ".encode()
    return (head + random.Random(seed * 1_000_003 + index).randbytes(size))[:size]


@dataclass
class Workload:
    """The stored data the load reads, and its requests serialized once."""

    instance: str
    seed: int
    small: list[bytes] = field(default_factory=list)
    small_digests: list[re_pb2.Digest] = field(default_factory=list)
    large: list[bytes] = field(default_factory=list)
    actions: list[re_pb2.Digest] = field(default_factory=list)

    def build(self) -> None:
        self.small = [_blob(self.seed, i, SMALL_SIZE) for i in range(SMALL_BLOBS)]
        self.small_digests = [_digest(blob) for blob in self.small]
        self.large = [_blob(self.seed, SMALL_BLOBS + i, READ_SIZE) for i in range(READ_BLOBS)]
        self.actions = [_digest(b"action %d %d" % (self.seed, i)) for i in range(ACTIONS)]

    def find_request(self, rng: random.Random) -> bytes:
        present = rng.sample(self.small_digests, FIND_DIGESTS // 2)
        absent = [re_pb2.Digest(hash=f"{rng.getrandbits(256):064x}", size_bytes=SMALL_SIZE)
                  for _ in range(FIND_DIGESTS // 2)]
        return re_pb2.FindMissingBlobsRequest(
            instance_name=self.instance, blob_digests=present + absent).SerializeToString()

    def batch_read_request(self, rng: random.Random) -> bytes:
        return re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance, digests=rng.sample(self.small_digests, BATCH_READ),
        ).SerializeToString()

    def action_request(self, rng: random.Random) -> bytes:
        return re_pb2.GetActionResultRequest(
            instance_name=self.instance, action_digest=rng.choice(self.actions),
        ).SerializeToString()

    def read_request(self, rng: random.Random) -> tuple[bytes, int]:
        blob = rng.choice(self.large)
        digest = _digest(blob)
        prefix = f"{self.instance}/" if self.instance else ""
        return bytestream_pb2.ReadRequest(
            resource_name=f"{prefix}blobs/{digest.hash}/{digest.size_bytes}",
        ).SerializeToString(), len(blob)

    def write_requests(self, data: bytes) -> list[bytes]:
        digest = _digest(data)
        prefix = f"{self.instance}/" if self.instance else ""
        name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        return [bytestream_pb2.WriteRequest(
            resource_name=name if i == 0 else "", write_offset=i * CHUNK, data=chunk,
            finish_write=i == len(chunks) - 1).SerializeToString()
            for i, chunk in enumerate(chunks)]


class Methods:
    """The calls, on raw bytes (no parsing on this side)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.find = channel.unary_unary(_CAS + "FindMissingBlobs")
        self.batch_read = channel.unary_unary(_CAS + "BatchReadBlobs")
        self.batch_update = channel.unary_unary(_CAS + "BatchUpdateBlobs")
        self.get_action = channel.unary_unary(_AC + "GetActionResult")
        self.update_action = channel.unary_unary(_AC + "UpdateActionResult")
        self.read = channel.unary_stream(_BS + "Read")
        self.write = channel.stream_unary(_BS + "Write")


async def _read_all(methods: Methods, request: bytes) -> int:
    got = 0
    async for message in methods.read(request):
        got += len(message)
    return got


async def populate(target: str, work: Workload) -> None:
    """Store what the load reads (not timed)."""
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        methods = Methods(channel)
        for start in range(0, SMALL_BLOBS, 256):
            request = re_pb2.BatchUpdateBlobsRequest(instance_name=work.instance, requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b)
                for b in work.small[start:start + 256]])
            await methods.batch_update(request.SerializeToString())
        for blob in work.large:
            await methods.write(iter(work.write_requests(blob)))
        for index, action in enumerate(work.actions):
            outputs = [re_pb2.OutputFile(path=f"out/{n}", digest=_digest(
                work.small[(index * 3 + n) % SMALL_BLOBS])) for n in range(3)]
            request = re_pb2.UpdateActionResultRequest(
                instance_name=work.instance, action_digest=action,
                action_result=re_pb2.ActionResult(output_files=outputs, exit_code=0))
            await methods.update_action(request.SerializeToString())


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k, _ in MIX})
    errors: dict[str, int] = field(default_factory=dict)
    first_answer: dict[bytes, bytes] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _schedule(seed: int, count: int) -> list[str]:
    kinds = [kind for kind, weight in MIX for _ in range(weight)]
    rng = random.Random(seed)
    return [rng.choice(kinds) for _ in range(count)]


# One call of the load, made before the timed part: its kind, the serialized request (for a
# Write, the position its blob is made from when it is sent) and, for a Read, the bytes due.
Prepared = tuple[str, bytes | int, int | None]


#: Where the Writes of the warm-up (``--warmup``) take their blobs: past any timed run's.
WARMUP_POSITIONS = 5_000_000


def prepare(work: Workload, kinds: list[str], first: int = 0) -> list[Prepared]:
    """Every request of the load, built and serialized (not timed); ``first`` is the position
    of the first one (the seed of its request, and which blob a Write sends)."""
    prepared: list[Prepared] = []
    for position, kind in enumerate(kinds, start=first):
        rng = random.Random(work.seed * 7919 + position)
        if kind == "FindMissingBlobs":
            prepared.append((kind, work.find_request(rng), None))
        elif kind == "BatchReadBlobs":
            prepared.append((kind, work.batch_read_request(rng), None))
        elif kind == "GetActionResult":
            prepared.append((kind, work.action_request(rng), None))
        elif kind == "Read":
            request, expected = work.read_request(rng)
            prepared.append((kind, request, expected))
        else:
            prepared.append((kind, position, None))
    return prepared


async def _client(target: str, work: Workload, tally: Tally, prepared: list[Prepared],
                  next_index: Callable[[], int], connected: Callable[[], None]) -> None:
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        await channel.channel_ready()
        connected()
        await _calls(channel, work, tally, prepared, next_index)


async def _calls(channel: grpc.aio.Channel, work: Workload, tally: Tally,
                 prepared: list[Prepared], next_index: Callable[[], int],
                 end: int | None = None) -> None:
    """Make the calls of ``prepared`` at the positions ``next_index`` gives, up to ``end``
    (default: all of them), one at a time."""
    methods = Methods(channel)
    calls: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "FindMissingBlobs": methods.find, "BatchReadBlobs": methods.batch_read,
        "GetActionResult": methods.get_action,
        "Read": lambda request: _read_all(methods, request),
        "Write": lambda position: methods.write(iter(work.write_requests(
            _blob(work.seed, 10_000_000 + position, WRITE_SIZE)))),
    }
    first_answer = tally.first_answer
    end = len(prepared) if end is None else end
    while (position := next_index()) < end:
        kind, request, expected = prepared[position]
        started = time.perf_counter()
        try:
            answer = await calls[kind](request)
        except grpc.aio.AioRpcError as exc:
            tally.error(f"{kind}: {exc.code().name}: {exc.details()}")
            continue
        tally.latencies[kind].append(time.perf_counter() - started)
        if expected is not None:
            if answer < expected:
                tally.error(f"{kind}: {answer} of {expected} bytes")
        elif isinstance(request, bytes):
            if first_answer.setdefault(request, answer) != answer:
                tally.error(f"{kind}: answered differently to the same request")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from /proc."""
    return sum(proc_user_system_s(pid))


def proc_user_system_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds process ``pid`` has used, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections on local ``port`` that each of ``pids`` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "01":
                    inodes.add(fields[9])
    counts = {}
    for pid in pids:
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        count += 1
        counts[pid] = count
    return counts


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def warm_up(target: str, work: Workload, requests: int, clients: int,
                  deadline: float) -> None:
    """``requests`` calls of the mix, not counted (``--warmup``)."""
    prepared = prepare(work, _schedule(work.seed + 1, requests), WARMUP_POSITIONS)
    counter = iter(range(requests + clients))
    tally = Tally()
    tasks = [asyncio.create_task(_client(target, work, tally, prepared, lambda: next(counter),
                                         lambda: None))
             for _ in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    failed = [task.exception() for task in done if task.exception() is not None]
    if pending or failed or tally.errors:
        raise SystemExit(f"the warm-up failed: {failed or tally.errors or 'deadline'}")


async def run(target: str, requests: int, clients: int, deadline: float, instance: str,
              seed: int, server_pids: list[int] | None = None, warmup: int = 0
              ) -> dict[str, Any]:
    work = Workload(instance, seed)
    work.build()
    await populate(target, work)
    if warmup:
        await warm_up(target, work, warmup, clients, deadline)
    prepared = prepare(work, _schedule(seed, requests))
    tally = Tally()
    counter = iter(range(requests + clients))
    pids = server_pids or []
    spread: dict[int, int] = {}
    ready = 0

    def connected() -> None:  # once every client is connected: count them per process
        nonlocal ready
        ready += 1
        if ready == clients and pids:
            spread.update(connections_by_pid(pids, int(target.rpartition(":")[2])))

    server0 = {pid: proc_cpu_s(pid) for pid in pids}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    tasks = [asyncio.create_task(_client(target, work, tally, prepared,
                                         lambda: next(counter), connected))
             for _ in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = {pid: proc_cpu_s(pid) - server0[pid] for pid in pids}
    for task in done:
        if task.exception() is not None:
            tally.error(f"client failed: {task.exception()!r}")
    answered = sum(len(v) for v in tally.latencies.values())
    if answered + sum(tally.errors.values()) < requests:
        tally.error(f"unanswered at the {deadline:g} s deadline: "
                    f"{requests - answered - sum(tally.errors.values())}")
    every = [x for v in tally.latencies.values() for x in v]
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "target": target, "requests": requests, "clients": clients, "answered": answered,
        "seconds": elapsed, "requests_per_s": answered / elapsed,
        "p50_ms": _quantile(every, 0.50) * 1e3, "p99_ms": _quantile(every, 0.99) * 1e3,
        "by_kind": {kind: {"count": len(v), "p50_ms": _quantile(v, 0.50) * 1e3,
                           "p99_ms": _quantile(v, 0.99) * 1e3}
                    for kind, v in tally.latencies.items()},
        "errors": tally.errors,
        "client_cpu_s": client_cpu,
        "client_cpu_ms_per_request": client_cpu / max(answered, 1) * 1e3,
        "server_cpu_s": {str(pid): cpu for pid, cpu in server_cpu.items()},
        "server_cpu_ms_per_request": (sum(server_cpu.values()) / max(answered, 1) * 1e3
                                      if pids else None),
        "connections": {str(pid): count for pid, count in spread.items()},
        "load_average": os.getloadavg(),
    }


async def alternate(targets: list[str], pids: list[int], requests: int, clients: int,
                    burst: int, deadline: float, instance: str, seed: int, warmup: int
                    ) -> dict[str, Any]:
    """Several servers of one store answering the same calls in turn: the calls go in bursts
    of ``burst``, each burst to every server one after the other (their order changing from
    burst to burst), each server over ``clients`` connections of its own kept open all along.
    What the machine's other work does to the run then falls on every server alike."""
    work = Workload(instance, seed)
    work.build()
    for target in targets:
        await populate(target, work)
        if warmup:
            await warm_up(target, work, warmup, clients, deadline)
    prepared = prepare(work, _schedule(seed, requests))
    shared = Tally()
    tallies = [Tally(first_answer=shared.first_answer) for _ in targets]
    seconds, cpu, system = [0.0] * len(targets), [0.0] * len(targets), [0.0] * len(targets)
    bursts: list[list[tuple[float, float]]] = [[] for _ in targets]  # requests/s, CPU ms each
    orders = list(itertools.permutations(range(len(targets))))
    channels = [[grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
                 for _ in range(clients)] for target in targets]
    give_up = time.monotonic() + deadline
    try:
        await asyncio.gather(*(channel.channel_ready() for own in channels for channel in own))
        for number, start in enumerate(range(0, requests, burst)):
            end = min(start + burst, requests)
            for index in orders[number % len(orders)]:
                next_index = iter(range(start, end + clients)).__next__
                pid = pids[index] if pids else None
                user0, system0 = proc_user_system_s(pid) if pid else (math.nan, math.nan)
                started = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(
                    _calls(channel, work, tallies[index], prepared, next_index, end)
                    for channel in channels[index])), give_up - time.monotonic())
                took = time.perf_counter() - started
                user1, system1 = proc_user_system_s(pid) if pid else (math.nan, math.nan)
                used = user1 - user0 + system1 - system0
                seconds[index] += took
                cpu[index] += used
                system[index] += system1 - system0
                bursts[index].append((round((end - start) / took, 1),
                                      round(used * 1e3 / (end - start), 4)))
    except TimeoutError:
        shared.error(f"unfinished at the {deadline:g} s deadline")
    finally:
        for own in channels:
            for channel in own:
                await channel.close()
    per_target = []
    for index, (target, tally) in enumerate(zip(targets, tallies, strict=True)):
        answered = sum(len(v) for v in tally.latencies.values())
        every = [x for v in tally.latencies.values() for x in v]
        per_target.append({
            "target": target, "answered": answered, "seconds": seconds[index],
            "requests_per_s": answered / seconds[index] if seconds[index] else 0.0,
            "p50_ms": _quantile(every, 0.50) * 1e3, "p99_ms": _quantile(every, 0.99) * 1e3,
            "server_cpu_ms_per_request": cpu[index] / max(answered, 1) * 1e3,
            "server_system_ms_per_request": system[index] / max(answered, 1) * 1e3,
            "server_busy": cpu[index] / seconds[index] if seconds[index] else math.nan,
            "bursts": bursts[index],
        })
        for what, count in tally.errors.items():
            shared.errors[f"{target}: {what}"] = count
    return {"requests": requests, "clients": clients, "burst": burst, "targets": per_target,
            "errors": shared.errors, "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", metavar="HOST:PORT",
                        help="a server; or several, comma-separated, answering in turn")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds the measured load may take at most")
    parser.add_argument("--instance", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-pids", default="",
                        help="comma-separated ids of the serving processes (CPU, connections)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="calls made before the timed part, not counted")
    parser.add_argument("--burst", type=int, default=1000,
                        help="with several servers: calls each answers before the next's turn")
    args = parser.parse_args()
    pids = [int(pid) for pid in args.server_pids.split(",") if pid]
    targets = args.target.split(",")
    if len(targets) > 1:
        if pids and len(pids) != len(targets):
            parser.error("--server-pids: one process for each server")
        result = asyncio.run(alternate(targets, pids, args.requests, args.clients, args.burst,
                                       args.deadline, args.instance, args.seed, args.warmup))
    else:
        result = asyncio.run(run(args.target, args.requests, args.clients, args.deadline,
                                 args.instance, args.seed, pids, args.warmup))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
