"""How long the ``casframe`` command takes to start, and a whole-process checkout.

    .venv/bin/python bench/startup.py [--repeat N] [--checkout-repeat N] [--files N] [--out DIR]
        [--keep] [--quick] [--instructions] [--checkout-jobs N]

Every figure is a ratio or a bound measured against a reference in the same run, with the
commands alternated (A B A B ...) so that both meet the same load:

* start-up: ``python -c pass`` (the interpreter alone), then ``casframe --version``,
  ``casframe --help``, ``casframe ref list`` and ``casframe ref get NAME`` on a ``file://``
  store holding a few refs; the median of ``--repeat`` (20) runs of each. Target: each casframe
  command at most 0.12 s.
* checkout: ``casframe checkout REF DEST`` as a whole process (start-up, opening the store,
  hardlinking) against ``cp -al`` of the same tree (bench/run.py's small tree: 20,000 files of
  1-8 KiB in 401 directories, same seed), each into a new directory. Target: at most 1.5x.

``--quick``: 5 runs of each light command, 1 checkout of 2,000 files. ``--instructions``: also
count each light command's instructions with ``valgrind --tool=callgrind`` (the same on a busy
machine as on an idle one), beside ``python -c pass``'s, and the checkout's (its own process:
helpers are not counted). ``--checkout-jobs N``: the checkout runs with ``--jobs N``.

Prints a table and writes results.json into bench/out/<timestamp>-startup/ (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from run import build_small, loadavg

import casframe

T_START = 0.12  # seconds, median, for each light command
T_CHECKOUT = 1.5  # x cp -al, median of the per-round ratios
CASFRAME = str(Path(sys.executable).with_name("casframe"))


# As installed from a wheel: compiled modules are cached. The warm-up runs write the caches
# that a PYTHONDONTWRITEBYTECODE in the environment would otherwise forbid, so that the timed
# runs do not compile casframe's sources every time.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - start


def instructions(cmd: list[str]) -> int:
    """Instructions ``cmd`` runs, as callgrind counts them (compiled modules cached)."""
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    return int(result.stderr.split("Collected : ")[1].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--checkout-repeat", type=int, default=5)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5 runs, 1 checkout of 2,000 files")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions with valgrind --tool=callgrind")
    parser.add_argument("--checkout-jobs", type=int, default=None, metavar="N",
                        help="pass --jobs N to the checkout (default: the store's, one per core)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.checkout_repeat, args.files = 5, 1, 2_000

    run_dir = args.out / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-startup")
    work = run_dir / "work"
    work.mkdir(parents=True)
    try:
        tree = work / "small"
        shape = build_small(tree, args.files, (16, 4, 5))
        store_dir = work / "store"
        with casframe.open_store(f"file://{store_dir}") as store:
            root = store.import_directory(tree)
            for i in range(20):
                store.set_ref(f"bench/{i:02}", root)
        light = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "casframe --version": [CASFRAME, "--version"],
            "casframe --help": [CASFRAME, "--help"],
            "casframe ref list": [CASFRAME, "--store", str(store_dir), "ref", "list"],
            "casframe ref get": [CASFRAME, "--store", str(store_dir), "ref", "get", "bench/00"],
        }
        for cmd in light.values():  # warm the page cache and .pyc files
            timed(cmd)
        times: dict[str, list[float]] = {name: [] for name in light}
        counts = {name: instructions(cmd) for name, cmd in light.items()} if (
            args.instructions) else {}
        load_before = loadavg()
        for _ in range(args.repeat):
            for name, cmd in light.items():
                times[name].append(timed(cmd))

        jobs = [] if args.checkout_jobs is None else ["--jobs", str(args.checkout_jobs)]

        def checkout_cmd(dest: Path) -> list[str]:
            return [CASFRAME, "--store", str(store_dir), "checkout", "bench/00", str(dest), *jobs]

        timed(checkout_cmd(work / "co-warm"))  # compiles the checkout's modules once
        if args.instructions:  # the calling process's (helpers, if any, are not counted)
            counts["casframe checkout"] = instructions(checkout_cmd(work / "co-counted"))
        checkout: dict[str, list[float]] = {"cp -al": [], "casframe checkout": []}
        for i in range(args.checkout_repeat):
            os.sync()
            checkout["cp -al"].append(timed(["cp", "-al", str(tree), str(work / f"cp-{i}")]))
            os.sync()
            checkout["casframe checkout"].append(timed(checkout_cmd(work / f"co-{i}")))
        load_after = loadavg()

        baseline = statistics.median(times["python -c pass"])
        rows = []
        print(f"{'command':<22} {'median s':>9} {'x python':>9}  target")
        for name, values in times.items():
            median = statistics.median(values)
            target = "" if name.startswith("python") else (
                f"<= {T_START} s: {'ok' if median <= T_START else 'MISSED'}"
            )
            rows.append({"command": name, "median_s": median, "runs": values})
            print(f"{name:<22} {median:>9.3f} {median / baseline:>9.2f}  {target}")
        ratios = [c / r for c, r in zip(checkout["casframe checkout"], checkout["cp -al"],
                                        strict=True)]
        ratio = statistics.median(ratios)
        print(f"\ncheckout of {shape['files']:,} files: cp -al "
              f"{statistics.median(checkout['cp -al']):.3f} s, casframe checkout "
              f"{statistics.median(checkout['casframe checkout']):.3f} s: {ratio:.2f}x "
              f"(target <= {T_CHECKOUT}x: {'ok' if ratio <= T_CHECKOUT else 'MISSED'})")
        for name, count in counts.items():
            print(f"instructions {name:<22} {count / 1e6:>7.1f} M "
                  f"({count / counts['python -c pass']:.2f}x python -c pass)")
        print(f"load average before {load_before}, after {load_after}")
        (run_dir / "results.json").write_text(json.dumps({
            "start_up": rows, "checkout": checkout, "checkout_ratio_median": ratio,
            "instructions": counts, "tree": shape, "load_before": load_before,
            "load_after": load_after,
        }, indent=2))
        print(f"results: {run_dir / 'results.json'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
