"""Benchmark: prune of a file:// store with 100,000 objects (10% unreachable), beside git.

Builds, in a new directory per run, a casframe store and a git repository holding comparable
content: the same small blobs, 90% of them reachable through Directory trees (git: trees and
commits) from 10 refs (git: branches), 10% loose garbage; git's objects all loose. Then it
copies each as many times as there are runs, before anything is deleted, because mass deletes
slow file creation on this machine for minutes (bench/BENCHMARKING.md). Runs alternate between
casframe and git (A B, B A, ...), each destructive command on its own copy, each copy warmed by
a stat walk right before its timed command.

Measured (medians): casframe prune (in its own process; time inside prune() and the whole
process, and its phases: listing, marking, deleting), casframe prune --dry-run,
``git count-objects -v``, ``git prune --expire=now`` and its dry run ``-n``; optionally
``git gc --prune=now``. The target is 100,000 objects scanned per
second by casframe prune (listing and marking; deleting runs at the file system's unlink rate,
which ``git prune`` meets too).

    .venv/bin/python bench/prune_bench.py [--objects 100000] [--runs 3] [--git-gc] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from casframe import Digest, open_store
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
)

REFS = 10
FILES_PER_DIR = 100
ROOT_FILES = 10

CASFRAME_PRUNE = r"""
import json, sys, time
from casframe import Progress, open_store


class Phases(Progress):
    # Progress phases double as a profile: scan (listing), mark, delete.
    def __init__(self):
        self.seconds, self.current = {}, None
    def start(self, task, total=None, unit="files"):
        self.current = (task, time.perf_counter())
    def finish(self):
        task, started = self.current
        self.seconds[task] = self.seconds.get(task, 0) + time.perf_counter() - started

store = open_store(sys.argv[1])
phases = Phases()
started = time.perf_counter()
report = store.prune(grace_period=0, dry_run=sys.argv[2] == "dry", progress=phases)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "scanned": report.objects_scanned,
                  "freed": report.objects_freed, "phases": phases.seconds}))
