"""What metrics and the access log cost ``casframe serve``: requests per second under the same
load, with and without ``--metrics-listen`` and ``--access-log``, in the same run.

    .venv/bin/python bench/metrics_bench.py [--quick] [--rounds 12] [--requests 6000]
                                            [--burst 500] [--warmup 1000] [--clients 16]
                                            [--observe both|metrics|access-log|floor|nothing]
                                            [--no-pin] [--load bench/load.py]
                                            [--instructions]

``--quick``: 3 rounds of 2,000 requests (a smoke run; it cannot tell 5% apart).

One ``file://`` store is filled once, and a first run, not counted, lets ``bench/load.py`` store
what it reads and what it writes (its Writes send the same blobs in every run), so that every
counted run does the same work. Then come rounds. Each round starts three new ``casframe serve
--workers 1`` processes over that store: **plain**, **control** (plain again) and **observed**
(with what ``--observe`` turns on; ``nothing``: a third plain one). One ``bench/load.py`` process
stores and warms each (``--warmup`` calls, not counted), then sends the round's ``--requests``
calls to each in bursts of ``--burst``: a burst to every server in turn, their order changing
from burst to burst (every order of the three in six bursts), over connections kept open. The
order in which the three are started and named to the load turns from round to round too, so
that a place favoured in some way falls on each kind alike: rounds are best a multiple of
three. A round where a server's busy share falls below 0.95 had other work on the server's
core; the end says how many there were (on a quiet machine: none). A
shared machine's other work (which comes and goes within seconds) thus falls on the three
alike; what differs from one process to the next (memory layout, which comes with a new
process) is what the control measures, and why there are several rounds.

**Pinned.** On two or more cores the three servers run on the last core and the load on the
first (``os.sched_setaffinity``; ``--no-pin`` to let the scheduler choose). Unpinned, a server
runs its Python on one core and gRPC's threads wherever the load is not, so its requests per
second depend on where the scheduler put what from one run to the next; pinned, it keeps its
core busy (``busy``, its CPU seconds over the burst's seconds, ~0.99 on a quiet machine) and
its requests per second are one over its CPU time per request.

Printed for each round: each server's requests per second, CPU milliseconds per request and
busy share, and the ratios observed/plain and control/plain; at the end, for requests per
second and CPU per request, the median of the rounds' ratios with a bootstrap 95% interval,
quartiles and range, and one JSON line with every figure. The target is observed/plain ≥ 0.95
(issue 18). ``resolves_5_percent`` says whether control/plain's interval stayed within
0.975-1.025 (the noise floor is below half the difference to tell); ``decided`` whether, besides,
observed/plain's interval lies wholly on one side of 0.95.

``--instructions`` counts the server's instructions instead (``valgrind --tool=callgrind`` on
the ``casframe serve`` process, the same on a busy machine as on an idle one): for plain and
observed alike, one server answers N requests and another 3N, and the difference over 2N is one
request's instructions, start-up and the load's filling cancelled out (N is ``--requests``,
default 300 here; each run takes a minute or two).

**The floor.** ``--observe floor`` gives the observed server, instead of ``--metrics-listen``,
the least any grpc.aio server interceptor must do to give the call series of the metrics:
bench/floor_observer.py, which counts each call by method and status code, times it into the
latency histogram's buckets and counts the bytes of its messages, with plain integers, two
``time.perf_counter`` calls and a ``bisect`` (no prometheus_client, no lock, no message read;
the blob and hit counters are not in it). It is installed as a plugin
(``casframe_server_interceptors``) the way an installed distribution's would be found: the
module and a distribution's metadata naming it as a ``casframe`` entry point, in a folder on the
server's ``PYTHONPATH``; the server writes its counts at exit and the bench checks that it
counted the calls it was sent. floor/plain beside metrics/plain (in ``--instructions`` mode
too) tells how much of what metrics cost is the price of observing a call from an interceptor
at all, whatever the implementation.

Comparing needs bench/load.py (several servers in turn). ``--instructions`` also takes another
load script (``--load``: one taking ``HOST:PORT --requests N --clients C`` and printing one JSON
line with ``requests_per_s``) or, when bench/load.py is absent, the small built-in mix below,
from one asyncio process:

    FindMissingBlobs of 16 digests (half stored)   40%
    BatchReadBlobs of 4 blobs of 4 KiB             30%
    GetActionResult of a stored result             30%
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import py_compile
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from floor_observer import OUT_ENV as FLOOR_OUT_ENV  # noqa: E402

from casframe import Digest, open_store  # noqa: E402
from casframe._protos.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)

BLOBS = 512
BLOB_SIZE = 4 << 10
ACTIONS = 128
_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_AC = "/build.bazel.remote.execution.v2.ActionCache/"


@dataclass(frozen=True)
class Setup:
    """What a server runs with: ``casframe serve`` options and environment variables."""

    options: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


PLAIN = Setup()


def floor_setup(work: Path) -> Setup:
    """The floor observer (bench/floor_observer.py) installed as a plugin: a folder holding the
    module and a distribution's metadata naming it as a ``casframe`` entry point, put on the
    server's ``PYTHONPATH`` (as a plugin installed with pip is found; nothing in casframe is
    changed for it), and a folder where the server leaves its counts at exit."""
    site, counts = work / "floor-site", work / "floor-counts"
    info = site / "casframe_bench_floor-1.0.dist-info"
    info.mkdir(parents=True)
    counts.mkdir()
    # Compiled now: a __pycache__ made by the first server would change the folder, and with it
    # the key of casframe's entry-point cache, between the runs --instructions subtracts.
    py_compile.compile(str(shutil.copy(ROOT / "bench" / "floor_observer.py", site)),
                       doraise=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: casframe-bench-floor\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[casframe]\nbench-floor = floor_observer\n", encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return Setup(env={"PYTHONPATH": path, FLOOR_OUT_ENV: str(counts)})


def check_counted(setup: Setup, pid: int, requests: int) -> int:
    """With the floor observer, the calls server ``pid`` counted, at least ``requests`` (else
    the floor was not installed, and its figures would be a plain server's); else 0."""
    folder = setup.env.get(FLOOR_OUT_ENV)
    if folder is None:
        return 0
    path = Path(folder) / f"floor-{pid}.json"
    if not path.exists():
        raise SystemExit(f"the floor observer did not run in server {pid}: no {path}")
    counted = sum(series["started"] for series in json.loads(path.read_text()).values())
    if counted < requests:
        raise SystemExit(f"the floor observer counted {counted} calls of server {pid}, "
                         f"fewer than the {requests} sent")
    return int(counted)


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
def server(store_url: str, setup: Setup, prefix: tuple[str, ...] = (),
           cpus: set[int] | None = None) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A ``casframe serve`` process set up by ``setup`` (run under ``prefix``, e.g. valgrind; on
    ``cpus`` alone when given); yields its address and the process, and stops it gracefully
    (SIGTERM) at the end."""
    env = {**os.environ, **setup.env, "PYTHONUNBUFFERED": "1"}
    # Compiled once and kept: else every server under valgrind would count compiling too.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    process = subprocess.Popen(
        # One process: the CPU read from /proc is then that of the process serving (by
        # default `casframe serve` starts a worker per core under a supervisor that serves none).
        [*prefix, sys.executable, "-m", "casframe.server", store_url,
         "--listen", "127.0.0.1:0", "--workers", "1", *setup.options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE if prefix else subprocess.DEVNULL,
        text=True, env=env, preexec_fn=pinned(cpus),
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


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """What a child runs before it starts, to run on ``cpus`` alone (all of its threads)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@dataclass
class Run:
    """One counted run: requests per second of the timed calls, the server's CPU
    milliseconds per request during them, and the share of a core the server used."""

    requests_per_s: float
    cpu_ms: float
    busy: float
    system_ms: float = math.nan  # the kernel's share of cpu_ms
    bursts: list[tuple[float, float]] = dataclasses.field(default_factory=list)


def one_run(args: argparse.Namespace, store_url: str, setup: Setup, load: Path | None,
            filled: tuple[list[Digest], list[Digest]], requests: int | None = None) -> Run:
    """A new server, the load against it, the server stopped. CPU per request is the figure a
    busy machine disturbs least: other processes' load slows the run, not the work per call."""
    requests = requests or args.requests
    with server(store_url, setup, cpus=args.server_cpus) as (target, process):
        before, started = cpu_seconds(process.pid), time.perf_counter()
        rate, timed_cpu, busy = run_load(args, target, load, filled, process.pid, requests)
        if timed_cpu is None:  # a load that does not read the server's CPU itself
            spent = cpu_seconds(process.pid) - before
            timed_cpu = spent * 1000 / requests
            busy = spent / (time.perf_counter() - started)
    check_counted(setup, process.pid, requests)
    return Run(rate, timed_cpu, busy)


def run_load(args: argparse.Namespace, target: str, load: Path | None,
             filled: tuple[list[Digest], list[Digest]], pid: int | None = None,
             requests: int | None = None) -> tuple[float, float | None, float]:
    """Requests per second; the server's CPU milliseconds per request during the timed calls
    and the share of a core it used then, when the load reads them (``--server-pids``, as
    bench/load.py does; else None and NaN)."""
    requests = requests or args.requests
    if load is None:
        rate = asyncio.run(builtin_load(target, requests, args.clients, *filled))
        return rate, None, math.nan
    command = [sys.executable, str(load), target, "--requests", str(requests),
               "--clients", str(args.clients), "--deadline", "900"]
    if load.name == "load.py":
        command += ["--warmup", str(args.warmup)]
        if pid is not None:
            command += ["--server-pids", str(pid)]
    result = load_result(command, args.load_cpus)
    timed_cpu = result.get("server_cpu_ms_per_request")
    if timed_cpu is None:
        return float(result["requests_per_s"]), None, math.nan
    busy = sum(result["server_cpu_s"].values()) / result["seconds"]
    return float(result["requests_per_s"]), float(timed_cpu), busy


def server_instructions(args: argparse.Namespace, store_url: str, setup: Setup,
                        load: Path | None, filled: tuple[list[Digest], list[Digest]],
                        requests: int) -> int:
    """Instructions of a whole ``casframe serve`` run answering ``requests`` requests."""
    prefix = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
    with server(store_url, setup, prefix) as (target, process):
        run_load(args, target, load, filled, requests=requests)
        process.terminate()
        _, errors = process.communicate()
    check_counted(setup, process.pid, requests)
    collected = [line for line in errors.splitlines() if "Collected" in line]
    if not collected:
        raise SystemExit("valgrind did not report the server's instructions")
    return int(collected[-1].split()[-1])


def instructions(args: argparse.Namespace, store_url: str, setup: Setup,
                 load: Path | None, filled: tuple[list[Digest], list[Digest]]) -> None:
    """Print the server's instructions per request, plain and observed (``--instructions``)."""
    small = args.requests
    per_request = {}
    for kind, kind_setup in (("plain", PLAIN), (args.observe, setup)):
        counts = [server_instructions(args, store_url, kind_setup, load, filled, n)
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
    args = parse_args()
    load = args.load
    if load is None and (ROOT / "bench" / "load.py").exists():
        load = ROOT / "bench" / "load.py"

    with tempfile.TemporaryDirectory(prefix="casframe-metrics-bench-") as work:
        store_url = f"file://{work}/store"
        filled = fill(store_url)
        metrics = ("--metrics-listen", "127.0.0.1:0")
        access_log = ("--access-log", f"{work}/access.log")
        setups = {"metrics": Setup(metrics), "access-log": Setup(access_log),
                  "both": Setup(metrics + access_log), "nothing": PLAIN}
        setup = floor_setup(Path(work)) if args.observe == "floor" else setups[args.observe]
        # Not counted: the load stores what it reads, and its Writes' blobs (the same ones in
        # every run of as many requests or fewer), so that each counted run does the same work.
        most = args.requests * (3 if args.instructions else 1)
        one_run(args, store_url, PLAIN, load, filled, most)
        if args.instructions:
            one_run(args, store_url, setup, load, filled)  # compiles what metrics import
            instructions(args, store_url, setup, load, filled)
        else:
            compare(args, store_url, setup, load, filled)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of 2,000 requests (a smoke run: resolves less)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of three new servers: plain, plain again, observed "
                             "(default 12; best a multiple of 3)")
    parser.add_argument("--burst", type=int, default=500,
                        help="requests a server answers before the next one's turn")
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests a run (default 6,000; 300 with --instructions)")
    parser.add_argument("--warmup", type=int, default=1000,
                        help="requests before the timed ones of each run, not counted")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--observe",
                        choices=["both", "metrics", "access-log", "floor", "nothing"],
                        default="both", help="what the observed runs turn on (default: both; "
                        "floor: the least an interceptor counting calls does, "
                        "bench/floor_observer.py; nothing: three plain servers, what the "
                        "bench reads when none differs)")
    parser.add_argument("--load", type=Path, default=None,
                        help="a load script (default: bench/load.py if present, else built in)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the scheduler place server and load on any core")
    parser.add_argument("--instructions", action="store_true",
                        help="count the server's instructions a request with callgrind")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 300 if args.instructions else 6000
    if args.quick:
        args.requests = 100 if args.instructions else 2000
        args.warmup = min(args.warmup, 500)
    args.rounds = args.rounds or (3 if args.quick else 12)
    cores = sorted(os.sched_getaffinity(0))
    args.load_cpus = args.server_cpus = None
    if not args.no_pin and len(cores) >= 2:
        # The server on a core of its own, the load on another: else the scheduler may put
        # them on one core in one run and on two in the next.
        args.server_cpus, args.load_cpus = {cores[-1]}, {cores[0]}
    return args


