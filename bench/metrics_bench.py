"""What metrics and the access log cost ``casframe serve``: requests per second under the same
load, with and without ``--metrics-listen`` and ``--access-log``, in alternating runs.

    .venv/bin/python bench/metrics_bench.py [--quick] [--pairs 4] [--requests 6000]
                                            [--clients 16] [--observe both|metrics|access-log]
                                            [--load bench/load.py] [--instructions]

``--quick``: 2 pairs of 2,000 requests, a smoke run.

Each run starts a new ``casframe serve --workers 1`` process over one ``file://`` store (filled
once, not timed), points a load at it, and stops it. A first run, not counted, lets the load
store what it reads and what it writes (``bench/load.py``'s Writes send the same blobs in every
run), so that every counted run does the same work. Then runs go in pairs, plain and
observed, the order swapped from one pair to the next (plain first, then observed first), so
that a drift of the machine or of the store during the runs counts against both alike; the
figure that counts is the median of the observed runs over the median of the plain ones
(target: at least 0.95). The server's CPU time per request of the timed calls (read from
``/proc`` by ``bench/load.py --server-pids``) is printed beside it: on a shared machine it moves
far less than requests per second, and for a server that is busy on one core it is what bounds
requests per second.

``--instructions`` counts the server's instructions instead (``valgrind --tool=callgrind`` on
the ``casframe serve`` process, the same on a busy machine as on an idle one): for plain and
observed alike, one server answers N requests and another 3N, and the difference over 2N is one
request's instructions, start-up and the load's filling cancelled out (N is ``--requests``,
default 300 here; each run takes a minute or two).

The load is ``--load`` (a script taking ``HOST:PORT --requests N --clients C`` and printing one
JSON line with ``requests_per_s``, as ``bench/load.py`` does) when given or when
``bench/load.py`` exists; else the small built-in mix below, from one asyncio process:

    FindMissingBlobs of 16 digests (half stored)   40%
    BatchReadBlobs of 4 blobs of 4 KiB             30%
    GetActionResult of a stored result             30%
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from casframe import Digest, open_store  # noqa: E402
from casframe._protos.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)

BLOBS = 512
BLOB_SIZE = 4 << 10
ACTIONS = 128
_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_AC = "/build.bazel.remote.execution.v2.ActionCache/"


def fill(store_url: str) -> tuple[list[Digest], list[Digest]]:
    """Store the blobs and action results the built-in load asks for."""
    rng = random.Random(1)
    with open_store(store_url) as store:
        blobs = [store.put_bytes(rng.randbytes(BLOB_SIZE)) for _ in range(BLOBS)]
        actions = []
        for index in range(ACTIONS):
            action = Digest.of_bytes(b"action %d" % index)
            result = re_pb2.ActionResult(exit_code=0)
            result.output_files.add(path=f"out/{index}", digest=blobs[index].to_proto())
            stored = store.put_bytes(result.SerializeToString(deterministic=True))
            store.set_ref(f"ac/_/{action.hash}/{action.size}", stored, check_complete=False)
            actions.append(action)
    return blobs, actions


async def builtin_load(
    target: str, requests: int, clients: int, blobs: list[Digest], actions: list[Digest]
) -> float:
    """Requests per second of the built-in mix."""
    rng = random.Random(2)
    absent = [Digest.of_bytes(b"absent %d" % i) for i in range(BLOBS)]
    calls: list[tuple[str, bytes]] = []
    for _ in range(requests):
        kind = rng.random()
        if kind < 0.4:
            asked = rng.sample(blobs, 8) + rng.sample(absent, 8)
            request: Any = re_pb2.FindMissingBlobsRequest(
                blob_digests=[d.to_proto() for d in asked])
            calls.append((_CAS + "FindMissingBlobs", request.SerializeToString()))
        elif kind < 0.7:
            request = re_pb2.BatchReadBlobsRequest(
                digests=[d.to_proto() for d in rng.sample(blobs, 4)])
            calls.append((_CAS + "BatchReadBlobs", request.SerializeToString()))
        else:
            request = re_pb2.GetActionResultRequest(action_digest=rng.choice(actions).to_proto())
            calls.append((_AC + "GetActionResult", request.SerializeToString()))
    pending = iter(calls)

    async def client() -> None:
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            for method, body in pending:
                await channel.unary_unary(method)(body, timeout=120)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return requests / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process ``pid`` has used so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(store_url: str, extra: list[str], prefix: tuple[str, ...] = ()
           ) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A ``casframe serve`` process (run under ``prefix``, e.g. valgrind); yields its address
    and the process, and stops it gracefully (SIGTERM) at the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Compiled once and kept: else every server under valgrind would count compiling too.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    process = subprocess.Popen(
        # One process: the CPU read from /proc is then that of the process serving (by
        # default `casframe serve` starts a worker per core under a supervisor that serves none).
        [*prefix, sys.executable, "-m", "casframe.server", store_url,
         "--listen", "127.0.0.1:0", "--workers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE if prefix else subprocess.DEVNULL,
        text=True, env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("casframe: serving"):
            raise SystemExit(f"casframe serve did not start: {line!r}")
        yield line.strip().rpartition(" on ")[2], process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait()


def one_run(args: argparse.Namespace, store_url: str, extra: list[str], load: Path | None,
            filled: tuple[list[Digest], list[Digest]], requests: int | None = None
            ) -> tuple[float, float]:
    """Requests per second, and the server's CPU milliseconds per request (the figure a busy
    machine disturbs least: other processes' load slows the run, not the work per call)."""
    requests = requests or args.requests
    with server(store_url, extra) as (target, process):
        before = cpu_seconds(process.pid)
        rate, timed_cpu = run_load(args, target, load, filled, process.pid, requests)
        if timed_cpu is None:  # a load that does not read the server's CPU itself
            timed_cpu = (cpu_seconds(process.pid) - before) * 1000 / requests
        return rate, timed_cpu


