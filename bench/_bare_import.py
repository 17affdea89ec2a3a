"""The least work any import of large files into a ``file://`` layout must do, for digest_bench.

    python bench/_bare_import.py FUNCTION SRC_DIR OUT_DIR [--jobs N]

For every file of ``SRC_DIR`` (flat), ``--jobs`` files at a time (default: the cores), each on
a thread: a new unnamed file in ``OUT_DIR`` (``O_TMPFILE``), the content copied into it by the
kernel (``copy_file_range``: one copy, no bytes through Python), the copy hashed through a
memory map with FUNCTION (``sha256`` by hashlib, ``blake3`` by the blake3 package on one
thread), and the file linked as ``OUT_DIR/HASH``. Both copying and hashing run without the
interpreter lock. Nothing else: no Directory messages, no existence checks, no error handling.
Whatever hashes what it stores must copy the bytes once and read them once; this is that work
and no more, so its times are the ceiling behind casframe's import of the same files.

Prints one JSON line: ``op_s`` (wall seconds of the work, after start-up) and the process's
user and kernel CPU seconds over the same span (``op_user_s``, ``op_sys_s``, ``op_cpu_s``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import blake3

WINDOW = 64 << 20


def hasher(function: str) -> Any:
    if function == "blake3":
        return blake3.blake3()
    return hashlib.new(function)


def store(src: str, out: str, function: str) -> None:
    h = hasher(function)
    with open(src, "rb") as source:
        fd = os.open(out, os.O_TMPFILE | os.O_RDWR, 0o644)
        try:
            size = os.fstat(source.fileno()).st_size
            copied = 0
            while copied < size:
                n = os.copy_file_range(source.fileno(), fd, size - copied, copied, copied)
                if not n:
                    break
                copied += n
            for offset in range(0, copied, WINDOW):
                with mmap.mmap(fd, min(WINDOW, copied - offset), access=mmap.ACCESS_READ,
                               offset=offset) as window, memoryview(window) as view:
                    h.update(view)
            # With directory fds, os.link calls linkat, which follows /proc/self/fd's link.
            folder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{fd}", h.hexdigest(), src_dir_fd=folder,
                        dst_dir_fd=folder)
            finally:
                os.close(folder)
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("function", choices=["sha256", "sha512", "blake3"])
    parser.add_argument("src", help="a folder of files (not descended into)")
    parser.add_argument("out", help="a new folder for the copies")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.makedirs(args.out)
    files = sorted(os.path.join(args.src, n) for n in os.listdir(args.src))
    hasher(args.function)  # import the hash's module before the clock starts
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda f: store(f, args.out, args.function), files))
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    user, kernel = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"op_s": wall, "op_user_s": user, "op_sys_s": kernel,
                      "op_cpu_s": user + kernel}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
