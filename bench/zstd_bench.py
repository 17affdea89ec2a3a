"""Benchmark of zstd on the wire: pushing build outputs over grpc:// with and without it.

    .venv/bin/python bench/zstd_bench.py [--quick] [--size MIB] [--repeat N] [--out DIR] [--keep]

Gathers a tree of real build outputs from this machine, in sorted order so that every run
takes the same files: static libraries (archives of object files, ``*.a`` under
/usr/lib/x86_64-linux-gnu) for two thirds of ``--size`` (default 96 MiB), C headers
(/usr/include) and Python sources (the standard library) for the rest. It is imported into a
source file:// store (not timed). Each repetition then pushes the tree to a new
``casframe serve`` process over a new file:// store, once through ``grpc://`` and once through
``grpc://…?compression=zstd``, alternating which goes first (A B, B A, …) so that both meet
the same load; before each push the source store is read once (untimed), so that both read it
from memory. The client runs in this process.

Reported per push: wall time, CPU seconds of the client (this process) and of the server (from
just before the push to its end, so its start-up is not counted), and the blob bytes sent (the
backend's ``wire`` counters: blob content, or its zstd form, as it goes into messages; gRPC's
framing is the same for both and not counted). Targets: the compressed push sends at most 40%
of the bytes of the plain one, at a speed of at least 0.8 times (its wall time at most 1.25
times). Beside the verdict it prints the ratio of the CPU seconds (client plus server,
medians), which the machine's load moves far less than the wall times: on two cores shared by
client and server, it is what bounds the speed ratio on an idle machine. ``--quick`` is a
smaller run (32 MiB, 2 pairs), noisier than the default one. ``--compare-threads`` adds a
third push to each repetition (the three in turn, each first in a third of them): compressed,
but with the client's compressing threads on (one a core, at most 4: each piece handed to
them as it is cut, instead of compressed in the thread that cuts it, the default), and prints
its ratios too. Results go to DIR/<time>-zstd/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from grpc_bench import Served, casframe_server  # noqa: E402 - a server process, measured

MiB = 1 << 20
# Where the build outputs come from, and the share of the tree each gives.
_SOURCES = (
    ("objects", Path("/usr/lib/x86_64-linux-gnu"), ("*.a",), 2 / 3),
    ("headers", Path("/usr/include"), ("*.h",), 1 / 6),
    ("python", Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}."
     f"{sys.version_info[1]}", ("*.py",), 1 / 6),
)
_BYTES_TARGET = 0.40
_SPEED_TARGET = 0.8


def gather(tree: Path, size: int) -> dict[str, Any]:
    """Copy build outputs into ``tree``, each kind up to its share of ``size`` bytes."""
    kinds: dict[str, Any] = {}
    for kind, root, patterns, share in _SOURCES:
        budget = int(size * share)
        files = total = 0
        found = sorted(p for pattern in patterns for p in root.rglob(pattern)
                       if p.is_file() and not p.is_symlink())
        for path in found:
            length = path.stat().st_size
            if total + length > budget or not length:
                continue
            target = tree / kind / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            files += 1
            total += length
        kinds[kind] = {"from": str(root), "files": files, "bytes": total}
    return kinds


def warm(folder: Path) -> None:
    """Read every file under ``folder`` once: this machine evicts page cache left untouched for
    about a minute, which made whichever push of a pair came first the slower one."""
    buffer = bytearray(1 << 20)
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def user_system_s(pid: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of this process (all its threads), or of process ``pid``."""
    if pid is None:
        times = os.times()
        return times.user, times.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def push(source: Any, root: Any, work: Path, name: str, query: str, log: Path) -> dict[str, Any]:
    import casframe_grpc._compression as client_compression

    from casframe import open_store

    threads = client_compression.COMPRESS_THREADS
    if name.startswith("server-threads"):
        client_compression.COMPRESS_THREADS = max(1, min(4, os.cpu_count() or 1))
    served = Served(casframe_server(work / name), log)
    try:
        os.sync()  # untimed: earlier pushes' dirty pages are not written during this one
        warm(work / "source")  # untimed: both pushes read the source from memory
        server_before = user_system_s(served.process.pid)  # its start-up is not the push's
        started = time.perf_counter()
        client_before = user_system_s()
        with open_store(f"grpc://127.0.0.1:{served.port}{query}") as dest:
            result = source.push(dest, root)
            wire = dest.blobs.wire
            seconds = time.perf_counter() - started
            client = [after - before for after, before in zip(user_system_s(), client_before,
                                                              strict=True)]
        server = [after - before for after, before in zip(user_system_s(served.process.pid),
                                                          server_before, strict=True)]
    finally:
        client_compression.COMPRESS_THREADS = threads
        served.stop()
    return {"seconds": seconds, "content_bytes": wire.content_sent, "wire_bytes": wire.wire_sent,
            "blobs_sent": result.blobs_sent, "client_cpu_s": sum(client),
            "server_cpu_s": sum(server), "client_user_s": client[0], "client_system_s": client[1],
            "server_user_s": server[0], "server_system_s": server[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=None, help="tree size in MiB (default 96)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="pairs of pushes (default 6; each mode goes first in half)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run: 32 MiB and 2 pairs unless given")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--keep", action="store_true", help="keep the tree and the stores")
    parser.add_argument("--compare-threads", action="store_true",
                        help="also push compressed with the client's compressing threads on")
    args = parser.parse_args()
    args.size = args.size or (32 if args.quick else 96)
    args.repeat = args.repeat or (2 if args.quick else 6)

    from casframe import open_store

    run_dir = args.out / f"{dt.datetime.now():%Y%m%d-%H%M%S}-zstd"
    work = run_dir / "work"
    work.mkdir(parents=True)
    log = run_dir / "servers.log"
    kinds = gather(work / "tree", args.size * MiB)
    load_before = os.getloadavg()
    print("tree:", ", ".join(f"{k} {v['files']} files {v['bytes'] / MiB:.1f} MiB"
                             for k, v in kinds.items()), flush=True)
    order = [("plain", ""), ("zstd", "?compression=zstd")]
    if args.compare_threads:
        order.append(("threads", "?compression=zstd"))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in order}
    try:
        with open_store(f"file://{work / 'source'}") as source:
            root = source.import_directory(work / "tree")
            for rep in range(args.repeat):
                # Each mode goes first in turn (two modes: A B, B A, ...).
                turn = rep % len(order)
                ordered = order[turn:] + order[:turn] if len(order) > 2 else (
                    order if rep % 2 == 0 else order[::-1])
                for mode, query in ordered:
                    outcome = push(source, root, work, f"server-{mode}-{rep}", query, log)
                    runs[mode].append(outcome)
                    print(f"{rep} {mode:5} {outcome['seconds']:6.2f} s  "
                          f"{outcome['wire_bytes'] / MiB:7.1f} MiB sent of "
                          f"{outcome['content_bytes'] / MiB:.1f} MiB  "
                          f"CPU (user+system) client {outcome['client_user_s']:.2f}+"
                          f"{outcome['client_system_s']:.2f} s, server "
                          f"{outcome['server_user_s']:.2f}+{outcome['server_system_s']:.2f} s",
                          flush=True)
    finally:
        load = os.getloadavg()
        if not args.keep:
            shutil.rmtree(work)

    def median(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode])

    bytes_ratio = median("zstd", "wire_bytes") / median("plain", "wire_bytes")
    # Speed of the compressed push relative to the plain one, pair by pair (same load).
    speed_ratios = [p["seconds"] / z["seconds"] for p, z in zip(runs["plain"], runs["zstd"],
                                                                strict=True)]
    speed_ratio = statistics.median(speed_ratios)
    cpu = {mode: median(mode, "client_cpu_s") + median(mode, "server_cpu_s") for mode in runs}
    cpu_ratio = cpu["zstd"] / cpu["plain"]
    summary = {
        "tree": kinds, "runs": runs, "load_average": load,
        "load_average_before": load_before, "cpu_ratio": cpu_ratio,
        "bytes_ratio": bytes_ratio, "speed_ratio": speed_ratio, "speed_ratios": speed_ratios,
        "targets": {"bytes_ratio_at_most": _BYTES_TARGET, "speed_ratio_at_least": _SPEED_TARGET},
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    for mode in runs:
        print(f"{mode} push: median {median(mode, 'seconds'):.2f} s, CPU client "
              f"{median(mode, 'client_cpu_s'):.2f} s (user {median(mode, 'client_user_s'):.2f}) "
              f"+ server {median(mode, 'server_cpu_s'):.2f} s "
              f"(user {median(mode, 'server_user_s'):.2f})")
    print(f"bytes sent, zstd / plain: {bytes_ratio:.1%} (target <= {_BYTES_TARGET:.0%}) "
          f"{'met' if bytes_ratio <= _BYTES_TARGET else 'MISSED'}")
    print(f"speed, zstd / plain (median of pairs {', '.join(f'{r:.2f}' for r in speed_ratios)}):"
          f" {speed_ratio:.2f}x (target >= {_SPEED_TARGET}x) "
          f"{'met' if speed_ratio >= _SPEED_TARGET else 'MISSED'}")
    sides = {side: median("zstd", f"{side}_cpu_s") / median("plain", f"{side}_cpu_s")
             for side in ("client", "server")}
    summary["cpu_ratio_by_side"] = sides
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    user = {mode: median(mode, "client_user_s") + median(mode, "server_user_s") for mode in runs}
    summary["user_cpu_ratio"] = user["zstd"] / user["plain"]
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"CPU seconds, zstd / plain (client + server, medians): {cpu_ratio:.2f}x "
          f"(client {sides['client']:.2f}x, server {sides['server']:.2f}x); user CPU alone "
          f"{user['zstd'] / user['plain']:.2f}x (the server's system time, mostly creating "
          "files, is what the machine's other work moves most)")
    if args.compare_threads:
        threads = [p["seconds"] / t["seconds"] for p, t in zip(runs["plain"], runs["threads"],
                                                              strict=True)]
        threaded = [z["seconds"] / t["seconds"] for z, t in zip(runs["zstd"], runs["threads"],
                                                               strict=True)]
        summary["threads_speed_ratio"] = statistics.median(threads)
        summary["threads_over_inline_speed_ratio"] = statistics.median(threaded)
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
        print(f"with compressing threads: speed, zstd / plain (pairs "
              f"{', '.join(f'{r:.2f}' for r in threads)}): {statistics.median(threads):.2f}x; "
              f"CPU {cpu['threads'] / cpu['plain']:.2f}x (user "
              f"{user['threads'] / user['plain']:.2f}x); with threads / without: speed "
              f"{statistics.median(threaded):.2f}x")
    print(f"load average at the start: {load_before[0]:.1f} {load_before[1]:.1f} "
          f"{load_before[2]:.1f}; at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"results in {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
