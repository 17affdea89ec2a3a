"""How fast can Python import small files at all, here? The ceiling behind the import target.

    .venv/bin/python bench/ceiling.py [--repeat N] [--out DIR] [--keep]

Builds bench/run.py's small tree (20,000 files of 1-8 KiB in 401 directories, same seed) and
measures, in alternating rounds, each in a fresh process writing into a directory of its own
(`sync` and a warm source tree before each, as in run.py):

* ``cp -r`` of the tree: creating 20,000 files from C, the floor of any import;
* ``casframe import`` (``Store.import_directory`` into a new ``file://`` store, no stat cache);
* the least any Python import into the ``file://`` layout must do, with nothing else: list the
  tree, then per file open, fstat, read, close, sha256, and write the content to an unnamed
  file (``O_TMPFILE``) linked into ``objects/ab/cdef...``. No Directory messages, no
  existence checks, no stat cache, no error handling. Run three ways: one thread, two
  threads (the GIL is released around every system call and around sha256), and two worker
  processes (no GIL shared; the main process lists the tree and sends batches), started by
  ``fork`` (fastest, but unsafe in a process that runs other threads, such as a gRPC server)
  and by ``forkserver`` (safe: workers fork from a clean server process started on first use;
  its start-up is inside the time).

Prints files/s of each and its ratio to ``cp -r``; the import target is 20,000 files/s.
The stripped loops are not casframe: they show what CPython on this machine allows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import FULL, Prep, build_small, loadavg  # noqa: E402

TARGET = 20_000  # files/s: the first import's target
BATCH = 500
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _store_files(store: str, paths: list[str]) -> int:
    """Read, hash and store ``paths`` into ``store``'s objects/ (the stripped loop)."""
    tmp = f"{store}/tmp"
    tmp_fd, obj_fd = os.open(tmp, _DIR), os.open(f"{store}/objects", _DIR)
    try:
        for path in paths:
            fd = os.open(path, _OPEN)
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)
            os.close(fd)
            name = hashlib.sha256(data).hexdigest()
            out = os.open(tmp, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o444)
            os.write(out, data)
            target = f"{name[:2]}/{name[2:]}"
            try:
                os.link(f"/proc/self/fd/{out}", target, src_dir_fd=tmp_fd, dst_dir_fd=obj_fd)
            except FileNotFoundError:
                os.makedirs(f"{store}/objects/{name[:2]}", exist_ok=True)
                os.link(f"/proc/self/fd/{out}", target, src_dir_fd=tmp_fd, dst_dir_fd=obj_fd)
            except FileExistsError:
                pass  # a duplicate content: stored once
            os.close(out)
    finally:
        os.close(tmp_fd)
        os.close(obj_fd)
    return len(paths)


def stripped(src: str, store: str, how: str) -> None:
    os.makedirs(f"{store}/objects")
    os.makedirs(f"{store}/tmp")
    started = time.perf_counter()
    pool: Executor
    if how == "thread1":
        pool = ThreadPoolExecutor(1)
    elif how == "thread2":
        pool = ThreadPoolExecutor(2)
    else:
        pool = ProcessPoolExecutor(2, mp_context=get_context(how[:-1]))
    with pool:
        futures, batch, stack = [], [], [src]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    batch.append(entry.path)
                    if len(batch) == BATCH:
                        futures.append(pool.submit(_store_files, store, batch))
                        batch = []
        if batch:
            futures.append(pool.submit(_store_files, store, batch))
        files = sum(f.result() for f in futures)
    print(json.dumps({"op_s": time.perf_counter() - started, "files": files}))


def casframe_import(src: str, store: str) -> None:
    from casframe import open_store

    with open_store(f"file://{store}") as opened:
        started = time.perf_counter()
        opened.import_directory(src, stat_cache=False)
        print(json.dumps({"op_s": time.perf_counter() - started}))


KINDS = ("cp -r", "casframe", "python 1 thread", "python 2 threads", "python 2 processes",
         "python 2 forkserver")
STRIPPED = {"python 1 thread": "thread1", "python 2 threads": "thread2",
            "python 2 processes": "fork2", "python 2 forkserver": "forkserver2"}


_prep = Prep(sync=True)  # run.py's untimed preparation: sync, then read the source once


def measure(kind: str, src: Path, dest: Path) -> float:
    _prep(src)
    if kind == "cp -r":
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
        return time.perf_counter() - started
    args = (["casframe", str(src), str(dest)] if kind == "casframe"
            else ["stripped", str(src), str(dest), STRIPPED[kind]])
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                          capture_output=True, text=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["op_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--keep", action="store_true", help="keep the trees and stores")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        if opts.child[0] == "casframe":
            casframe_import(*opts.child[1:])
        else:
            stripped(*opts.child[1:])
        return

    run_dir = opts.out / f"{dt.datetime.now():%Y%m%d-%H%M%S}-ceiling"
    src = run_dir / "small"
    load = [loadavg()]
    info = build_small(src, FULL["small_files"], FULL["small_dirs"])
    files = info["files"]
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for round_ in range(opts.repeat):
        for kind in KINDS:
            dest = run_dir / f"{kind.replace(' ', '-')}-{round_}"
            times[kind].append(measure(kind, src, dest))
        print(f"  [{round_ + 1}/{opts.repeat}] " + " | ".join(
            f"{kind} {times[kind][-1]:.3f} s" for kind in KINDS), flush=True)
    load.append(loadavg())
    print(f"\nmedians of {opts.repeat} alternating rounds, {files:,} files; "
          f"load average {load[0]} -> {load[1]}; target {TARGET:,} files/s")
    summary = {}
    for kind in KINDS:
        median = statistics.median(times[kind])
        rate = files / median
        ratio = statistics.median(t / c for t, c in zip(times[kind], times["cp -r"], strict=True))
        summary[kind] = {"median_s": median, "files_per_s": rate, "ratio_to_cp": ratio}
        verdict = "reaches" if rate >= TARGET else "below"
        print(f"  {kind:<20} {median:6.3f} s  {rate:8,.0f} files/s  {ratio:5.2f}x cp -r  "
              f"{verdict} {TARGET:,}")
    (run_dir / "results.json").write_text(json.dumps(
        {"when": dt.datetime.now().isoformat(timespec="seconds"), "load": load,
         "files": files, "times": times, "summary": summary}, indent=2))
    print(f"results: {run_dir / 'results.json'}")
    if not opts.keep:
        for path in run_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)


if __name__ == "__main__":
    main()
