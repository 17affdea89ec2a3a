"""`casframe serve` under many clients: --workers 2 against --workers 1, and against BuildGrid.

    .venv/bin/python bench/serve_bench.py [--quick] [--repeat N] [--out DIR]
                                          [--kinds w1,w2,buildgrid] [--requests N] [--clients N]

Each repetition runs every kind in turn (A B C A B C ..., so that all suffer alike from what
else the machine does), each a new server over a new store in a new directory:

* w1: `casframe serve file://… --workers 1`;  w2: the same with `--workers 2`;
* buildgrid: BuildGrid 0.9.1's `bgd server` (CAS, ByteStream, ActionCache over a
  `!disk-storage` and an `!lru-action-cache`, 128 threads, up to 1,000 calls at once), from
  the virtualenv `scripts/test-prereqs` makes (`$CASFRAME_PREREQS/buildgrid`,
  `~/.cache/casframe-prereqs/buildgrid` by default, or `CASFRAME_BUILDGRID_VENV`).

Against each, bench/load.py (a process of its own) stores its data, then makes the mixed load
(--requests calls from --clients concurrent clients, each on its own connection; see its
docstring) and reports requests/s, p50/p99 latency and its own CPU seconds. Before each server
is stopped, the peak RSS (VmHWM) of every process serving is read from /proc (for w2, each
worker; the supervisor is reported apart).

Targets (issue: a server on every core): w2 >= 1.5x the requests/s of w1 at no worse p99, the
ratio taken within each repetition and its median reported; casframe >= 2x BuildGrid's
requests/s; peak RSS per worker < 150 MiB. The load averages at the start, after each round and
at the end are printed with the table: on a loaded 2-core machine the load generator competes
with the server, so its CPU share is reported too, with the CPU milliseconds per request of
the serving processes (read from /proc) and of the generator, the cores all of them used, how
the connections spread over w2's workers, and what the CPU per request allows w2 at most.
--quick: 3,000 requests, one repetition.
Results go to DIR/<time>-serve/results.json and summary.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KINDS = ("w1", "w2", "buildgrid")
T_WORKERS_RATIO = 1.5
T_BUILDGRID_RATIO = 2.0
T_RSS_MIB = 150.0
START_TIMEOUT = 120.0  # a hang guard for a server to start

# BuildGrid's gRPC server refuses calls beyond its thread pool ("Concurrent RPC limit
# exceeded!"): both are raised so that it answers every client of the load, as casframe does.
BUILDGRID_CONFIG = """\
thread-pool-size: 128
maximum-concurrent-rpcs: 1000
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
storages:
  - !disk-storage &cas
    path: {path}
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
instances:
  - name: ""
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
      - !action-cache
        cache: *ac
