"""One casframe operation in its own process, for bench/run.py.

Usage::

    python bench/_child.py [OPTIONS] import   STORE_URL SRC_DIR
    python bench/_child.py [OPTIONS] checkout STORE_URL DIGEST DEST_DIR
    python bench/_child.py           noop     STORE_URL

Options: ``--profile FILE``; ``--jobs N`` (processes: 1 keeps the work in this process);
``--threshold FILES`` (helper processes from this many files on, instead of casframe's
setting: bench/workers.py measures where they start to pay).

Prints one JSON object on stdout: the time spent importing casframe and opening the store, the
in-process time of the operation itself (``op_s``), the resident set size just before the
operation and the high-water mark at its end (from /proc/self/status, in KiB). The parent reads
the peak RSS of the whole process through ``/usr/bin/time`` (wait4); ``hwm_kib`` cross-checks it.

``--profile FILE`` runs the operation under cProfile, with one profiler per thread (the tree
engine hashes and writes in a thread pool, which a plain cProfile run would not see), and dumps
the merged statistics to FILE. Timings taken under the profiler are not benchmark figures.

Helper processes (``casframe.workers``) are counted too: each one's ``VmHWM`` is read just
before it is stopped (``helpers_hwm_kib``), so ``hwm_kib`` plus their sum bounds the memory
of the whole operation from above.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class _AllThreadsProfile:
    """cProfile for the calling thread and every thread started while it is active."""

    def __init__(self) -> None:
        import cProfile
        import threading

        self._cProfile = cProfile
        self._threading = threading
        self._lock = threading.Lock()
        self._profiles: list = []

    def _thread_hook(self, frame, event, arg):  # type: ignore[no-untyped-def]
        profile = self._cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()  # replaces this hook for the rest of the thread's life

    def __enter__(self) -> _AllThreadsProfile:
        self._threading.setprofile(self._thread_hook)
        self._main = self._cProfile.Profile()
        self._main.enable()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._main.disable()
        self._threading.setprofile(None)  # type: ignore[arg-type]

    def dump(self, path: str) -> None:
        import pstats

        stats = pstats.Stats(self._main)
        for profile in self._profiles:
            stats.add(profile)
        stats.dump_stats(path)


def _watch_helpers(threshold: int | None) -> list[int]:
    """Record each helper's peak RSS as it is stopped; set the threshold if given."""
    import casframe.checkout
    import casframe.treeimport
    from casframe.workers import pool

    peaks: list[int] = []
    stop = pool._Helper.stop

    def stop_and_measure(helper, *, kill):  # type: ignore[no-untyped-def]
        try:
            with open(f"/proc/{helper.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]))
        except OSError:
            pass
        stop(helper, kill=kill)

    pool._Helper.stop = stop_and_measure  # type: ignore[method-assign]
    if threshold is not None:
        # Where the importer reads it (casframe.tree only re-exports the importer).
        casframe.treeimport.IMPORT_THRESHOLD_FILES = threshold  # type: ignore[misc]
        casframe.checkout.CHECKOUT_THRESHOLD_FILES = threshold  # type: ignore[misc]
    return peaks


def main(argv: list[str]) -> int:
    profile_path = None
    jobs: int | None = None
    threshold: int | None = None
    while argv[:1] and argv[0].startswith("--"):
        if argv[0] == "--profile":
            profile_path = argv[1]
        elif argv[0] == "--jobs":
            jobs = int(argv[1])
        elif argv[0] == "--threshold":
            threshold = int(argv[1])
        else:
            print(f"unknown option {argv[0]!r}", file=sys.stderr)
            return 2
        argv = argv[2:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    op, args = argv[0], argv[1:]

    import casframe
    from casframe import Digest

    t_imported = time.perf_counter()
    store = casframe.open_store(args[0])
    t_opened = time.perf_counter()
    result: dict[str, object] = {
        "op": op,
        "import_casframe_s": t_imported - _T0,
        "open_store_s": t_opened - t_imported,
        "rss_before_op_kib": _status_kib("VmRSS"),
    }

    helper_peaks = _watch_helpers(threshold) if op != "noop" else []
    profiler = _AllThreadsProfile() if profile_path else None
    if profiler:
        profiler.__enter__()
    start = time.perf_counter()
    cpu_start = time.process_time()  # every thread of this process (helpers are not counted)
    times_start = os.times()
    if op == "import":
        digest = store.import_directory(args[1], jobs=jobs)
        result["digest"] = str(digest)
    elif op == "checkout":
        store.checkout(Digest.parse(args[1]), args[2], link=True, jobs=jobs)
    elif op == "noop":
        pass
    else:
        print(f"unknown operation {op!r}", file=sys.stderr)
        return 2
    result["op_s"] = time.perf_counter() - start
    result["op_cpu_s"] = time.process_time() - cpu_start
    times_end = os.times()
    result["op_user_s"] = times_end.user - times_start.user
    result["op_sys_s"] = times_end.system - times_start.system
    if profiler:
        profiler.__exit__(None, None, None)
        profiler.dump(profile_path)  # type: ignore[arg-type]
    result["hwm_kib"] = _status_kib("VmHWM")
    result["helpers_hwm_kib"] = helper_peaks
    store.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
