"""The ops recipe of ``examples/ops/``, run end to end as its README tells a person to.

moto's S3 server stands in for the bucket. Every step goes through the real ``casframe``
command and the recipe's own scripts, in subprocesses, each "machine" with its own home,
configuration file and cache directory. The configuration file and the ``.bazelrc`` lines are
the README's own (only the bucket and the addresses are changed), so the recipe cannot drift
from what is tested:

1. CI stores builds straight into S3 with ``ci-push.sh``: a release from a tag pipeline, then
   three builds of ``main`` that share most of their files; one is promoted with ``ref cp``;
2. a deploy machine fetches two builds with ``fetch.sh``: the files are identical, and the
   second download brings only what the first did not;
3. ``casframe serve`` over the bucket is Bazel's remote cache: a second build from a fresh
   output base takes every action from the cache;
4. ``nightly-gc.sh`` under a quota expires the least recently used CI build, keeps the older
   ``release/*`` ref and verifies the store; the builds kept still fetch and check out on a new
   machine, the expired one does not.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bazel_helpers import ACTIONS, build, process_summary, write_workspace

from casframe import Digest, layout
from casframe.testing import assert_tree_equal, random_bytes, write_tree
from casframe.testing.s3 import S3TestBucket

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "ops"
CASFRAME = Path(sys.executable).parent / "casframe"  # the console script, as installed

APP_SIZE = 256 * 1024  # each build's own binary: what one more build adds to the bucket


# -- the README's own configuration ---------------------------------------------------------


def readme_blocks() -> list[tuple[str, str]]:
    """Every fenced block of the recipe's README, as (info string, text)."""
    blocks: list[tuple[str, str]] = []
    info: str | None = None
    lines: list[str] = []
    for line in (RECIPE / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if info is None:
                info, lines = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(lines) + "\n"))
                info = None
        elif info is not None:
            lines.append(line)
    return blocks


def readme_block(info: str, containing: str) -> str:
    """The README's first ``info`` block containing ``containing``."""
    for block_info, text in readme_blocks():
        if block_info == info and containing in text:
            return text
    raise AssertionError(f"examples/ops/README.md has no ```{info} block with {containing!r}")


def store_config(bucket: S3TestBucket) -> tuple[str, str]:
    """The README's configuration file pointed at ``bucket`` on moto's server, and the key
    prefix of the store in the bucket."""
    readme = tomllib.loads(readme_block("toml", "[stores.artifacts]"))
    entry = readme["stores"]["artifacts"]
    match = re.fullmatch(r"s3://[^/]+/([^?]+)", entry["url"])
    assert match, entry["url"]
    prefix = match.group(1)
    options: dict[str, Any] = {
        **entry.get("options", {}),
        "endpoint_url": bucket.endpoint_url,
        "region": "us-east-1",  # moto's
    }
    lines = [
        "[stores.artifacts]",
        f'url = "s3://{bucket.name}/{prefix}"',
        "",
        "[stores.artifacts.options]",
        *(f"{key} = {json.dumps(value)}" for key, value in options.items()),
    ]
    return "\n".join(lines) + "\n", prefix


def bazelrc(port: int) -> str:
    """The README's ``.bazelrc`` lines, with the cache server's address replaced."""
    lines = readme_block("", "--remote_cache=grpc://")
    return re.sub(r"grpc://\S+", f"grpc://127.0.0.1:{port}", lines)


