"""BuildStream's own client pushing to and pulling from `casframe serve`, against the server
that client was made for, on the same machine, alternating.

    .venv/bin/python bench/buildstream_bench.py [--quick] [--repeat N] [--out DIR] [--keep]
                                                [--elements small,large] [--generations 1.6.9]

The trees are those of bench/run.py (small: 20,000 files of 1-8 KiB; large: 8 files of 128 MiB,
1 GiB; --quick: 2,000 files and 8 x 16 MiB), each the whole content of one `import` element
with a `local` source. The client is BuildStream 1.6.9 from scripts/test-prereqs (see
docs/buildstream.md); the servers are `casframe serve` (python -m casframe.server over a new
file:// store) and 1.6.9's own `bst-artifact-server --enable-push` (over a new directory).

BuildStream 2 has no peer here: BuildGrid 0.9.1 has no Remote Asset service, which BuildStream
2 needs for its artifact index, and casframe will not index content another server holds (it
refuses a push whose references it does not store), so no configuration splits one artifact
between the two. `--generations 2.8.1` still times 2.8.1 against casframe alone (`tar`
sources from a file:// origin, so that a pull must bring every file).

One machine ("builder") builds each element once without any remote (untimed). Then each
repetition, for each element, for each server in turn (the order alternates between
repetitions): a new, empty server is started (untimed); `push` from the builder is timed; a new
machine with an empty cache times `pull`; and `show` on a third empty machine times what every
bst command pays anyway (start-up, loading, cache keys: for 1.x `local` sources that includes
hashing every file). Every timed command runs after `sync`. Reported: medians of wall times,
the median of the per-repetition ratios (the other server's time / casframe's), and the CPU
seconds of the client and of each server during each command; the other server's time over
the client's CPU time bounds the ratio any server could reach (the client's own work). Target:
casframe at least 2x faster than bst-artifact-server on every row. Results go to
DIR/<time>-buildstream/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import FULL, QUICK, build_large, build_small, loadavg  # noqa: E402 - run.py's trees

PREREQS = Path(os.environ.get("CASFRAME_PREREQS") or Path.home() / ".cache/casframe-prereqs")
_START_TIMEOUT = 120.0
_BST_TIMEOUT = 3600

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not listen within {_START_TIMEOUT}s")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server(str):
    """A running server's URL; ``cpu()`` reads the CPU time its process has used so far."""

    pid: int

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


@contextmanager
def running(cmd: list[str], port: int, log: Path, cwd: Path | None = None) -> Any:
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_for_port(process, port, log)
        server = Server(f"http://127.0.0.1:{port}")
        server.pid = process.pid
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def casframe_server(store: Path, log: Path) -> AbstractContextManager[str]:
    port = free_port()
    # One process, whose CPU seconds are those of the server.
    return running([sys.executable, "-m", "casframe.server", store.as_uri(),
                    "--listen", f"127.0.0.1:{port}", "--workers", "1"], port, log)


def bst_artifact_server(store: Path, log: Path) -> AbstractContextManager[str]:
    port = free_port()
    exe = PREREQS / "buildstream-1.6.9" / "bin" / "bst-artifact-server"
    return running([str(exe), "--port", str(port), "--enable-push", str(store)], port, log)


