"""casframe benchmark: import and checkout against git and cp -al, in one run.

    .venv/bin/python bench/run.py [--quick] [--out DIR] [--repeat N] [--keep] [--no-sync]
                                  [--profile]

Builds seeded synthetic trees in a new directory (DIR/<timestamp>/, DIR defaults to bench/out),
then measures, in alternating pairs (A B A B ...), each run writing into a fresh directory:

* casframe import of the small tree into an empty file:// store  vs  git add -A && git commit
                                                                      (and cp -r, a floor)
* casframe re-import of the unchanged small tree into the store it just filled (and once more
  without the stat cache)
* casframe import of the large tree (1 GiB)                       vs  cp -r
* casframe checkout (hardlinks) of the small tree                 vs  cp -al, git checkout

Every casframe operation runs in a child process (bench/_child.py) whose peak RSS is read with
wait4 by GNU time (see TIME below for why not by this process). Prints a table with the project's
targets and writes results.json into the run directory. Bulk data is deleted only at the end
(keep it with --keep). See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_child.py"
SEED = 20240613
MiB = 1 << 20

# small_dirs: (top-level, per top-level, per second level) -> 1 + 16 + 64 + 320 = 401 directories
FULL: dict[str, Any] = {
    "small_files": 20_000, "small_dirs": (16, 4, 5), "large_files": 8, "large_size": 128 * MiB,
}
QUICK: dict[str, Any] = {
    "small_files": 2_000, "small_dirs": (4, 2, 4), "large_files": 8, "large_size": 16 * MiB,
}

# The speed and memory targets of the local store.
T_IMPORT_RATIO = 0.25  # casframe / git add+commit, at most
T_IMPORT_RATE = 20_000  # files/s, at least
T_REIMPORT_SPEEDUP = 3.0  # first import / re-import, at least
T_LARGE_GBPS = 1.0  # 1e9 bytes/s, at least
T_CHECKOUT_RATIO = 1.5  # casframe / cp -al, at most
T_RSS_MIB = 100.0  # peak RSS of any casframe operation, below

# Git as shipped: no user or system config. Only automatic maintenance is switched off, so that
# a detached `git gc --auto` (20,000 loose objects exceed gc.auto=6700) does not run in the
# background during the next measurement and repack the repository we check out from.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "LC_ALL": "C",
}
GIT_OPTS = ["-c", "gc.auto=0", "-c", "maintenance.auto=false"]


# -- helpers ----------------------------------------------------------------------------------


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# Linux carries the high-water mark of the mm a process had before exec (here a copy of this
# ~30 MiB Python parent) into its ru_maxrss, so os.wait4 on a direct child never reports less
# than the parent's RSS. GNU time, a small process, forks the measured command and reads its
# ru_maxrss with wait4: that figure is the command's own.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def wait_process(cmd: list[str], env: dict[str, str] | None = None,
                 capture: bool = False, stderr_path: Path | None = None) -> dict[str, Any]:
    """Run ``cmd``; return wall time, peak RSS (GNU time's wait4) and CPU time (os.wait4)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    rss_file = None
    if TIME:
        fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        cmd = [TIME, "-f", "%M", "-o", rss_file, *cmd]
    err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE if capture else
                                subprocess.DEVNULL, stderr=err)
        out = proc.stdout.read() if capture else b""  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout:
            proc.stdout.close()
        rss_text = Path(rss_file).read_text().split() if rss_file else []
    finally:
        if stderr_path:
            err.close()  # type: ignore[union-attr]
        if rss_file:
            os.unlink(rss_file)
    if proc.returncode != 0:
        detail = stderr_path.read_text()[-2000:] if stderr_path else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{detail}")
    return {
        "wall_s": wall,
        # With GNU time: the command's own peak; without: os.wait4's, floored at our RSS.
        "maxrss_kib": int(rss_text[-1]) if rss_text else usage.ru_maxrss,
        "maxrss_source": "time" if rss_text else "wait4-direct",
        "wait4_direct_maxrss_kib": usage.ru_maxrss,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "stdout": out.decode(),
    }


