"""casframe's s3:// backend against moto's S3 server on loopback, in one run.

    .venv/bin/python bench/s3_bench.py [--out DIR] [--repeat N] [--files N] [--big-mib N] [--keep]
                                       [--skip-push] [--baseline CHECKOUT]

Starts moto's server in its own process (so it shares neither the GIL nor the memory of what is
measured), builds the data in a new directory DIR/s3-<timestamp>/, then measures in alternating
pairs (A B A B ...; the large uploads in a rotating order), the server reset and the bucket made
anew before every run:

* push of N files of 4 KiB from a local file:// store to s3://  vs  ``aws s3 sync`` of the same
  files to the same server (another prefix): wall time of each command, ratio at most 1.0;
* upload of one large blob (256 MiB)  vs  boto3's own ``upload_file``, throughput ratio at
  least 0.9, each timed inside its process around the upload call: with ``Store.put_file``
  (the file is hashed, then sent to its key while it is read again and verified), and pushed
  from a local store (sent while it is read from the source and verified). Each is measured
  with both checksum settings and compared with ``upload_file`` under the same one:
  casframe's default ``request_checksum_calculation=when_required`` (no part checksums, the
  setting that keeps older S3-compatible servers working) against boto3 configured alike, and
  ``when_supported`` (CRC32 part checksums) against boto3 as it ships. The setting changes
  the server's work, not only the client's: moto's server, given parts without checksums,
  computes a checksum of the whole object at CompleteMultipartUpload (0.6-0.8 s more for
  256 MiB), so only runs with the same setting compare the clients;
* peak memory of each casframe run (a child process): below 100 MiB.

``--baseline CHECKOUT`` (e.g. made with ``git worktree add /tmp/base main``) measures casframe
from that checkout too, in the same rotation, so a change is compared within one run.
``--skip-push`` leaves out the small files.

Each measured command runs in a child process; its peak RSS comes from ``os.wait4`` (which also
counts what the small parent had mapped before exec) and from the child's own ``VmHWM``.
Prints a table with the S3 backend's targets and writes results.json into the run directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20
SEED = 20240613
BUCKET = "bench"

T_PUSH_RATIO = 1.0  # casframe push / aws s3 sync, wall time, at most
T_UPLOAD_RATIO = 0.9  # casframe throughput / boto3 upload_file throughput, at least
T_RSS_MIB = 100.0
# What boto3 does by default: a CRC32 checksum with each part, which the server checks and
# combines (without one, moto's server computes a whole-object checksum at completion).
CRC32_OPTION = "&request_checksum_calculation=when_supported"

# Fake credentials, no AWS configuration, no instance metadata: nothing leaves loopback.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_PAGER": "",
}

SERVER_CODE = """
import logging, threading
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
threading.Event().wait()
"""


# -- children (run as `s3_bench.py --child KIND ...`) ---------------------------------------------


def _peak_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


class _Calls:
    """When each S3 operation of a client started and ended, to tell where an upload's time goes."""

    def __init__(self, client: Any) -> None:
        self.spans: dict[str, list[list[float]]] = {}
        self._open: dict[tuple[int, str], list[float]] = {}
        client.meta.events.register("before-call.s3", self._before)
        client.meta.events.register("after-call.s3", self._after)

    def _before(self, event_name: str, **_: Any) -> None:
        import threading

        span = [time.perf_counter(), 0.0]
        operation = event_name.rsplit(".", 1)[1]
        self._open[(threading.get_ident(), operation)] = span
        self.spans.setdefault(operation, []).append(span)

    def _after(self, event_name: str, **_: Any) -> None:
        import threading

        span = self._open.pop((threading.get_ident(), event_name.rsplit(".", 1)[1]), None)
        if span is not None:
            span[1] = time.perf_counter()

    def phases(self, start: float) -> dict[str, float]:
        """Seconds: before the first request (hashing), sending the parts (first start to
        last end), completing the upload, and copying objects onto themselves (touch)."""
        first = min((s[0] for spans in self.spans.values() for s in spans), default=start)
        parts = self.spans.get("UploadPart", [])
        return {
            "before_first_request_s": first - start,
            "parts_s": max(s[1] for s in parts) - min(s[0] for s in parts) if parts else 0.0,
            "complete_s": sum(s[1] - s[0] for s in self.spans.get("CompleteMultipartUpload", [])),
            "touch_s": sum(s[1] - s[0] for s in self.spans.get("CopyObject", [])),
        }


