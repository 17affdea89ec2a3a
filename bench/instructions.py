"""Instructions per file of an in-process import, against the bare loop: load-independent.

    .venv/bin/python bench/instructions.py [--quick] [--out DIR] [--keep]

Counts user-space instructions with ``valgrind --tool=callgrind`` (the same on a busy machine
as on an idle one) for, each on a tree of N and of 3N files (bench/run.py's files, 85
directories; N = 2,000, or 500 with ``--quick``), and reports the difference divided by 2N:
the cost of one more file, start-up and fixed costs cancelled out.

* the bare loop of bench/ceiling.py on one thread (open, fstat, read, close, sha256,
  O_TMPFILE, write, link): the least a Python import does per file;
* casframe's first import (``--jobs 1``, no stat cache) into a new ``file://`` store;
* casframe's re-import of the same tree with the stat cache the first import filled.

Each command runs once untimed first (compiled modules, the entry-point cache), then is counted
twice and the smaller count kept. Under valgrind sha256 runs without the CPU's SHA extensions,
so about 130,000 instructions of a file of 4.5 KiB are hashing that real hardware does in a
fraction of that: compare the figures with each other, not with a wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import build_small, loadavg  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def instructions(cmd: list[str], env: dict[str, str]) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
                         env=env, capture_output=True, text=True, check=True).stderr
    found = re.search(r"Collected : ([\d,]+)", out)
    assert found, out
    return int(found.group(1).replace(",", ""))


def count(kind: str, tree: Path, work: Path, tag: str) -> int:
    env = dict(ENV)
    cache = work / f"cache-{tree.name}"
    if kind == "bare":
        def cmd(n: int) -> list[str]:
            return [sys.executable, str(HERE / "ceiling.py"), "--child", "stripped", str(tree),
                    str(work / f"bare-{tree.name}-{tag}-{n}"), "thread1"]
    elif kind == "import":
        env["CASFRAME_STAT_CACHE"] = "off"

        def cmd(n: int) -> list[str]:
            return [sys.executable, str(HERE / "_child.py"), "--jobs", "1", "import",
                    f"file://{work / f'imp-{tree.name}-{tag}-{n}'}", str(tree)]
    else:  # re-import: the cache and store filled by an untimed first import
        env["CASFRAME_STAT_CACHE"] = str(cache)
        store = f"file://{work / f're-{tree.name}'}"

        def cmd(n: int) -> list[str]:
            return [sys.executable, str(HERE / "_child.py"), "--jobs", "1", "import", store,
                    str(tree)]
    subprocess.run(cmd(0), env=env, check=True, capture_output=True)
    return min(instructions(cmd(1), env), instructions(cmd(2), env))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 and 1,500 files")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    n = 500 if args.quick else 2000
    run = args.out / ("instructions-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"))
    work = run / "work"
    work.mkdir(parents=True)
    try:
        small, large = work / f"t{n}", work / f"t{3 * n}"
        build_small(small, n, (4, 4, 4))
        build_small(large, 3 * n, (4, 4, 4))
        print(f"instructions per file (callgrind; ({3 * n:,} files - {n:,} files) / {2 * n:,}); "
              f"load {loadavg()}")
        per_file = {}
        for kind in ("bare", "import", "re-import"):
            counts = [count(kind, tree, work, kind) for tree in (small, large)]
            per_file[kind] = (counts[1] - counts[0]) / (2 * n)
            print(f"  {kind:10} {per_file[kind]:10,.0f}   ({counts[0]:,} / {counts[1]:,})",
                  flush=True)
        print(f"  import above the bare loop: {per_file['import'] - per_file['bare']:,.0f} "
              f"({per_file['import'] / per_file['bare']:.2f}x the bare loop)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