"""


def _blobs(rng: random.Random, count: int, tag: str) -> list[bytes]:
    # 64–1024 bytes, unique: small objects make this a test of per-object cost, as in git.
    return [rng.randbytes(rng.randint(64, 1024)) + f"{tag}{i}".encode() for i in range(count)]


def _plan(total: int, unreachable_fraction: float) -> tuple[int, int]:
    """(subdirectories per ref, unreachable blobs) for about ``total`` objects."""
    garbage = int(total * unreachable_fraction)
    per_ref = (total - garbage) // REFS  # = 1 root + ROOT_FILES + subdirs × (1 + FILES_PER_DIR)
    subdirs = max(1, (per_ref - 1 - ROOT_FILES) // (1 + FILES_PER_DIR))
    return subdirs, garbage


def build_casframe(path: Path, trees: list[list[list[bytes]]], garbage: list[bytes],
                   root_files: list[list[bytes]]) -> int:
    store = open_store(f"file://{path}")
    objects = 0
    for ref_index, subdirs in enumerate(trees):
        root = Directory()
        for d_index, files in enumerate(subdirs):
            pairs = [(Digest.of_bytes(data), data) for data in files]
            store.put_many(pairs)
            sub = Directory()  # names f000, f001, ... are already in canonical order
            sub.files.extend(
                FileNode(name=f"f{i:03d}", digest=d.to_proto()) for i, (d, _) in enumerate(pairs)
            )
            sub_digest = store.put_directory(sub)
            root.directories.append(DirectoryNode(name=f"d{d_index:03d}",
                                                  digest=sub_digest.to_proto()))
            objects += len(pairs) + 1
        pairs = [(Digest.of_bytes(data), data) for data in root_files[ref_index]]
        store.put_many(pairs)
        root.files.extend(FileNode(name=f"r{i:02d}", digest=d.to_proto())
                          for i, (d, _) in enumerate(pairs))
        store.set_ref(f"bench/{ref_index}", store.put_directory(root))
        objects += len(pairs) + 1
    store.put_many([(Digest.of_bytes(data), data) for data in garbage])
    objects += len(garbage)
    store.close()
    return objects


def build_git(path: Path, trees: list[list[list[bytes]]], garbage: list[bytes],
              root_files: list[list[bytes]]) -> int:
    """A repository with every object loose: fast-import into a pack, then unpack it."""
    staging = path.with_name(path.name + "-pack")
    for repo in (staging, path):
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
    stream = bytearray()
    mark = 0

    def blob(data: bytes) -> int:
        nonlocal mark
        mark += 1
        stream.extend(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
        stream.extend(data)
        stream.extend(b"\n")
        return mark

    for ref_index, subdirs in enumerate(trees):
        changes = []
        for d_index, files in enumerate(subdirs):
            changes += [(blob(data), f"d{d_index:03d}/f{i:03d}") for i, data in enumerate(files)]
        changes += [(blob(data), f"r{i:02d}") for i, data in enumerate(root_files[ref_index])]
        mark += 1
        stream.extend(b"commit refs/heads/bench%d\nmark :%d\n" % (ref_index, mark))
        stream.extend(b"committer Bench <bench@example.com> 0 +0000\ndata 0\n")
        for blob_mark, name in changes:
            stream.extend(b"M 100644 :%d %s\n" % (blob_mark, name.encode()))
        stream.extend(b"\n")
    for data in garbage:
        blob(data)
    subprocess.run(["git", "-C", str(staging), "fast-import", "--quiet"], input=bytes(stream),
                   check=True)
    pack = next((staging / ".git" / "objects" / "pack").glob("*.pack"))
    with open(pack, "rb") as f:
        subprocess.run(["git", "-C", str(path), "unpack-objects", "-q"], stdin=f, check=True)
    refs = subprocess.run(["git", "-C", str(staging), "for-each-ref",
                           "--format=%(objectname) %(refname)"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    for line in filter(None, refs):
        sha, name = line.split()
        subprocess.run(["git", "-C", str(path), "update-ref", name, sha], check=True)
    shutil.rmtree(staging)
    counted = subprocess.run(["git", "-C", str(path), "count-objects"], capture_output=True,
                             text=True, check=True).stdout
    return int(counted.split()[0])


def _warm(path: Path) -> None:
    """Stat every file, so both sides start with warm directory and inode caches."""
    subprocess.run(["find", str(path), "-type", "f", "-printf", ""], check=True)


def _timed(command: list[str], **kwargs: object) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - started, done.stdout


def _casframe(path: Path, mode: str) -> dict[str, Any]:
    wall, out = _timed([sys.executable, "-c", CASFRAME_PRUNE, f"file://{path}", mode])
    result: dict[str, Any] = json.loads(out)
    result["wall"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--unreachable", type=float, default=0.10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--git-gc", action="store_true", help="also time git gc --prune=now")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()

    run_dir = Path(args.out) / f"prune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    print(f"run directory {run_dir}; load average {os.getloadavg()}")
    rng = random.Random(1)
    subdirs, garbage_count = _plan(args.objects, args.unreachable)
    trees = [[_blobs(rng, FILES_PER_DIR, f"/{r}/{d}/") for d in range(subdirs)]
             for r in range(REFS)]
    root_files = [_blobs(rng, ROOT_FILES, f"/{r}/root/") for r in range(REFS)]
    garbage = _blobs(rng, garbage_count, "/garbage/")

    started = time.perf_counter()
    cf_objects = build_casframe(run_dir / "cf-0", trees, garbage, root_files)
    cf_build = time.perf_counter() - started
    started = time.perf_counter()
    git_objects = build_git(run_dir / "git-0", trees, garbage, root_files)
    git_build = time.perf_counter() - started
    print(f"built casframe store: {cf_objects} objects in {cf_build:.1f} s "
          f"({cf_objects / cf_build:,.0f}/s); git: {git_objects} loose objects in "
          f"{git_build:.1f} s; {garbage_count} unreachable in each")
    for i in range(1, args.runs):  # every copy before the first delete
        for side in ("cf", "git"):
            subprocess.run(["cp", "-a", str(run_dir / f"{side}-0"), str(run_dir / f"{side}-{i}")],
                           check=True)

    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    for i in range(args.runs):
        cf, git = run_dir / f"cf-{i}", run_dir / f"git-{i}"
        order = ("cf", "git") if i % 2 == 0 else ("git", "cf")
        for side in order:  # non-destructive first, on the copy about to be pruned
            if side == "cf":
                _warm(cf)
                dry = _casframe(cf, "dry")
                assert dry["scanned"] == cf_objects and dry["freed"] == garbage_count, dry
                record("casframe prune --dry-run", dry["seconds"])
            else:
                _warm(git)
                record("git count-objects -v", _timed(["git", "-C", str(git), "count-objects",
                                                       "-v"])[0])
                seconds, out = _timed(["git", "-C", str(git), "prune", "-n", "--expire=now"])
                assert len(out.splitlines()) == garbage_count, len(out.splitlines())
                record("git prune -n --expire=now", seconds)
        for side in order:
            if side == "cf":
                _warm(cf)
                done = _casframe(cf, "prune")
                assert done["freed"] == garbage_count, done
                record("casframe prune", done["seconds"])
                record("casframe prune (whole process)", done["wall"])
                for phase, seconds in done["phases"].items():
                    record(f"  phase: {phase}", seconds)
                record("casframe prune scan (list + mark)",
                       done["phases"]["scan"] + done["phases"]["mark"])
            else:
                _warm(git)
                record("git prune --expire=now",
                       _timed(["git", "-C", str(git), "prune", "--expire=now"])[0])
                if args.git_gc:
                    record("git gc --prune=now",
                           _timed(["git", "-C", str(git), "gc", "-q", "--prune=now"])[0])

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"\n{'command':36} {'median s':>9} {'objects/s':>11}   runs")
    for name, value in medians.items():
        objects = git_objects if name.startswith("git") else cf_objects
        runs = " ".join(f"{v:.3f}" for v in results[name])
        shown = "" if name.startswith(" ") else f"{objects / value:,.0f}"
        print(f"{name:36} {value:9.3f} {shown:>11}   {runs}")
    ratios = {
        "git prune / casframe prune": medians["git prune --expire=now"]
        / medians["casframe prune"],
        "git prune / casframe prune (whole process)": medians["git prune --expire=now"]
        / medians["casframe prune (whole process)"],
        "git prune -n / casframe prune --dry-run": medians["git prune -n --expire=now"]
        / medians["casframe prune --dry-run"],
        "git count-objects -v / casframe prune --dry-run": medians["git count-objects -v"]
        / medians["casframe prune --dry-run"],
    }
    print("\nratios (> 1: casframe is faster)")
    for name, value in ratios.items():
        print(f"  {name:48} {value:6.2f}")
    rate = cf_objects / medians["casframe prune scan (list + mark)"]
    verdict = "meets" if rate >= 100_000 else "MISSES"
    print(f"\ncasframe prune scanned {rate:,.0f} objects/s (listing and marking; deleting "
          f"{garbage_count:,} objects is the file system's unlink rate, for git as well): "
          f"{verdict} the 100,000/s target; load average {os.getloadavg()}")
    (run_dir / "results.json").write_text(json.dumps(
        {"objects": cf_objects, "git_objects": git_objects, "results": results,
         "medians": medians, "ratios": ratios}, indent=2))
    if not args.keep:
        shutil.rmtree(run_dir)  # only now: deleting earlier would slow the file creation above


if __name__ == "__main__":
    main()