def child(kind: str, args: list[str]) -> None:
    report: dict[str, Any]
    if kind == "push":
        from casframe import open_store

        source_url, dest_url = args
        with open_store(source_url) as source, open_store(dest_url) as dest:
            start = time.perf_counter()
            result = source.push(dest, "bench")
            op = time.perf_counter() - start
        report = {"op_s": op, "blobs_sent": result.blobs_sent}
    elif kind == "put":
        from casframe import open_store

        url, path = args
        with open_store(url) as store:
            calls = _Calls(store.blobs.client)  # type: ignore[attr-defined]
            start = time.perf_counter()
            digest = store.put_file(path)
            op = time.perf_counter() - start
        report = {"op_s": op, "digest": str(digest), **calls.phases(start)}
    elif kind == "push-big":
        from casframe import open_store

        source_url, dest_url = args
        with open_store(source_url) as source, open_store(dest_url) as dest:
            calls = _Calls(dest.blobs.client)  # type: ignore[attr-defined]
            start = time.perf_counter()
            result = source.push(dest, "big")
            op = time.perf_counter() - start
        report = {"op_s": op, "bytes_sent": result.bytes_sent, **calls.phases(start)}
    elif kind in ("boto3", "boto3-required"):
        import boto3
        from botocore.config import Config

        endpoint, path, key = args
        checksums = "when_required" if kind == "boto3-required" else "when_supported"
        client = boto3.client(
            "s3", endpoint_url=endpoint, config=Config(request_checksum_calculation=checksums)
        )
        calls = _Calls(client)
        start = time.perf_counter()
        client.upload_file(path, BUCKET, key)
        op = time.perf_counter() - start
        report = {"op_s": op, **calls.phases(start)}
    else:
        raise SystemExit(f"unknown child {kind}")
    report["vmhwm_kib"] = _peak_kib()
    print(json.dumps(report))


# -- helpers --------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak RSS (os.wait4) and the child's JSON report if it prints one."""
    with open(log, "ab") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.stdout.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; see {log}")
    lines = out.decode().strip().splitlines()
    report: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    report.update(wall_s=wall, maxrss_mib=usage.ru_maxrss / 1024)
    if "vmhwm_kib" in report:
        report["vmhwm_mib"] = report.pop("vmhwm_kib") / 1024
    return report


class Server:
    """moto's server in a child process on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE], env=env, stdout=subprocess.PIPE, stderr=self._log
        )
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"moto's server did not start; see {log}")
        self.endpoint = f"http://127.0.0.1:{int(port)}"

    def fresh_bucket(self) -> None:
        """Forget everything (so each run meets the same server) and make the bucket again."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=60):
            pass
        request = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")
        request.add_header("Authorization", "AWS4-HMAC-SHA256 Credential=bench/x/us-east-1/s3/aws4")
        with urllib.request.urlopen(request, timeout=60):
            pass

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


def build_files(root: Path, count: int, size: int) -> None:
    rng = random.Random(SEED)
    for i in range(count):
        folder = root / f"d{i % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:05d}.dat").write_bytes(rng.randbytes(size))


def build_big(path: Path, size: int) -> None:
    rng = random.Random(SEED + 1)
    with open(path, "wb") as f:
        for offset in range(0, size, 4 * MiB):
            f.write(rng.randbytes(min(4 * MiB, size - offset)))


