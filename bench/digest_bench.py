"""Import of large files under BLAKE3 against SHA-256, in one run.

    .venv/bin/python bench/digest_bench.py [--quick] [--repeat N] [--out DIR] [--keep]

Builds bench/run.py's large tree (8 x 128 MiB, 1 GiB; ``--quick``: 8 x 16 MiB) in a new
directory and imports it, in alternating rounds (SHA-256 then BLAKE3, then BLAKE3 then
SHA-256, ...), each time into a new ``file://`` store, as whole processes
(``bench/_child.py``, no stat cache, casframe's own settings: helper processes when the tree
is large enough, else the store's threads). Before each import, ``sync`` writes back what the
previous ones left dirty (else a later import waits for the disk) and the tree is read once,
so both read the same warm input.

Target (issue 18): BLAKE3 import of 1 GiB in 8 files at least 1.5x the speed of SHA-256's.
Prints the median import time of each and the median of the per-round ratios (SHA-256 time /
BLAKE3 time), with the CPU seconds each used (os.wait4 of the child, helpers included) and the
load average seen; writes ``results.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from run import FULL, QUICK, Prep, build_large, loadavg, med, run_child

TARGET = 1.5  # BLAKE3 speed / SHA-256 speed, at least
FUNCTIONS = ("sha256", "blake3")


def measure(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    large = run_dir / "src" / "large"
    tree = build_large(large, cfg["large_files"], cfg["large_size"])
    stores, log = run_dir / "stores", run_dir / "child.log"
    stores.mkdir()
    rounds: list[dict[str, dict[str, Any]]] = []
    loads = [loadavg()]
    prep = Prep(sync=not args.no_sync)
    for i in range(args.repeat):
        order = FUNCTIONS if i % 2 == 0 else FUNCTIONS[::-1]
        this: dict[str, dict[str, Any]] = {}
        for name in order:
            prep(large)
            store = stores / f"{name}-{i}"
            this[name] = run_child(["import", f"file://{store}?digest_function={name}",
                                    str(large)], log)
            if not args.keep:
                # Eight large files, not many small ones: deleting them now does not slow the
                # next writes, and keeps the page cache from filling with stores (reclaiming
                # it would count in the next import's kernel time).
                shutil.rmtree(store)
        rounds.append(this)
        loads.append(loadavg())
        print(
            f"round {i + 1}: sha256 {this['sha256']['op_s']:.3f} s "
            f"(cpu {this['sha256']['op_cpu_s']:.2f} s), blake3 {this['blake3']['op_s']:.3f} s "
            f"(cpu {this['blake3']['op_cpu_s']:.2f} s), load {loads[-1][0]:.1f}",
            flush=True,
        )
    return {"tree": tree, "rounds": rounds, "loadavg": loads}


def report(res: dict[str, Any]) -> bool:
    rounds = res["rounds"]
    size = res["tree"]["bytes"]
    ratios = [r["sha256"]["op_s"] / r["blake3"]["op_s"] for r in rounds]
    cpu_ratios = [r["sha256"]["op_cpu_s"] / r["blake3"]["op_cpu_s"] for r in rounds]
    print(f"\n{res['tree']['files']} files, {size / (1 << 20):.0f} MiB; "
          f"load average seen {min(x[0] for x in res['loadavg']):.1f}-"
          f"{max(x[0] for x in res['loadavg']):.1f}")
    for name in FUNCTIONS:
        op = med([r[name]["op_s"] for r in rounds])
        cpu = med([r[name]["op_cpu_s"] for r in rounds])
        whole = med([r[name]["cpu_s"] for r in rounds])
        print(f"{name:>7} import: median {op:.3f} s ({size / op / 1e9:.2f} GB/s), "
              f"CPU of the import {cpu:.2f} s (whole process, start-up included, {whole:.2f} s)")
    speed = med(ratios)
    met = speed >= TARGET
    print(f"speed, blake3 / sha256 (median of rounds {', '.join(f'{x:.2f}' for x in ratios)}): "
          f"{speed:.2f}x (target >= {TARGET}x) {'met' if met else 'MISSED'}")
    print(f"CPU of the import, sha256 / blake3 (median of rounds "
          f"{', '.join(f'{x:.2f}' for x in cpu_ratios)}): {med(cpu_ratios):.2f}x")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 16 MiB, 2 rounds")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 6; quick 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--keep", action="store_true", help="keep the tree and the stores")
    parser.add_argument("--no-sync", action="store_true", help="no `sync` before each import")
    args = parser.parse_args()
    args.repeat = args.repeat or (2 if args.quick else 6)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = args.out / f"digest-{stamp}"
    run_dir.mkdir(parents=True)
    try:
        res = measure(args, run_dir)
        met = report(res)
        (run_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"results: {run_dir / 'results.json'}")
    finally:
        if not args.keep:
            for part in ("src", "stores"):
                shutil.rmtree(run_dir / part, ignore_errors=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