"""


def buildgrid_venv() -> Path:
    override = os.environ.get("CASFRAME_BUILDGRID_VENV")
    if override:
        return Path(override)
    prereqs = Path(os.environ.get("CASFRAME_PREREQS",
                                  Path.home() / ".cache" / "casframe-prereqs"))
    return prereqs / "buildgrid"


def proc_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:
        return []


def proc_hwm_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}, see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"server did not listen in {START_TIMEOUT:g} s, see {log}")


@contextlib.contextmanager
def server(kind: str, work: Path, log: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A new server of ``kind`` over a new store in ``work``: its port and process."""
    work.mkdir(parents=True)
    with open(log, "ab") as errors:
        if kind == "buildgrid":
            port = free_port()
            config = work / "bgd.yml"
            config.write_text(BUILDGRID_CONFIG.format(port=port, path=work / "cas"))
            (work / "cas").mkdir()
            process = subprocess.Popen(
                [str(buildgrid_venv() / "bin" / "bgd"), "server", "start", str(config)],
                cwd=work, stdout=errors, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_for_port(process, port, log)
        else:
            workers = kind.removeprefix("w")
            process = subprocess.Popen(
                [sys.executable, "-m", "casframe.server", f"file://{work / 'store'}",
                 "--listen", "127.0.0.1:0", "--workers", workers, "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=errors)
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"casframe serve did not start, see {log}")
            port = int(line.strip().rpartition(":")[2])
    try:
        yield port, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serving_pids(kind: str, process: subprocess.Popen[bytes]) -> list[int]:
    """The processes that serve calls: w2's workers, else the server and any children."""
    children = proc_children(process.pid)
    if kind == "w2":
        return children
    return [process.pid, *children]


def one_round(kind: str, work: Path, log: Path, requests: int, clients: int) -> dict[str, Any]:
    with server(kind, work, log) as (port, process):
        pids = serving_pids(kind, process)
        with open(log, "ab") as errors:
            done = subprocess.run(
                [sys.executable, str(HERE / "load.py"), f"127.0.0.1:{port}",
                 "--requests", str(requests), "--clients", str(clients),
                 "--server-pids", ",".join(map(str, pids))],
                stdout=subprocess.PIPE, stderr=errors, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the load generator failed against {kind}, see {log}")
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        result["rss_mib"] = {pid: proc_hwm_mib(pid) for pid in pids}
        if kind == "w2":
            result["supervisor_rss_mib"] = proc_hwm_mib(process.pid)
    return result


def _ceilings(rounds: dict[str, list[dict[str, Any]]], cores: int) -> list[str]:
    """What the CPU per request allows: the load generator shares the cores with the servers,
    so --workers 2 can be at most cores / (server + generator CPU per request) requests/s;
    and CPU per request, unlike requests/s, means the same on a busy machine."""
    def median(kind: str, key: str) -> float | None:
        values = [r[key] for r in rounds.get(kind, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    lines = []
    w1, w2 = median("w1", "requests_per_s"), median("w2", "requests_per_s")
    server2, client2 = median("w2", "server_cpu_ms_per_request"), median(
        "w2", "client_cpu_ms_per_request")
    if w1 and server2 and client2:
        most = cores / (server2 + client2) * 1e3
        lines.append(
            f"the most --workers 2 can answer with this generator on {cores} cores: "
            f"{most:,.0f} requests/s = x{most / w1:.2f} --workers 1's (server {server2:.2f} + "
            f"generator {client2:.2f} ms of CPU per request); measured x"
            f"{(w2 or 0) / w1:.2f}")
    ours, theirs = median("w1", "server_cpu_ms_per_request"), median(
        "buildgrid", "server_cpu_ms_per_request")
    if ours and theirs:
        lines.append(f"server CPU per request, BuildGrid / casframe --workers 1: x"
                     f"{theirs / ours:.2f} (requests per CPU second, load-independent)")
    return lines


def summarise(rounds: dict[str, list[dict[str, Any]]], load: dict[str, Any],
              spec: dict[str, Any]) -> str:
    cores = os.cpu_count() or 1

    def median(kind: str, key: str) -> float | None:
        values = [r[key] for r in rounds.get(kind, [])]
        return statistics.median(values) if values else None

    def show(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    lines = [
        f"load average (1 min): start {load['start'][0]:.2f}, rounds "
        + ", ".join(f"{a[0]:.1f}" for a in load["rounds"])
        + f", end {load['end'][0]:.2f}; {cores} cores",
        f"medians of {spec['repeat']} alternating runs of {spec['requests']:,} requests from "
        f"{spec['clients']} clients (bench/load.py's mix)", "",
    ]
    header = (f"{'server':<11}{'requests/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
              f"{'server CPU ms/req':>19}{'load CPU ms/req':>17}{'cores used':>12}"
              f"{'load CPU %':>11}{'peak RSS/process MiB':>23}")
    lines += [header, "-" * len(header)]
    for kind in KINDS:
        if not rounds.get(kind):
            continue
        share = statistics.median(r["client_cpu_s"] / (r["seconds"] * cores) * 100
                                  for r in rounds[kind])
        used = statistics.median((r["client_cpu_s"] + sum(r["server_cpu_s"].values()))
                                 / r["seconds"] for r in rounds[kind])
        rss = max(max(r["rss_mib"].values(), default=0.0) for r in rounds[kind])
        errors = sum(sum(r["errors"].values()) for r in rounds[kind])
        lines.append(
            f"{kind:<11}{show(median(kind, 'requests_per_s')):>12}"
            f"{show(median(kind, 'p50_ms'), '.1f'):>9}{show(median(kind, 'p99_ms'), '.1f'):>9}"
            f"{errors:>8}{show(median(kind, 'server_cpu_ms_per_request'), '.2f'):>19}"
            f"{show(median(kind, 'client_cpu_ms_per_request'), '.2f'):>17}{used:>12.2f}"
            f"{share:>10.0f}%{rss:>23.0f}")
    lines.append("")
    for r in rounds.get("w2", []):
        if r.get("connections"):
            counts = sorted(r["connections"].values(), reverse=True)
            lines.append(f"w2: the {sum(counts)} connections over the workers (SO_REUSEPORT): "
                         + " + ".join(map(str, counts)))
    lines += _ceilings(rounds, cores)
    lines.append("")

    def paired(a: str, b: str, key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(rounds.get(a, []), rounds.get(b, []),
                                                    strict=False)]

    if rounds.get("w1") and rounds.get("w2"):
        ratios, p99 = paired("w2", "w1", "requests_per_s"), paired("w2", "w1", "p99_ms")
        ok = statistics.median(ratios) >= T_WORKERS_RATIO and statistics.median(p99) <= 1.0
        lines.append(
            f"--workers 2 / --workers 1: requests/s x{statistics.median(ratios):.2f} "
            f"(each run: {', '.join(f'{r:.2f}' for r in ratios)}), p99 "
            f"x{statistics.median(p99):.2f}; target >= {T_WORKERS_RATIO} at no worse p99: "
            f"{'yes' if ok else 'NO'}")
    for ours in ("w2", "w1"):
        if rounds.get(ours) and rounds.get("buildgrid"):
            ratios = paired(ours, "buildgrid", "requests_per_s")
            ok = statistics.median(ratios) >= T_BUILDGRID_RATIO
            lines.append(
                f"casframe {ours} / BuildGrid: requests/s x{statistics.median(ratios):.2f} "
                f"(each run: {', '.join(f'{r:.2f}' for r in ratios)}); target >= "
                f"{T_BUILDGRID_RATIO}: {'yes' if ok else 'NO'}")
    for kind in ("w1", "w2"):
        if rounds.get(kind):
            worst = max(max(r["rss_mib"].values(), default=0.0) for r in rounds[kind])
            lines.append(f"peak RSS per worker ({kind}): {worst:.0f} MiB (target < "
                         f"{T_RSS_MIB:.0f}) {'yes' if worst < T_RSS_MIB else 'NO'}")
    if rounds.get("w2"):
        supervisor = max(r["supervisor_rss_mib"] for r in rounds["w2"])
        lines.append(f"w2's supervisor process (serves nothing): {supervisor:.0f} MiB")
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    if "buildgrid" in kinds and not (buildgrid_venv() / "bin" / "bgd").exists():
        parser.error(f"no BuildGrid at {buildgrid_venv()}: run scripts/test-prereqs, or "
                     "leave it out with --kinds w1,w2")
    spec = {"repeat": args.repeat or (1 if args.quick else 3),
            "requests": args.requests or (3_000 if args.quick else 20_000),
            "clients": args.clients}
    run_dir = args.out / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-serve")
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    print(f"run directory: {run_dir}", flush=True)
    load: dict[str, Any] = {"start": os.getloadavg(), "rounds": []}
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    try:
        for index in range(spec["repeat"]):
            for kind in kinds:
                result = one_round(kind, run_dir / f"{kind}{index}", log, spec["requests"],
                                   spec["clients"])
                rounds[kind].append(result)
                load["rounds"].append(os.getloadavg())
                print(f"  [{index + 1}/{spec['repeat']}] {kind:<9} "
                      f"{result['requests_per_s']:,.0f} requests/s, p50 {result['p50_ms']:.1f} "
                      f"ms, p99 {result['p99_ms']:.1f} ms, errors {sum(result['errors'].values())}"
                      f", load CPU {result['client_cpu_s']:.1f} s", flush=True)
    finally:
        load["end"] = os.getloadavg()
        (run_dir / "results.json").write_text(json.dumps(
            {"spec": spec, "rounds": rounds, "load": load}, indent=2))
    (run_dir / "summary.txt").write_text(summarise(rounds, load, spec))
    for kind in kinds:
        for index in range(spec["repeat"]):
            shutil.rmtree(run_dir / f"{kind}{index}", ignore_errors=True)


if __name__ == "__main__":
    main()