def run_child(args: list[str], log: Path, stat_cache: Path | None = None) -> dict[str, Any]:
    """A casframe operation in a child; merges the child's own report with wall time and RSS.

    Imports keep their stat cache in ``stat_cache`` (a first import gets a new, empty one;
    a re-import the one its first import filled), never in the user's cache directory.
    """
    env = {"CASFRAME_STAT_CACHE": str(stat_cache) if stat_cache else "off"}
    res = wait_process([sys.executable, str(CHILD), *args], env=env, capture=True,
                       stderr_path=log)
    report = json.loads(res.pop("stdout").strip().splitlines()[-1])
    report.update(res)
    rss_kib = res["maxrss_kib"]
    if res["maxrss_source"] != "time":
        rss_kib = report["hwm_kib"]  # the child's own VmHWM at the end of the operation
    report["peak_rss_mib"] = rss_kib / 1024
    report["overhead_s"] = res["wall_s"] - report["op_s"]  # interpreter, imports, open, exit
    return report


def run_ref(cmds: list[list[str]], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Reference commands run one after another, timed together."""
    total, rss, user, kernel = 0.0, 0, 0.0, 0.0
    for cmd in cmds:
        res = wait_process(cmd, env=env, stderr_path=log)
        total += res["wall_s"]
        rss = max(rss, res["maxrss_kib"])
        user += res["user_s"]
        kernel += res["sys_s"]
    return {"wall_s": total, "peak_rss_mib": rss / 1024, "cpu_s": user + kernel,
            "user_s": user, "sys_s": kernel}


def warm(paths: list[Path]) -> None:
    """Read every file under ``paths`` so the timed run starts with a warm page cache."""
    buf = bytearray(MiB)
    for top in paths:
        for root, _, files in os.walk(top):
            for name in files:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def back_memory(size: int) -> None:
    """Write to ``size`` bytes of new anonymous memory, then free it.

    This VM hands free memory back to its host (``page_reporting``) and pages cold memory out
    (DAMON ``pageout``); the first write to such a page costs the host a fault. A timed run
    that fills the page cache with a GiB of new files then pays for hundreds of thousands of
    those, a cost of the VM, not of the program measured: the kernel time of the same
    ``cp -r`` of 1 GiB moved from 0.4 s to 3.4 s between rounds a minute apart. Memory freed
    just before the run is backed again and is what the kernel hands out next.
    """
    with mmap.mmap(-1, size) as memory:
        page = b"\1" * 4096
        for offset in range(0, size, len(page)):
            memory[offset:offset + len(page)] = page


class Prep:
    """Untimed preparation before each timed operation: sync dirty pages, warm the inputs,
    and (``back`` bytes, 0 for none) back the memory the operation's writes will take."""

    def __init__(self, sync: bool, back: int = 0) -> None:
        self.sync = sync
        self.back = back
        self.sync_s: list[float] = []

    def __call__(self, *paths: Path) -> None:
        if self.sync:
            start = time.perf_counter()
            os.sync()
            self.sync_s.append(time.perf_counter() - start)
        warm(list(paths))
        if self.back:
            back_memory(self.back)


def count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def med(values: list[float]) -> float:
    return statistics.median(values)


# -- data -------------------------------------------------------------------------------------


def build_small(root: Path, n_files: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """``n_files`` files of 1-8 KiB in a nested tree; 10% duplicate another file's content."""
    rng = random.Random(SEED)
    dirs = [""]
    top, mid, leaf = shape
    for a in range(top):
        dirs.append(f"d{a:02d}")
        for b in range(mid):
            dirs.append(f"d{a:02d}/m{b}")
            for c in range(leaf):
                dirs.append(f"d{a:02d}/m{b}/l{c}")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    n_dup = n_files // 10
    dup_set = set(rng.sample(range(n_files), n_dup))
    originals = [i for i in range(n_files) if i not in dup_set]
    paths = [root / rng.choice(dirs) / f"f{i:05d}.dat" for i in range(n_files)]
    total = 0
    for i in originals:
        data = rng.randbytes(rng.randint(1024, 8192))
        paths[i].write_bytes(data)
        total += len(data)
    for i in sorted(dup_set):
        data = paths[rng.choice(originals)].read_bytes()
        paths[i].write_bytes(data)
        total += len(data)
    return {"files": n_files, "dirs": len(dirs), "duplicates": n_dup, "bytes": total,
            "unique_contents": len(originals)}


def build_large(root: Path, n_files: int, size: int) -> dict[str, Any]:
    rng = random.Random(SEED + 1)
    root.mkdir(parents=True)
    for i in range(n_files):
        with open(root / f"big{i}.bin", "wb") as f:
            for _ in range(size // MiB):
                f.write(rng.randbytes(MiB))
    return {"files": n_files, "bytes": n_files * size}


# -- measurements -----------------------------------------------------------------------------


def measure(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    work = run_dir / "work"
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    log = logs / "stderr.log"
    prep = Prep(sync=not args.no_sync)
    N = args.repeat
    res: dict[str, Any] = {"load": {"start": loadavg()}}
    if res["load"]["start"][0] > 0.5:
        print(f"warning: load average {res['load']['start']} on {os.cpu_count()} cores; "
              "the machine is busy, absolute figures will be low (ratios suffer less)", flush=True)

    t = time.perf_counter()
    small = work / "src" / "small"
    large = work / "src" / "large"
    res["small_tree"] = build_small(small, cfg["small_files"], cfg["small_dirs"])
    res["large_tree"] = build_large(large, cfg["large_files"], cfg["large_size"])
    os.sync()
    res["generate_s"] = time.perf_counter() - t
    res["load"]["after_generate"] = loadavg()
    n_small = res["small_tree"]["files"]
    print(f"trees built in {res['generate_s']:.1f} s: small {n_small} files "
          f"({res['small_tree']['bytes'] / 1e6:.1f} MB, {res['small_tree']['dirs']} dirs), "
          f"large {cfg['large_files']} x {cfg['large_size'] // MiB} MiB", flush=True)

    # Child start-up alone: interpreter, import casframe, open the store.
    startup = []
    for i in range(N):
        startup.append(run_child(["noop", f"file://{work / 'stores' / f'noop-{i}'}"], log))
    res["child_startup"] = startup

    # 1+2. small import vs git add+commit (and cp -r: the cost of creating the files at all),
    # then re-import into the store just filled.
    imp, git, scp, reimp, reimp_nc = [], [], [], [], []
    (work / "git").mkdir()
    (work / "copies").mkdir()
    for i in range(N):
        store = work / "stores" / f"small-{i}"
        stat_cache = work / "stat-cache" / f"small-{i}"
        prep(small)
        imp.append(run_child(["import", f"file://{store}", str(small)], log, stat_cache))
        gitdir = work / "git" / f"small-{i}"
        g = ["git", *GIT_OPTS, f"--git-dir={gitdir}", f"--work-tree={small}"]
        wait_process([*g, "init", "-q"], env=GIT_ENV, stderr_path=log)  # untimed
        prep(small)
        git.append(run_ref([[*g, "add", "-A"], [*g, "commit", "-q", "-m", "x"]], log, GIT_ENV))
        prep(small)
        scp.append(run_ref([["cp", "-r", str(small), str(work / "copies" / f"small-{i}")]], log))
        prep(small)
        reimp.append(run_child(["import", f"file://{store}", str(small)], log, stat_cache))
        assert reimp[-1]["digest"] == imp[-1]["digest"]
        prep(small)
        reimp_nc.append(run_child(["import", f"file://{store}", str(small)], log, None))
        assert reimp_nc[-1]["digest"] == imp[-1]["digest"]
        print(f"  [{i + 1}/{N}] import {imp[-1]['op_s']:.3f} s (wall {imp[-1]['wall_s']:.3f}) | "
              f"git add+commit {git[-1]['wall_s']:.3f} s | cp -r {scp[-1]['wall_s']:.3f} s | "
              f"re-import {reimp[-1]['op_s']:.3f} s (wall {reimp[-1]['wall_s']:.3f}) | "
              f"without stat cache {reimp_nc[-1]['op_s']:.3f} s", flush=True)
    res["import_small"], res["git_commit"], res["reimport_small"] = imp, git, reimp
    res["cp_small"], res["reimport_small_no_stat_cache"] = scp, reimp_nc
    digest = imp[0]["digest"]
    assert all(r["digest"] == digest for r in imp)

    # 3. large import vs cp -r.
    limp, lcp = [], []
    for i in range(N):
        prep(large)
        limp.append(run_child(["import", f"file://{work / 'stores' / f'large-{i}'}", str(large)],
                              log, work / "stat-cache" / f"large-{i}"))
        prep(large)
        lcp.append(run_ref([["cp", "-r", str(large), str(work / "copies" / f"large-{i}")]], log))
        print(f"  [{i + 1}/{N}] large import {limp[-1]['op_s']:.3f} s "
              f"(wall {limp[-1]['wall_s']:.3f}) | cp -r {lcp[-1]['wall_s']:.3f} s", flush=True)
    res["import_large"], res["cp_large"] = limp, lcp

    # 4. checkout by hardlinks vs cp -al vs git checkout.
    (work / "co").mkdir()
    cco, ccp, cgit = [], [], []
    for i in range(N):
        store = work / "stores" / f"small-{i}"
        prep(store)
        dest = work / "co" / f"casframe-{i}"
        cco.append(run_child(["checkout", f"file://{store}", digest, str(dest)], log))
        prep(small)
        ccp.append(run_ref([["cp", "-al", str(small), str(work / "co" / f"cpal-{i}")]], log))
        gitdir = work / "git" / f"small-{i}"
        gdest = work / "co" / f"git-{i}"
        gdest.mkdir()  # untimed: git needs the work tree to exist
        prep(gitdir)
        cgit.append(run_ref([["git", *GIT_OPTS, f"--git-dir={gitdir}", f"--work-tree={gdest}",
                              "checkout", "-q", "-f", "HEAD", "--", "."]], log,
                            {**GIT_ENV, "GIT_INDEX_FILE": str(work / "co" / f"git-{i}.index")}))
        print(f"  [{i + 1}/{N}] checkout {cco[-1]['op_s']:.3f} s (wall {cco[-1]['wall_s']:.3f}) | "
              f"cp -al {ccp[-1]['wall_s']:.3f} s | git checkout {cgit[-1]['wall_s']:.3f} s",
              flush=True)
    res["checkout"], res["cp_al"], res["git_checkout"] = cco, ccp, cgit
    # The three materialisations must hold the same number of files as the source.
    for name in ("casframe-0", "cpal-0", "git-0"):
        found = count_files(work / "co" / name)
        assert found == n_small, f"{name} has {found} files, expected {n_small}"
    res["sync_s"] = prep.sync_s
    res["load"]["end"] = loadavg()

    if args.profile:
        prof = run_dir / "import-small.prof"
        prep(small)
        run_child(["--profile", str(prof), "import", f"file://{work / 'stores' / 'profile'}",
                   str(small)], log, work / "stat-cache" / "profile")
        res["profile_file"] = str(prof)
    return res


# -- report -----------------------------------------------------------------------------------


def summarise(res: dict[str, Any], quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    n = res["small_tree"]["files"]
    imp, git, reimp = res["import_small"], res["git_commit"], res["reimport_small"]
    limp, lcp = res["import_large"], res["cp_large"]
    cco, ccp, cgit = res["checkout"], res["cp_al"], res["git_checkout"]

    def op(runs: list[dict[str, Any]]) -> float:
        return med([r["op_s"] for r in runs])

    def wall(runs: list[dict[str, Any]]) -> float:
        return med([r["wall_s"] for r in runs])

    def pair_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "op_s") -> float:
        """Median over alternating pairs of casframe ``key`` time / reference wall time."""
        return med([x[key] / y["wall_s"] for x, y in zip(a, b, strict=True)])

    def rss(runs: list[dict[str, Any]]) -> float:
        return max(r["peak_rss_mib"] for r in runs)

    rows: list[dict[str, Any]] = []

    def row(**kw: Any) -> None:
        rows.append(kw)

    def verdict(ok: bool, ok_wall: bool | None = None) -> str:
        text = "PASS" if ok else "FAIL"
        if ok_wall is not None and ok_wall != ok:
            text += f" (wall: {'PASS' if ok_wall else 'FAIL'})"
        return text

    r_imp = pair_ratio(imp, git)
    r_imp_w = pair_ratio(imp, git, "wall_s")
    rate = n / op(imp)
    rate_w = n / wall(imp)
    row(op="import small -> empty store", cf=op(imp), cf_wall=wall(imp),
        ref=f"git add+commit {wall(git):.3f}", ratio=r_imp, ratio_wall=r_imp_w,
        thr=f"{rate:,.0f} files/s", rss=rss(imp), target=f"<= {T_IMPORT_RATIO}x git",
        result=verdict(r_imp <= T_IMPORT_RATIO, r_imp_w <= T_IMPORT_RATIO))
    row(op="  (same runs)", target=f">= {T_IMPORT_RATE:,} files/s",
        result=verdict(rate >= T_IMPORT_RATE, rate_w >= T_IMPORT_RATE),
        thr=f"wall {rate_w:,.0f} files/s")
    scp = res.get("cp_small")
    if scp:
        row(op="  (same runs)", ref=f"cp -r {wall(scp):.3f}", ratio=pair_ratio(imp, scp),
            ratio_wall=pair_ratio(imp, scp, "wall_s"), thr=f"cp -r {n / wall(scp):,.0f} files/s",
            target="(floor, no target)", result="-")

    speedup = med([a["op_s"] / b["op_s"] for a, b in zip(imp, reimp, strict=True)])
    speedup_w = med([a["wall_s"] / b["wall_s"] for a, b in zip(imp, reimp, strict=True)])
    row(op="re-import small (all present)", cf=op(reimp), cf_wall=wall(reimp),
        ref=f"first import {op(imp):.3f}", ratio=1 / speedup, ratio_wall=1 / speedup_w,
        thr=f"{n / op(reimp):,.0f} files/s", rss=rss(reimp),
        target=f">= {T_REIMPORT_SPEEDUP:.0f}x faster",
        result=verdict(speedup >= T_REIMPORT_SPEEDUP, speedup_w >= T_REIMPORT_SPEEDUP)
        + f" ({speedup:.2f}x)")

    reimp_nc = res.get("reimport_small_no_stat_cache")
    if reimp_nc:
        speedup_nc = med([a["op_s"] / b["op_s"] for a, b in zip(imp, reimp_nc, strict=True)])
        row(op="  (no stat cache)", cf=op(reimp_nc), cf_wall=wall(reimp_nc),
            ratio=1 / speedup_nc, thr=f"{n / op(reimp_nc):,.0f} files/s", rss=rss(reimp_nc),
            target="(no target)", result=f"- ({speedup_nc:.2f}x)")

    lb = res["large_tree"]["bytes"]
    gbps, gbps_w = lb / op(limp) / 1e9, lb / wall(limp) / 1e9
    r_large = pair_ratio(limp, lcp)
    r_large_w = pair_ratio(limp, lcp, "wall_s")
    row(op=f"import large ({lb / 2**30:.2f} GiB)", cf=op(limp), cf_wall=wall(limp),
        ref=f"cp -r {wall(lcp):.3f}", ratio=r_large, ratio_wall=r_large_w,
        thr=f"{gbps:.2f} GB/s", rss=rss(limp), target=f">= {T_LARGE_GBPS:.0f} GB/s",
        result=verdict(gbps >= T_LARGE_GBPS, gbps_w >= T_LARGE_GBPS))

    r_co = pair_ratio(cco, ccp)
    r_co_w = pair_ratio(cco, ccp, "wall_s")
    row(op="checkout small (hardlinks)", cf=op(cco), cf_wall=wall(cco),
        ref=f"cp -al {wall(ccp):.3f}", ratio=r_co, ratio_wall=r_co_w,
        thr=f"{n / op(cco):,.0f} files/s", rss=rss(cco), target=f"<= {T_CHECKOUT_RATIO}x cp -al",
        result=verdict(r_co <= T_CHECKOUT_RATIO, r_co_w <= T_CHECKOUT_RATIO))
    r_cg = pair_ratio(cco, cgit)
    r_cg_w = pair_ratio(cco, cgit, "wall_s")
    row(op="  (same runs)", ref=f"git checkout {wall(cgit):.3f}", ratio=r_cg, ratio_wall=r_cg_w,
        target="(no target)", result="-")

    all_cf = imp + reimp + res.get("reimport_small_no_stat_cache", []) + limp + cco
    peak = max(r["peak_rss_mib"] for r in all_cf)
    row(op="peak RSS, every casframe op", rss=peak, target=f"< {T_RSS_MIB:.0f} MiB",
        result=verdict(peak < T_RSS_MIB))

    st = res["child_startup"]
    notes = [
        f"child start-up (python + import casframe + open store, no op): wall "
        f"{wall(st):.3f} s, import casframe {med([r['import_casframe_s'] for r in st]):.3f} s, "
        f"open store {med([r['open_store_s'] for r in st]):.3f} s, "
        f"RSS {max(r['peak_rss_mib'] for r in st):.1f} MiB",
        "casframe = in-process time of the operation (median); wall = whole child process; "
        "ratio = median of per-pair ratios (op time / reference wall), ratio(wall) likewise "
        "with the child's wall time; verdicts use op time, '(wall: ...)' shown when it differs",
        f"git: defaults without user/system config, plus {' '.join(GIT_OPTS)}; "
        "git checkout = `git --work-tree=NEW checkout -f HEAD -- .` with a fresh index file",
        f"peak RSS of the references: git add+commit {rss(git):.1f} MiB, cp -r "
        f"{rss(lcp):.1f}, cp -al {rss(ccp):.1f}, git checkout {rss(cgit):.1f}; casframe child "
        f"VmHWM cross-check {max(r['hwm_kib'] for r in all_cf) / 1024:.1f} MiB",
        f"load average (1/5/15 min): start {res['load']['start']}, after generation "
        f"{res['load']['after_generate']}, end {res['load']['end']}",
    ]
    if quick:
        notes.append("--quick: scaled-down trees; the targets are meant for the full run")
    return rows, notes


def print_table(rows: list[dict[str, Any]], notes: list[str], n_repeat: int) -> str:
    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    header = ["operation", "casframe s", "wall s", "reference s", "ratio", "ratio(wall)",
              "throughput", "peak RSS MiB", "target", "result"]
    table = [header]
    for r in rows:
        table.append([
            r["op"], f(r.get("cf"), ".3f"), f(r.get("cf_wall"), ".3f"), r.get("ref", ""),
            f(r.get("ratio"), ".2f") + ("x" if r.get("ratio") is not None else ""),
            f(r.get("ratio_wall"), ".2f") + ("x" if r.get("ratio_wall") is not None else ""),
            r.get("thr", ""), f(r.get("rss"), ".1f"), r["target"], r["result"],
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for k, row in enumerate(table):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"medians of {n_repeat} alternating runs")
    lines += [f"- {n}" for n in notes]
    text = "\n".join(lines)
    print(text)
    return text


def print_profile(path: str) -> str:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(path, stream=out).sort_stats("tottime").print_stats(15)
    text = out.getvalue()
    print("\ncProfile of one small import (all threads, sorted by tottime, top 15):")
    print(text)
    return text


def code_state() -> dict[str, Any]:
    """Which casframe was measured: commit, uncommitted files, hash of the measured sources."""
    import hashlib

    repo = HERE.parent

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True,
                              text=True).stdout.rstrip("\n")

    h = hashlib.sha256()
    for path in sorted([*repo.glob("casframe/*.py"), *repo.glob("plugins/casframe_local/*.py")]):
        h.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "casframe", "plugins").splitlines(),
        "sources_sha256": h.hexdigest()[:16],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 files; 8 x 16 MiB")
    parser.add_argument("--out", type=Path, default=HERE / "out",
                        help="base directory; each run makes a new <timestamp> folder in it")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each operation (median)")
    parser.add_argument("--keep", action="store_true", help="keep trees, stores and checkouts")
    parser.add_argument("--no-sync", action="store_true",
                        help="do not sync dirty pages before each timed operation")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, profile one small import (cProfile)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.out.resolve() / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    print(f"run directory: {run_dir}", flush=True)
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeat": args.repeat,
        "sync_before_each_op": not args.no_sync,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
        "seed": SEED,
        "code": code_state(),
    }
    print(f"casframe at {meta['code']['head']} "
          f"({len(meta['code']['uncommitted'])} uncommitted paths under casframe/ plugins/), "
          f"sources {meta['code']['sources_sha256']}", flush=True)
    start = time.perf_counter()
    try:
        res = measure(args, run_dir)
        rows, notes = summarise(res, args.quick)
        print()
        table = print_table(rows, notes, args.repeat)
        profile = print_profile(res["profile_file"]) if args.profile else None
        meta["total_s"] = time.perf_counter() - start
        (run_dir / "results.json").write_text(json.dumps(
            {"meta": meta, "summary": rows, "notes": notes, "table": table,
             "profile_top15": profile, "raw": res}, indent=2))
        print(f"\nresults: {run_dir / 'results.json'}")
    finally:
        if not args.keep and (run_dir / "work").exists():
            t = time.perf_counter()
            shutil.rmtree(run_dir / "work")
            print(f"deleted bench data in {time.perf_counter() - t:.1f} s "
                  "(file creation on this disk may be slow for minutes after this)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
