"""CPU per GiB of the ways to copy a large file into a store and hash the bytes stored.

    .venv/bin/python bench/copy_bench.py [--quick] [--repeat N] [--out DIR] [--only NAME ...]

Each variant copies run.py's large tree (8 x 128 MiB; ``--quick``: 8 x 32 MiB) file by file
into new files of one folder (reserved first with ``posix_fallocate``, as the ``file://``
store does) and hashes under SHA-256 and BLAKE3 (one thread) exactly the bytes it stored, in
one thread, so that only the CPU differs between variants, not their overlap:

- ``kernel copy + map`` (the reference, what casframe does): ``copy_file_range`` in 16 MiB
  windows, then the new file hashed through 16 MiB memory maps;
- ``kernel copy + map populate``: the same, each map filled at once (``MAP_POPULATE``);
- ``kernel copy + pread``: the new file hashed by reading it into a 256 KiB buffer;
- ``splice 1 MiB pipe + map``: the copy by ``splice`` through a pipe of 1 MiB (the kernel's
  own copy goes through a pipe of 64 KiB);
- ``read, hash, write 256 KiB`` and ``1 MiB``: the file read into a buffer that is hashed and
  written (what a store without kernel copies does);
- ``kernel copy alone`` and ``splice alone``: the copy without hashing, for the share of each.

Rounds alternate the order of the variants; before each run the sources are read (warm) and
as much memory as the outputs take is written and freed (``run.back_memory``). Prints, per
variant and function, the median user and kernel CPU seconds per GiB, the least kernel
seconds (the kernel time swings with the load and with how this VM's memory is backed: the
least is the cost with no such extra), and the median per-round ratio of the variant's CPU to
the reference's.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import mmap
import os
import resource
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
from run import back_memory, build_large, loadavg, med, warm

WINDOW = 16 << 20
Hash = Any  # hashlib's or blake3's hash object


def new_hash(function: str) -> Hash:
    return hashlib.sha256() if function == "sha256" else blake3.blake3(max_threads=1)


def kernel_copy(src: int, dst: int, size: int) -> None:
    done = 0
    while done < size and (n := os.copy_file_range(src, dst, WINDOW, done, done)):
        done += n


def splice_copy(src: int, dst: int, size: int) -> None:
    r, w = os.pipe()
    try:
        pipe = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        done = 0
        while done < size and (n := os.splice(src, w, pipe, offset_src=done)):
            moved = 0
            while moved < n:
                moved += os.splice(r, dst, n - moved, offset_dst=done + moved)
            done += n
    finally:
        os.close(r)
        os.close(w)


def hash_mapped(fd: int, size: int, h: Hash, populate: bool = False) -> None:
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    for offset in range(0, size, WINDOW):
        n = min(WINDOW, size - offset)
        with (
            mmap.mmap(fd, n, flags=flags, prot=mmap.PROT_READ, offset=offset) as m,
            memoryview(m) as view,
        ):
            h.update(view)


def hash_read(fd: int, size: int, h: Hash) -> None:
    view = memoryview(bytearray(256 << 10))
    offset = 0
    while offset < size and (n := os.preadv(fd, [view], offset)):
        h.update(view[:n])
        offset += n


def read_hash_write(chunk: int) -> Callable[[int, int, int, Hash], None]:
    def run(src: int, dst: int, size: int, h: Hash) -> None:
        view = memoryview(bytearray(chunk))
        offset = 0
        while offset < size and (n := os.preadv(src, [view], offset)):
            h.update(view[:n])
            written = 0
            while written < n:
                written += os.pwrite(dst, view[written:n], offset + written)
            offset += n
    return run


VARIANTS: dict[str, Callable[[int, int, int, Hash], None]] = {
    "kernel copy + map": lambda s, d, n, h: (kernel_copy(s, d, n), hash_mapped(d, n, h)),
    "kernel copy + map populate": lambda s, d, n, h: (
        kernel_copy(s, d, n), hash_mapped(d, n, h, populate=True)),
    "kernel copy + pread": lambda s, d, n, h: (kernel_copy(s, d, n), hash_read(d, n, h)),
    "splice 1 MiB pipe + map": lambda s, d, n, h: (splice_copy(s, d, n), hash_mapped(d, n, h)),
    "read, hash, write 256 KiB": read_hash_write(256 << 10),
    "read, hash, write 1 MiB": read_hash_write(1 << 20),
    "kernel copy alone": lambda s, d, n, h: kernel_copy(s, d, n),
    "splice alone": lambda s, d, n, h: splice_copy(s, d, n),
}
REFERENCE = "kernel copy + map"


def run_variant(name: str, function: str, files: list[Path], out: Path) -> tuple[float, float]:
    """User and kernel CPU seconds of one variant over ``files``."""
    out.mkdir()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i, path in enumerate(files):
        src = os.open(path, os.O_RDONLY)
        dst = os.open(out / f"o{i}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            size = os.fstat(src).st_size
            os.posix_fallocate(dst, 0, size)
            h = new_hash(function)
            VARIANTS[name](src, dst, size, h)
            h.hexdigest()
        finally:
            os.close(src)
            os.close(dst)
    after = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(out)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def report(res: dict[tuple[str, str], list[tuple[float, float]]], gib: float) -> None:
    print(f"{'variant':28} {'function':8} {'user':>6} {'kernel':>6} {'least k':>7} "
          f"{'CPU':>6} {'x ref':>6}   (CPU seconds per GiB, medians)")
    for (name, function), runs in res.items():
        ref = res[(REFERENCE, function)]
        ratio = med([(u + s) / (ru + rs) for (u, s), (ru, rs) in zip(runs, ref, strict=True)])
        user, kernel = med([u for u, _ in runs]) / gib, med([s for _, s in runs]) / gib
        print(f"{name:28} {function:8} {user:6.3f} {kernel:6.3f} "
              f"{min(s for _, s in runs) / gib:7.3f} {user + kernel:6.3f} {ratio:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 32 MiB, 3 rounds")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 7; quick 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=None,
                        help="these variants (the reference is always measured)")
    args = parser.parse_args()
    repeat = args.repeat or (3 if args.quick else 7)
    size = (32 if args.quick else 128) << 20
    names = [REFERENCE] + [n for n in (args.only or VARIANTS) if n != REFERENCE]
    run_dir = args.out / f"copy-{os.getpid()}"
    tree = build_large(run_dir / "src", 8, size)
    files = sorted((run_dir / "src").iterdir())
    res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    loads = [loadavg()[0]]
    try:
        for i in range(repeat):
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order:
                for function in ("sha256", "blake3"):
                    warm(files)
                    back_memory(tree["bytes"] * 5 // 4)
                    res.setdefault((name, function), []).append(
                        run_variant(name, function, files, run_dir / "dst"))
            loads.append(loadavg()[0])
            print(f"round {i + 1} of {repeat}; load {loads[-1]:.1f}", flush=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\n{tree['files']} files, {tree['bytes'] >> 20} MiB, {repeat} rounds, load average "
          f"seen {min(loads):.1f}-{max(loads):.1f}")
    report({k: res[k] for k in sorted(res, key=lambda k: (names.index(k[0]), k[1]))},
           tree["bytes"] / (1 << 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