# -- machines, builds and the cache server --------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """One machine of the recipe: its own home, casframe configuration and cache."""

    home: Path
    env: dict[str, str]

    def run(
        self, command: list[str | Path], *, expect: int = 0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(part) for part in command],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == expect, (
            f"{command} exited with {result.returncode}, not {expect}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
        return result

    def casframe(self, *args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
        return self.run([CASFRAME, *args], expect=expect)

    def script(
        self, name: str, *args: str | Path, expect: int = 0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return self.run([RECIPE / name, *args], expect=expect, **env)

    def refs(self) -> list[str]:
        """The shared store's refs, least recently used first."""
        listed = json.loads(self.casframe("--store", "artifacts", "ref", "list", "--json").stdout)
        return [ref["name"] for ref in listed]


def new_machine(home: Path, config: str, *, config_env: bool = True) -> Machine:
    """A machine whose casframe configuration is ``config``: in the file ``$CASFRAME_CONFIG``
    names (as on CI and servers), or else in the user's config directory (a workstation)."""
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASFRAME", "XDG_"))}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        PATH=f"{CASFRAME.parent}{os.pathsep}{env.get('PATH', os.defpath)}",
    )
    if config_env:
        path = home / "etc" / "casframe.toml"
        env["CASFRAME_CONFIG"] = str(path)
    else:
        path = home / ".config" / "casframe" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(config)
    return Machine(home, env)


def app_bytes(seed: int) -> bytes:
    return random_bytes(APP_SIZE, seed=seed)


def build_output(root: Path, version: str, seed: int) -> Path:
    """A build's output: the same sources in every build (casframe's sample tree), plus a
    version file and a binary of its own."""
    write_tree(root)
    (root / "VERSION").write_text(f"{version}\n")
    app = root / "bin" / "app"
    app.write_bytes(app_bytes(seed))
    app.chmod(0o755)
    return root


def stored_objects(bucket: S3TestBucket, prefix: str) -> int:
    """How many blobs the store keeps in the bucket."""
    return sum(key.startswith(f"{prefix}/objects/") for key in bucket.keys())


def object_key(prefix: str, data: bytes) -> str:
    """Where the store keeps the blob ``data`` in the bucket."""
    digest = Digest.of_bytes(data)
    return f"{prefix}/{layout.object_key(digest)}"


@contextlib.contextmanager
def serving(machine: Machine, log: Path) -> Iterator[int]:
    """``casframe serve artifacts`` on a free loopback port, as the README's unit runs it;
    yields the port, and stops the server with SIGTERM, as systemd does."""
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [str(CASFRAME), "serve", "artifacts", "--listen", "127.0.0.1:0"],
            env=machine.env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert process.stdout is not None
        try:
            line = process.stdout.readline()
            match = re.fullmatch(r"casframe: serving s3://\S+ on 127\.0\.0\.1:(\d+)\n", line)
            assert match, line + log.read_text()
            yield int(match.group(1))
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
    assert "Traceback" not in log.read_text()


# -- the recipe -------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_the_recipe_end_to_end(bazel: str, s3_server_bucket: S3TestBucket, tmp_path: Path) -> None:
    config, prefix = store_config(s3_server_bucket)
    builds = tmp_path / "builds"

    # 1. CI: a tag pipeline stores a release, then three builds of main go straight to S3.
    ci = new_machine(tmp_path / "ci", config)
    outputs = {"release/1.0": build_output(builds / "v1.0", "1.0", seed=10)}
    ci.script("ci-push.sh", outputs["release/1.0"], REF="release/1.0")
    uploaded = []
    for number in (1001, 1002, 1003):
        ref = f"ci/main/{number}"
        outputs[ref] = build_output(builds / str(number), f"main {number}", seed=number)
        before = stored_objects(s3_server_bucket, prefix)
        pushed = ci.script("ci-push.sh", outputs[ref], BRANCH="main", BUILD_ID=str(number))
        assert re.fullmatch(r"[0-9a-f]{64}/\d+\n", pushed.stdout), pushed.stdout
        assert f"ci-push: stored {ref}" in pushed.stderr
        assert f"{prefix}/refs/heads/{ref}" in s3_server_bucket.keys()
        uploaded.append(stored_objects(s3_server_bucket, prefix) - before)
    # Each build uploads only what changed: VERSION, bin/app and the two Directories above them.
    assert uploaded == [4, 4, 4]
    # No local store on the CI runner: only the small stat cache of the import, and the
    # installed plugins' entry points remembered by the commands.
    cached = {p.name for p in (ci.home / ".cache" / "casframe").iterdir()}
    assert {"stat-cache"} <= cached <= {"stat-cache", "entry-points"}, cached
    ci.casframe("--store", "artifacts", "ref", "cp", "ci/main/1003", "release/1.1")

    # 2. A deploy machine fetches builds: identical files, hardlinked from its own cache, and
    # the second build downloads only what the first did not bring.
    deploy = new_machine(tmp_path / "deploy", config, config_env=False)
    fetched = deploy.script("fetch.sh", "ci/main/1003", deploy.home / "app-1003")
    assert "fetch: checked out ci/main/1003 into" in fetched.stderr
    assert_tree_equal(outputs["ci/main/1003"], deploy.home / "app-1003")
    assert (deploy.home / "app-1003" / "README.txt").stat().st_nlink >= 2
    fetched = deploy.script("fetch.sh", "ci/main/1002", deploy.home / "app-1002")
    match = re.search(r"copied (\d+) of (\d+) blobs", fetched.stdout)
    assert match, fetched.stdout
    assert int(match.group(1)) == 4 < int(match.group(2))
    assert_tree_equal(outputs["ci/main/1002"], deploy.home / "app-1002")

    # 3. casframe serve over the bucket is Bazel's remote cache, named in .bazelrc.
    server = new_machine(tmp_path / "cache-server", config)
    workspace = write_workspace(tmp_path / "workspace")
    with serving(server, tmp_path / "serve.log") as port:
        (workspace / ".bazelrc").write_text(bazelrc(port))
        first = build(bazel, workspace, tmp_path / "bazel-1")
        assert "remote cache hit" not in process_summary(first)
        assert len([name for name in server.refs() if name.startswith("ac/")]) == ACTIONS
        second = build(bazel, workspace, tmp_path / "bazel-2")
        assert f"{ACTIONS} remote cache hit" in process_summary(second), process_summary(second)

    # 4. The nightly gc on an ops machine. Least recently used first: the release tagged before
    # the CI builds, then ci/main/1001, which no one has read since CI stored it.
    ops = new_machine(tmp_path / "ops", config)
    assert ops.refs()[:2] == ["release/1.0", "ci/main/1001"]
    usage = json.loads(ops.casframe("--store", "artifacts", "du", "--json").stdout)
    total = usage["total_bytes"]
    oldest = next(r for r in usage["refs"] if r["name"] == "ci/main/1001")["exclusive_bytes"]
    # A quota the store is over, though expiring ci/main/1001 alone brings it under the 80%
    # gc aims for.
    lowest, highest = math.ceil((total - oldest) / 0.8), total
    assert lowest < highest, usage
    quota = (lowest + highest) // 2
    # Everything here is seconds old: a grace period of one second instead of the usual hour.
    collected = ops.script("nightly-gc.sh", GC_MAX_SIZE=str(quota), GC_GRACE="1s").stdout
    assert "kept ref release/1.0 (matches --keep)" in collected, collected
    assert re.findall(r"^expired ref (\S+)", collected, re.M) == ["ci/main/1001"], collected
    assert collected.splitlines()[-1].startswith("total "), collected  # du's last line

    kept = [name for name in ops.refs() if not name.startswith("ac/")]
    assert sorted(kept) == ["ci/main/1002", "ci/main/1003", "release/1.0", "release/1.1"]
    keys = s3_server_bucket.keys()
    assert object_key(prefix, app_bytes(1001)) not in keys
    assert object_key(prefix, app_bytes(1002)) in keys
    checked = ops.casframe("--store", "artifacts", "fsck")
    assert checked.stdout.rstrip().endswith(": no problems"), checked.stdout

    # The builds kept still come out whole on a new machine; the expired one is gone.
    fresh = new_machine(tmp_path / "fresh", config, config_env=False)
    for ref in ("release/1.0", "ci/main/1002"):
        dest = fresh.home / ref.replace("/", "-")
        fresh.script("fetch.sh", ref, dest)
        assert_tree_equal(outputs[ref], dest)
    gone = fresh.script("fetch.sh", "ci/main/1001", fresh.home / "gone", expect=1)
    assert "ref not found" in gone.stderr and "ci/main/1001" in gone.stderr, gone.stderr
    assert "fetch: error: could not pull ci/main/1001 from artifacts" in gone.stderr
    assert not (fresh.home / "gone").exists()


def test_the_scripts_refuse_bad_input_clearly(
    s3_server_bucket: S3TestBucket, tmp_path: Path
) -> None:
    config, _ = store_config(s3_server_bucket)
    machine = new_machine(tmp_path / "machine", config)
    output = build_output(tmp_path / "build", "1", seed=1)

    usage = machine.script("ci-push.sh", expect=2)
    assert usage.stderr.startswith("ci-push: error: usage: ci-push.sh DIRECTORY"), usage.stderr
    unset = machine.script("ci-push.sh", output, BRANCH="main", expect=1)
    assert unset.stderr == (
        "ci-push: error: BUILD_ID is not set: give the CI's build number (or set REF)\n"
    )
    missing = machine.script("ci-push.sh", tmp_path / "nope", REF="ci/x", expect=1)
    assert "ci-push: error: " in missing.stderr and "nope: no such directory" in missing.stderr
    bad_ref = machine.script("ci-push.sh", output, BRANCH="main", BUILD_ID="../1", expect=1)
    assert "casframe: error: " in bad_ref.stderr and "ci/main/../1" in bad_ref.stderr
    assert "ci-push: error: could not store" in bad_ref.stderr, bad_ref.stderr
    assert s3_server_bucket.keys() == []  # nothing was uploaded for bad input

    machine.script("ci-push.sh", output, REF="ci/main/1")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep-me").write_text("mine\n")
    refused = machine.script("fetch.sh", "ci/main/1", used, expect=1)
    assert refused.stderr == (
        f"fetch: error: {used} is not empty: remove it or choose another DEST\n"
    )
    assert (used / "keep-me").read_text() == "mine\n"
    assert machine.script("fetch.sh", "ci/main/1", expect=2).stderr.startswith(
        "fetch: error: usage: fetch.sh REF DEST"
    )
    no_command = machine.script(
        "fetch.sh", "ci/main/1", tmp_path / "out", CASFRAME="/nonexistent/casframe", expect=1
    )
    assert "cannot find the casframe command '/nonexistent/casframe'" in no_command.stderr

    bad_size = machine.script("nightly-gc.sh", GC_MAX_SIZE="lots", expect=2)
    assert "invalid size 'lots'" in bad_size.stderr, bad_size.stderr
    assert "nightly-gc: error: bad setting for casframe gc" in bad_size.stderr
    # Over a tiny quota, but every blob is younger than the grace period: nothing can go.
    # The store is still verified and its usage reported before the script fails.
    stuck = machine.script("nightly-gc.sh", GC_MAX_SIZE="1K", GC_FSCK="1", expect=1)
    assert "cannot get under" in stuck.stderr, stuck.stderr
    assert "nightly-gc: error: gc of artifacts failed or could not get under 1K" in stuck.stderr
    assert "directories: no problems" in stuck.stdout, stuck.stdout  # fsck
    assert stuck.stdout.splitlines()[-1].startswith("total "), stuck.stdout  # du
    assert machine.refs() == ["ci/main/1"]