def warm(path: Path) -> None:
    buf = bytearray(MiB)
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-size", type=int, default=4096)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--skip-push", action="store_true", help="measure the large upload only")
    parser.add_argument(
        "--baseline", type=Path, help="another casframe checkout to measure in the same run"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.child[0], opts.child[1:])
        return

    aws = shutil.which("aws")
    if aws is None:
        raise SystemExit("the AWS CLI is needed for the reference: apt-get install -y awscli")
    run_dir = opts.out / f"s3-{dt.datetime.now():%Y%m%d-%H%M%S}"
    data = run_dir / "data"
    logs = run_dir / "logs"
    data.mkdir(parents=True)
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
    base_env = dict(env)
    if opts.baseline:
        base = opts.baseline.resolve()
        base_env["PYTHONPATH"] = os.pathsep.join([str(base), str(base / "plugins")])
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    load_before = loadavg()

    print(f"building {opts.files} files of {opts.file_size} B and one {opts.big_mib} MiB file …")
    files = data / "files"
    build_files(files, opts.files, opts.file_size)
    big_dir = data / "big"
    big_dir.mkdir()
    big = big_dir / "big.bin"
    build_big(big, opts.big_mib * MiB)
    local_url = f"file://{data / 'local'}"
    importer = (
        "import sys; from casframe import open_store\n"
        "with open_store(sys.argv[1]) as s:\n"
        "    s.set_ref(sys.argv[3], s.import_directory(sys.argv[2]))"
    )
    for folder, ref in ((files, "bench"), (big_dir, "big")):
        subprocess.run(
            [sys.executable, "-c", importer, local_url, str(folder), ref], env=env, check=True
        )

    server = Server(env, logs / "moto.log")
    aws_version = subprocess.run([aws, "--version"], capture_output=True, text=True, env=env)
    big_kinds = ["put", "push_big", "put_crc32", "push_crc32", "boto3", "boto3_required"]
    # Each casframe variant against upload_file with the same checksum setting.
    reference = {"put": "boto3_required", "push_big": "boto3_required", "put_crc32": "boto3",
                 "push_crc32": "boto3", "boto3": "boto3", "boto3_required": "boto3"}
    if opts.baseline:
        big_kinds += ["put_base", "push_big_base"]
    kinds = ["push", "sync", *big_kinds]
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}

    def measure(kind: str, cmd: list[str], warm_path: Path) -> dict[str, Any]:
        server.fresh_bucket()
        warm(warm_path)
        child_env = base_env if kind.endswith("_base") else env
        results[kind].append(run(cmd, child_env, logs / f"{kind}.log"))
        return results[kind][-1]

    try:
        for i in range(0 if opts.skip_push else opts.repeat):
            dest = f"s3://{BUCKET}/cas{i}?endpoint_url={server.endpoint}"
            push = measure("push", [*me, "push", local_url, dest], data / "local")
            sync = [
                aws,
                "s3",
                "sync",
                "--only-show-errors",
                str(files),
                f"s3://{BUCKET}/aws{i}/",
                "--endpoint-url",
                server.endpoint,
            ]
            synced = measure("sync", sync, files)
            print(f"  push {push['wall_s']:.2f} s   aws s3 sync {synced['wall_s']:.2f} s")
        for i in range(opts.repeat):
            url = f"s3://{BUCKET}/big{i}?endpoint_url={server.endpoint}"
            uploads = {
                "put": ([*me, "put", url, str(big)], big),
                "put_crc32": ([*me, "put", url + CRC32_OPTION, str(big)], big),
                "push_crc32": ([*me, "push-big", local_url, url + CRC32_OPTION], data / "local"),
                "push_big": ([*me, "push-big", local_url, url], data / "local"),
                "boto3": ([*me, "boto3", server.endpoint, str(big), f"b{i}"], big),
                "boto3_required": (
                    [*me, "boto3-required", server.endpoint, str(big), f"r{i}"], big
                ),
            }
            if opts.baseline:
                uploads["put_base"] = uploads["put"]
                uploads["push_big_base"] = uploads["push_big"]
                reference["put_base"] = reference["push_big_base"] = "boto3_required"
            # A different order each round, so no variant always follows the same one.
            order = list(uploads)
            order = order[i % len(order) :] + order[: i % len(order)]
            times = {kind: measure(kind, *uploads[kind])["op_s"] for kind in order}
            print("  " + "   ".join(f"{kind} {times[kind]:.2f} s" for kind in order))
    finally:
        server.stop()
    load_after = loadavg()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    big_bytes = opts.big_mib * MiB
    rate = {k: big_bytes / median(k, "op_s") / 1e6 for k in big_kinds}
    ratio = {k: rate[k] / rate[reference[k]] for k in rate}
    # The same ratio within each round (the variants ran minutes apart at most), then the median.
    round_ratio = {
        k: statistics.median(
            ref["op_s"] / mine["op_s"]
            for mine, ref in zip(results[k], results[reference[k]], strict=True)
        )
        for k in big_kinds
    }
    rss = {
        k: max(max(r["maxrss_mib"], r.get("vmhwm_mib", 0.0)) for r in results[k])
        for k in kinds
        if results[k]
    }

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    def upload_row(kind: str, label: str) -> tuple[str, str, str]:
        ok = ratio[kind] >= T_UPLOAD_RATIO
        alike = "boto3 alike" if reference[kind] == "boto3_required" else "boto3"
        return (
            label,
            f"{rate[kind]:.0f} MB/s",
            f"{ratio[kind]:.2f}× {alike} (≥ {T_UPLOAD_RATIO})  {verdict(ok)}; "
            f"per round {round_ratio[kind]:.2f}×",
        )

    def rss_row(kind: str, label: str) -> tuple[str, str, str]:
        return (
            label,
            f"{rss[kind]:.0f} MiB",
            f"< {T_RSS_MIB:.0f}  {verdict(rss[kind] < T_RSS_MIB)}",
        )

    aws_name = aws_version.stdout.split()[0] if aws_version.stdout else "aws"
    n = f"{opts.files:,} × {opts.file_size // 1024} KiB"
    rows = []
    summary_push: dict[str, float] = {}
    if not opts.skip_push:
        push_wall, sync_wall = median("push", "wall_s"), median("sync", "wall_s")
        push_ratio = push_wall / sync_wall
        summary_push = {
            "push_wall_s": push_wall,
            "sync_wall_s": sync_wall,
            "push_ratio": push_ratio,
        }
        rows += [
            (
                f"push {n}, casframe (wall)",
                f"{push_wall:.2f} s",
                f"in-process {median('push', 'op_s'):.2f} s",
            ),
            (f"aws s3 sync {n} (wall)", f"{sync_wall:.2f} s", aws_name),
            (
                "  ratio casframe / aws",
                f"{push_ratio:.2f}",
                f"≤ {T_PUSH_RATIO}  {verdict(push_ratio <= T_PUSH_RATIO)}",
            ),
        ]
    rows += [
        (f"boto3 upload_file {opts.big_mib} MiB", f"{rate['boto3']:.0f} MB/s",
         "reference: as shipped (when_supported, CRC32 part checksums)"),
        upload_row("put_crc32", f"casframe put {opts.big_mib} MiB, when_supported"),
        upload_row("push_crc32", f"casframe push {opts.big_mib} MiB from file://, when_supported"),
        (f"boto3 upload_file {opts.big_mib} MiB, when_required",
         f"{rate['boto3_required']:.0f} MB/s",
         "reference 'boto3 alike': casframe's default checksum setting"),
        upload_row("put", f"casframe put {opts.big_mib} MiB (default)"),
        upload_row("push_big", f"casframe push {opts.big_mib} MiB from file:// (default)"),
    ]
    if opts.baseline:
        rows += [
            upload_row("put_base", "  put, baseline checkout"),
            upload_row("push_big_base", "  push, baseline checkout"),
        ]
    if not opts.skip_push:
        rows.append(rss_row("push", "peak RSS, casframe push of the small files"))
    rows += [
        rss_row("put", "peak RSS, casframe put"),
        rss_row("push_big", "peak RSS, casframe push of the large blob"),
        rss_row("put_crc32", "peak RSS, put with CRC32 part checksums"),
        rss_row("push_crc32", "peak RSS, push with CRC32 part checksums"),
        ("peak RSS, boto3 upload_file", f"{rss['boto3']:.0f} MiB", "reference"),
        ("peak RSS, boto3 upload_file, when_required", f"{rss['boto3_required']:.0f} MiB",
         "reference"),
    ]
    if opts.baseline:
        rows += [
            rss_row("put_base", "peak RSS, put, baseline checkout"),
            rss_row("push_big_base", "peak RSS, push, baseline checkout"),
        ]
    if not opts.skip_push:
        rows.append(("peak RSS, aws s3 sync", f"{rss['sync']:.0f} MiB", "reference"))
    width = max(len(r[0]) for r in rows)
    print(f"\nmedians of {opts.repeat} runs; load average {load_before} → {load_after}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    phases = ("op_s", "before_first_request_s", "parts_s", "complete_s", "touch_s")
    phase_medians = {
        k: {p: statistics.median(r.get(p, 0.0) for r in results[k]) for p in phases}
        for k in big_kinds
        if all("parts_s" in r for r in results[k])
    }
    if phase_medians:
        print("\nwhere the large upload's time goes (medians, s): total, before the first request")
        print("(hashing), sending the parts, CompleteMultipartUpload, touching (CopyObject)")
        for k, values in phase_medians.items():
            print(f"  {k:<14}" + "".join(f"{values[p]:>8.2f}" for p in phases))

    summary = {
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "options": {k: str(v) for k, v in vars(opts).items() if k != "child"},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "aws_cli": aws_version.stdout.strip(),
        **summary_push,
        "upload_mb_s": rate,
        "upload_reference": reference,
        "upload_ratio_to_boto3": ratio,
        "upload_ratio_to_boto3_per_round": round_ratio,
        "upload_phases_s": phase_medians,
        "peak_rss_mib": rss,
        "runs": results,
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nresults: {run_dir / 'results.json'}")
    if not opts.keep:
        shutil.rmtree(data)


if __name__ == "__main__":
    main()