KINDS = ("plain", "control", "observed")


def compare(args: argparse.Namespace, store_url: str, setup: Setup, load: Path | None,
            filled: tuple[list[Digest], list[Digest]]) -> None:
    """Rounds of three new servers answering the same load in turn (bench/load.py's bursts):
    plain, plain again (``control``: its ratio to plain shows the noise) and observed; the
    ratios of each round, and their medians with their spread."""
    if load is None or load.name != "load.py":
        raise SystemExit("comparing needs bench/load.py (several servers in turn)")
    print(f"{args.rounds} rounds of {args.requests:,} requests a server in bursts of "
          f"{args.burst:,}, after {args.warmup:,} not counted, {args.clients} clients; servers "
          f"on cores {args.server_cpus or 'any'}, load on {args.load_cpus or 'any'}; load "
          f"average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[Run]] = {kind: [] for kind in KINDS}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        with contextlib.ExitStack() as stack:
            # Started, and named to the load, in an order that changes from round to round, so
            # that each kind takes each place in turn (rounds in threes): one run of three
            # servers found plain 2% ahead of control in 9 rounds of 10 with plain named
            # first, another with a third plain one in its place did not.
            order = [KINDS[(round_ + i) % 3] for i in range(3)]
            started = {kind: stack.enter_context(server(
                store_url, setup if kind == "observed" else PLAIN, cpus=args.server_cpus))
                for kind in order}
            result = alternate_load(args, load, [started[kind] for kind in order])
        check_counted(setup, started["observed"][1].pid, args.requests)
        for kind, target in zip(order, result["targets"], strict=True):
            runs[kind].append(Run(target["requests_per_s"], target["server_cpu_ms_per_request"],
                                  target["server_busy"], target["server_system_ms_per_request"],
                                  target["bursts"]))
        loads.append(os.getloadavg()[0])
        seen = {kind: runs[kind][-1] for kind in runs}
        print(f"round {round_ + 1} ({', '.join(order)}): " + "; ".join(
            f"{kind} {run.requests_per_s:,.0f}/s {run.cpu_ms:.3f} ms ({run.system_ms:.3f} "
            f"system) {run.busy:.2f} busy" for kind, run in seen.items()) + " | observed/plain "
            f"{seen['observed'].requests_per_s / seen['plain'].requests_per_s:.3f}, control/"
            f"plain {seen['control'].requests_per_s / seen['plain'].requests_per_s:.3f}",
            flush=True)
    summary = summarize(args, load, runs, loads)
    summary["orders"] = [[KINDS[(round_ + i) % 3] for i in range(3)]
                         for round_ in range(args.rounds)]
    print(json.dumps(summary))


def alternate_load(args: argparse.Namespace, load: Path,
                   servers: list[tuple[str, subprocess.Popen[str]]]) -> dict[str, Any]:
    """bench/load.py against ``servers`` in turn; its JSON answer."""
    command = [sys.executable, str(load), ",".join(target for target, _ in servers),
               "--server-pids", ",".join(str(process.pid) for _, process in servers),
               "--requests", str(args.requests), "--clients", str(args.clients),
               "--burst", str(args.burst), "--warmup", str(args.warmup), "--deadline", "900"]
    return load_result(command, args.load_cpus)


def load_result(command: list[str], cpus: set[int] | None) -> dict[str, Any]:
    """The JSON answer of the load ``command`` (run on ``cpus``); its own words if it failed."""
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=pinned(cpus))
    if done.returncode:
        raise SystemExit(f"the load failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result.get("errors"):
        raise SystemExit(f"the load saw errors: {result['errors']}")
    return result


def summarize(args: argparse.Namespace, load: Path, runs: dict[str, list[Run]],
              loads: list[float]) -> dict[str, Any]:
    """The figures of :func:`compare`, printed as they are found."""
    summary: dict[str, Any] = {
        "load": str(load), "observed": args.observe, "rounds": args.rounds,
        "requests": args.requests, "burst": args.burst, "warmup": args.warmup,
        "clients": args.clients, "server_cpus": sorted(args.server_cpus or []),
        "load_cpus": sorted(args.load_cpus or []),
        "runs": {kind: [dataclasses.astuple(run) for run in kind_runs]
                 for kind, kind_runs in runs.items()},
        "load_average": {"min": min(loads), "max": max(loads)},
    }
    for name, field in (("requests_per_s", "requests_per_s"), ("cpu_per_request", "cpu_ms"),
                        ("system_cpu_per_request", "system_ms")):
        for kind in ("observed", "control"):
            ratios = [getattr(seen, field) / getattr(plain, field)
                      for seen, plain in zip(runs[kind], runs["plain"], strict=True)]
            summary[f"{kind}_{name}"] = spread(ratios)
            print(f"{name} {kind}/plain: {describe(summary[f'{kind}_{name}'])}", flush=True)
    figure, control = summary["observed_requests_per_s"], summary["control_requests_per_s"]
    summary["target"] = 0.95
    summary["met"] = figure["median"] >= 0.95
    # The measurement tells 5% apart when plain against plain stays within 2.5% of 1, and
    # decides when, besides, the figure's interval does not straddle the target.
    summary["resolves_5_percent"] = control["ci95"][0] >= 0.975 and control["ci95"][1] <= 1.025
    summary["decided"] = summary["resolves_5_percent"] and (
        figure["ci95"][0] >= 0.95 or figure["ci95"][1] < 0.95)
    shared = sum(1 for round_runs in zip(*runs.values(), strict=True)
                 if min(run.busy for run in round_runs) < 0.95)
    summary["rounds_with_core_shared"] = shared
    if shared:
        print(f"{shared} of {len(runs['plain'])} rounds had a server busy less than 0.95 of "
              "its core: other work ran there, the figures are not a quiet machine's",
              flush=True)
    print(f"observed/plain {figure['median']:.3f} (target >= 0.95: "
          f"{'met' if summary['met'] else 'missed'}); control/plain {control['median']:.3f}; "
          f"resolves 5%: {summary['resolves_5_percent']}, decided: {summary['decided']}; load "
          f"average {min(loads):.2f}-{max(loads):.2f}", flush=True)
    return summary


def spread(ratios: list[float]) -> dict[str, Any]:
    """The median of per-round ratios, their quartiles and extremes, and a bootstrap 95%
    interval of the median (fixed seed: the same ratios give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                     for _ in range(2000))
    quartiles = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                 else [ratios[0]] * 3)
    return {"median": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]],
            "range": [min(ratios), max(ratios)], "ci95": [medians[50], medians[1949]],
            "ratios": ratios}


def describe(figure: dict[str, Any]) -> str:
    return (f"median {figure['median']:.3f}, 95% interval {figure['ci95'][0]:.3f}-"
            f"{figure['ci95'][1]:.3f}, quartiles {figure['quartiles'][0]:.3f}-"
            f"{figure['quartiles'][1]:.3f}, range {figure['range'][0]:.3f}-"
            f"{figure['range'][1]:.3f}")


if __name__ == "__main__":
    main()