class Bst:
    """One BuildStream client version and one machine's caches."""

    def __init__(self, version: str, root: Path) -> None:
        self.version = version
        self.exe = PREREQS / f"buildstream-{version}" / "bin" / "bst"
        if not self.exe.exists():
            raise SystemExit(f"{self.exe} is missing: run scripts/test-prereqs")
        self.root = root
        root.mkdir(parents=True)

    def run(self, project: Path, config: str, *args: str) -> float:
        return self.timed(project, config, *args)[0]

    def timed(self, project: Path, config: str, *args: str) -> tuple[float, float]:
        """Wall time and the client's own CPU time (user + system, from os.wait4)."""
        (self.root / "user.conf").write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        env.update(HOME=str(self.root), XDG_CACHE_HOME=str(self.root / "cache"),
                   XDG_CONFIG_HOME=str(self.root / "config"),
                   XDG_DATA_HOME=str(self.root / "data"))
        subprocess.run(["sync"], check=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(
            [str(self.exe), "--no-interactive", "-c", str(self.root / "user.conf"), *args],
            cwd=project, env=env, capture_output=True, text=True, timeout=_BST_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        elapsed = time.perf_counter() - started
        # bst and the job processes it forks and reaps, all counted once it has been reaped.
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise RuntimeError(f"bst {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return elapsed, cpu


def remote_config(version: str, remote: str | None) -> str:
    if remote is None:
        return "{}\n"
    if version.startswith("1."):
        return f"artifacts:\n  url: {remote}\n  push: true\n"
    return f"artifacts:\n  servers:\n  - url: {remote}\n    push: true\n"


def write_project(path: Path, version: str, trees: dict[str, Path]) -> None:
    origin = path.parent / "origin"
    (path / "elements").mkdir(parents=True, exist_ok=True)
    origin.mkdir(exist_ok=True)
    conf = "name: bench\nelement-path: elements\n"
    if not version.startswith("1."):
        conf += f"min-version: 2.0\naliases:\n  origin: {origin.as_uri()}/\n"
    (path / "project.conf").write_text(conf)
    for element, tree in trees.items():
        if version.startswith("1."):
            source = f"- kind: local\n  path: {tree}\n"
        else:
            tarball = origin / f"{element}.tar"
            if not tarball.exists():
                with tarfile.open(tarball, "w") as archive:
                    archive.add(tree, arcname=element)
            digest = subprocess.run(["sha256sum", str(tarball)], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
            source = f"- kind: tar\n  url: origin:{element}.tar\n  ref: {digest}\n"
        (path / "elements" / f"{element}.bst").write_text(f"kind: import\nsources:\n{source}")


def commands(version: str) -> tuple[list[str], list[str]]:
    if version.startswith("1."):
        return ["push"], ["pull"]
    return ["artifact", "push"], ["artifact", "pull"]


def measure_generation(version: str, servers: dict[str, Any], trees: dict[str, Path],
                       work: Path, repeat: int) -> list[dict[str, Any]]:
    if version.startswith("1."):
        # A 1.x local source must lie inside its project: the trees' folder is the project.
        project = next(iter(trees.values())).parent
        write_project(project, version, {name: Path(tree.name) for name, tree in trees.items()})
    else:
        project = work / f"project-{version}"
        write_project(project, version, trees)
    builder = Bst(version, work / f"builder-{version}")
    for element in trees:
        builder.run(project, remote_config(version, None), "build", f"{element}.bst")
    push, pull = commands(version)
    rows = []
    for element in trees:
        for rep in range(repeat):
            order = list(servers) if rep % 2 == 0 else list(reversed(servers))
            for name in order:
                tag = f"{version}-{element}-{name}-{rep}"
                with servers[name](work / f"store-{tag}", work / f"server-{tag}.log") as remote:
                    conf = remote_config(version, remote)
                    cpu = remote.cpu()
                    pushed, push_client = builder.timed(project, conf, *push, f"{element}.bst")
                    push_server, cpu = remote.cpu() - cpu, remote.cpu()
                    puller = Bst(version, work / f"puller-{tag}")
                    pulled, pull_client = puller.timed(project, conf, *pull, f"{element}.bst")
                    pull_server = remote.cpu() - cpu
                    shown = Bst(version, work / f"shower-{tag}").run(project, conf, "show",
                                                                     f"{element}.bst")
                rows.append({"version": version, "element": element, "server": name,
                             "rep": rep, "push_s": pushed, "pull_s": pulled, "show_s": shown,
                             "push_client_cpu_s": push_client, "push_server_cpu_s": push_server,
                             "pull_client_cpu_s": pull_client, "pull_server_cpu_s": pull_server,
                             "loadavg": loadavg()})
                print(f"{tag}: push {pushed:.2f}s (cpu client {push_client:.2f}s server "
                      f"{push_server:.2f}s) pull {pulled:.2f}s (cpu client {pull_client:.2f}s "
                      f"server {pull_server:.2f}s) show {shown:.2f}s load {loadavg()}",
                      flush=True)
                # The large element's store and caches are few files: free the disk now.
                if element == "large":
                    shutil.rmtree(work / f"store-{tag}", ignore_errors=True)
                    shutil.rmtree(work / f"puller-{tag}", ignore_errors=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    keys = sorted({(r["version"], r["element"]) for r in rows})
    for version, element in keys:
        subset = [r for r in rows if r["version"] == version and r["element"] == element]
        other = next((r["server"] for r in subset if r["server"] != "casframe"), "casframe")
        for what in ("push_s", "pull_s"):
            ours = {r["rep"]: r[what] for r in subset if r["server"] == "casframe"}
            theirs = {r["rep"]: r[what] for r in subset if r["server"] == other}
            peer = other != "casframe"
            ratios = [theirs[rep] / ours[rep] for rep in ours if rep in theirs]
            table.append({
                "version": version, "element": element, "operation": what[:-2],
                "casframe_s": statistics.median(ours.values()),
                "other": other if peer else None,
                "other_s": statistics.median(theirs.values()) if peer else None,
                "ratio": statistics.median(ratios) if peer else None,
                "show_s": statistics.median(r["show_s"] for r in subset),
                # CPU seconds of the client (bst and its jobs) and of each server. The client's
                # is its own work, whichever server answers: a server that cost nothing and
                # answered at once would leave at least that, so `other_s / client_cpu_s`
                # bounds the ratio any server could reach in this run.
                "client_cpu_s": statistics.median(r[f"{what[:-2]}_client_cpu_s"]
                                                  for r in subset),
                "casframe_cpu_s": statistics.median(
                    r[f"{what[:-2]}_server_cpu_s"] for r in subset if r["server"] == "casframe"),
                "other_cpu_s": statistics.median(
                    r[f"{what[:-2]}_server_cpu_s"] for r in subset if r["server"] == other)
                if peer else None,
                "loadavg_1m": [r["loadavg"][0] for r in subset],
            })
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    print(f"\n{'client':8} {'element':7} {'op':5} {'casframe':>9} {'peer':>20} "
          f"{'peer/casframe':>13} {'bst show':>9} {'client cpu':>10} {'server cpu':>17} "
          f"{'ceiling':>8}")
    for row in table:
        peer = (f"{row['other']:>10} {row['other_s']:8.2f}s {row['ratio']:12.2f}x"
                if row["other"] else f"{'-':>20} {'-':>13}")
        theirs = f"{row['other_cpu_s']:.2f}" if row["other"] else "-"
        ceiling = (f"{row['other_s'] / row['client_cpu_s']:7.2f}x" if row["other"]
                   else f"{'-':>8}")
        print(f"{row['version']:8} {row['element']:7} {row['operation']:5} "
              f"{row['casframe_s']:8.2f}s {peer} {row['show_s']:8.2f}s "
              f"{row['client_cpu_s']:9.2f}s {row['casframe_cpu_s']:7.2f}s / {theirs:>6}s "
              f"{ceiling}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--generations", default="1.6.9")
    parser.add_argument("--elements", default="small,large",
                        help="which trees to measure (small, large or both)")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    run_dir = args.out / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-buildstream")
    work = run_dir / "work"
    work.mkdir(parents=True)
    trees = {name: work / "trees" / name for name in args.elements.split(",")}
    if "small" in trees:
        trees["small"].mkdir(parents=True)
        build_small(trees["small"], shape["small_files"], shape["small_dirs"])
    if "large" in trees:
        build_large(trees["large"], shape["large_files"], shape["large_size"])
    peers: dict[str, dict[str, Any]] = {
        "1.6.9": {"casframe": casframe_server, "bst-artifact-server": bst_artifact_server},
        "2.8.1": {"casframe": casframe_server},
    }
    rows: list[dict[str, Any]] = []
    try:
        for version in args.generations.split(","):
            rows += measure_generation(version, peers[version], trees, work, args.repeat)
    finally:
        table = summarise(rows) if rows else []
        (run_dir / "results.json").write_text(json.dumps(
            {"rows": rows, "table": table, "quick": args.quick, "repeat": args.repeat},
            indent=2))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(table)
    print(f"results: {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