def run_load(args: argparse.Namespace, target: str, load: Path | None,
             filled: tuple[list[Digest], list[Digest]], pid: int | None = None,
             requests: int | None = None) -> tuple[float, float | None]:
    """Requests per second, and the server's CPU milliseconds per request during the timed
    calls when the load reads it (``--server-pids``, as bench/load.py does)."""
    requests = requests or args.requests
    if load is None:
        return asyncio.run(builtin_load(target, requests, args.clients, *filled)), None
    command = [sys.executable, str(load), target, "--requests", str(requests),
               "--clients", str(args.clients), "--deadline", "900"]
    if pid is not None and load.name == "load.py":
        command += ["--server-pids", str(pid)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if result.get("errors"):
        raise SystemExit(f"the load saw errors: {result['errors']}")
    timed_cpu = result.get("server_cpu_ms_per_request")
    return float(result["requests_per_s"]), None if timed_cpu is None else float(timed_cpu)


def server_instructions(args: argparse.Namespace, store_url: str, extra: list[str],
                        load: Path | None, filled: tuple[list[Digest], list[Digest]],
                        requests: int) -> int:
    """Instructions of a whole ``casframe serve`` run answering ``requests`` requests."""
    prefix = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
    with server(store_url, extra, prefix) as (target, process):
        run_load(args, target, load, filled, requests=requests)
        process.terminate()
        _, errors = process.communicate()
    collected = [line for line in errors.splitlines() if "Collected" in line]
    if not collected:
        raise SystemExit("valgrind did not report the server's instructions")
    return int(collected[-1].split()[-1])


def instructions(args: argparse.Namespace, store_url: str, extra: list[str],
                 load: Path | None, filled: tuple[list[Digest], list[Digest]]) -> None:
    """Print the server's instructions per request, plain and observed (``--instructions``)."""
    small = args.requests
    per_request = {}
    for kind, options in (("plain", []), (args.observe, extra)):
        counts = [server_instructions(args, store_url, options, load, filled, n)
                  for n in (small, 3 * small)]
        per_request[kind] = (counts[1] - counts[0]) / (2 * small)
        print(f"{kind}: {counts[0]:,} instructions for {small} requests, {counts[1]:,} for "
              f"{3 * small}: {per_request[kind]:,.0f} a request", flush=True)
    print(json.dumps({
        "observed": args.observe, "requests": [small, 3 * small], "clients": args.clients,
        "instructions_per_request": per_request,
        "ratio": per_request[args.observe] / per_request["plain"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs of 2,000 requests")
    parser.add_argument("--pairs", type=int, default=4,
                        help="pairs of runs (default 4: as many with plain first as second)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests a run (default 6,000; 300 with --instructions)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--observe", choices=["both", "metrics", "access-log"], default="both",
                        help="what the observed runs turn on (default: both)")
    parser.add_argument("--load", type=Path, default=None,
                        help="a load script (default: bench/load.py if present, else built in)")
    parser.add_argument("--instructions", action="store_true",
                        help="count the server's instructions a request with callgrind")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 300 if args.instructions else 6000
    if args.quick:
        args.pairs, args.requests = 2, (100 if args.instructions else 2000)
    load = args.load
    if load is None and (ROOT / "bench" / "load.py").exists():
        load = ROOT / "bench" / "load.py"

    with tempfile.TemporaryDirectory(prefix="casframe-metrics-bench-") as work:
        store_url = f"file://{work}/store"
        filled = fill(store_url)
        observed = {
            "metrics": ["--metrics-listen", "127.0.0.1:0"],
            "access-log": ["--access-log", f"{work}/access.log"],
        }
        observed["both"] = observed["metrics"] + observed["access-log"]
        extra = observed[args.observe]
        # Not counted: the load stores what it reads, and its Writes' blobs (the same ones in
        # every run of as many requests or fewer), so that each counted run does the same work.
        most = args.requests * (3 if args.instructions else 1)
        one_run(args, store_url, [], load, filled, most)
        if args.instructions:
            one_run(args, store_url, extra, load, filled)  # compiles what metrics import
            instructions(args, store_url, extra, load, filled)
        else:
            compare(args, store_url, extra, load, filled)


def compare(args: argparse.Namespace, store_url: str, extra: list[str], load: Path | None,
            filled: tuple[list[Digest], list[Digest]]) -> None:
    """Alternating runs, plain and observed, and their ratios."""
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "observed": []}
    for pair in range(args.pairs):
        order = ["plain", "observed"] if pair % 2 == 0 else ["observed", "plain"]
        for kind in order:
            options = [] if kind == "plain" else extra
            runs[kind].append(one_run(args, store_url, options, load, filled))
        (plain, plain_cpu), (seen, seen_cpu) = runs["plain"][-1], runs["observed"][-1]
        print(f"pair {pair + 1} ({order[0]} first): plain {plain:,.0f}/s ({plain_cpu:.3f} ms "
              f"CPU a request), {args.observe} {seen:,.0f}/s ({seen_cpu:.3f} ms)", flush=True)

    def median(kind: str, index: int) -> float:
        return statistics.median(run[index] for run in runs[kind])

    ratio = median("observed", 0) / median("plain", 0)
    summary = {
        "load": str(load) if load else "built-in", "observed": args.observe,
        "requests": args.requests, "clients": args.clients, "runs": runs,
        "requests_per_s_ratio": ratio,
        "cpu_per_request_ratio": median("observed", 1) / median("plain", 1),
        "target": 0.95, "met": ratio >= 0.95, "load_average": os.getloadavg(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
