"""``casframe prune``, ``gc``, ``fsck`` and ``du``: text, JSON, exit statuses and progress.

The behaviour behind them is tested on every backend by the conformance suite
(``MaintenanceConformance``); here is what the command line adds.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from casframe import Digest, layout, open_store
from casframe.cli import make_cli
from casframe.server import Server
from casframe.testing import write_files

pytestmark = pytest.mark.usefixtures("isolated_env")


def run(*args: str) -> Result:
    return CliRunner().invoke(make_cli(), list(args))


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def content(n: int, seed: str) -> bytes:
    return ((seed + "-") * (n // (len(seed) + 1) + 1)).encode()[:n]


@pytest.fixture
def refs(tmp_path: Path) -> dict[str, str]:
    """Two refs sharing a file, one of them a release; plus a loose blob no ref names."""
    shared = content(4000, "shared")
    a = write_files(tmp_path / "a", {"shared": shared, "only-a": content(3000, "a")})
    b = write_files(tmp_path / "b", {"shared": shared, "sub/only-b": content(5000, "b")})
    digests = {
        "ci/a": ok(run("import", str(a), "--ref", "ci/a")).strip(),
        "release/b": ok(run("import", str(b), "--ref", "release/b")).strip(),
    }
    (tmp_path / "loose").write_bytes(b"nobody names me")
    ok(run("put", str(tmp_path / "loose")))
    return digests


def stored(tmp_path: Path) -> set[str]:
    objects = tmp_path / "store" / "objects"
    return {f"{d.name}{f.name}" for d in objects.iterdir() for f in d.iterdir()}


LOOSE = Digest.of_bytes(b"nobody names me")


# -- prune --------------------------------------------------------------------------------------


def test_a_damaged_ref_stops_prune_gc_and_fsck(tmp_path: Path, refs: dict[str, str]) -> None:
    """An empty ref file (a power cut after an unsynced write) must not pass for no ref: a
    prune that skipped it would delete the whole tree it holds."""
    (tmp_path / "store" / "refs" / "heads" / "ci" / "a").write_bytes(b"")
    before = stored(tmp_path)
    for command in (["prune", "--grace", "0"], ["gc", "--max-size", "1", "--grace", "0"],
                    ["fsck"], ["ref", "list"]):
        result = run(*command)
        assert result.exit_code != 0, command
        assert "ref ci/a in file://" in result.stderr, result.stderr
        assert "is damaged" in result.stderr and "Traceback" not in result.stderr
    assert stored(tmp_path) == before
    ok(run("ref", "rm", "ci/a"))  # what the message suggests; then prune goes ahead
    ok(run("prune", "--grace", "0"))
    assert len(stored(tmp_path)) < len(before)


def test_prune_dry_run_shows_what_each_ref_alone_keeps(
    refs: dict[str, str], tmp_path: Path
) -> None:
    before = stored(tmp_path)
    text = ok(run("prune", "--dry-run", "--grace", "0"))
    assert stored(tmp_path) == before
    lines = text.splitlines()
    assert lines[0].split() == ["REF", "TOTAL", "EXCLUSIVE", "LAST", "USED"]
    table = {line.split()[0]: line.split() for line in lines[1:3]}
    assert table["ci/a"][3:5] == ["3.1", "KiB"]  # only-a (3000 B) and its root Directory
    assert table["release/b"][3:5] == ["5.1", "KiB"]  # only-b, its root and sub Directories
    assert lines[-1].startswith("would free 1 object (15 B) of 7 objects")

    record = json.loads(ok(run("prune", "--dry-run", "--grace", "0", "--json")))
    assert record["dry_run"] is True and record["objects_freed"] == 1
    assert {r["name"] for r in record["refs"]} == {"ci/a", "release/b"}


def test_prune_frees_what_no_ref_reaches_after_the_grace_period(
    refs: dict[str, str], tmp_path: Path
) -> None:
    young = ok(run("prune"))  # default grace: one hour
    assert young.startswith("freed 0 objects (0 B) of 7 objects")
    assert "and 1 object (15 B) younger than 1h" in young
    assert LOOSE.hash[2:] in {name[2:] for name in stored(tmp_path)}

    record = json.loads(ok(run("prune", "--grace", "0", "--json")))
    assert (record["objects_freed"], record["bytes_freed"]) == (1, LOOSE.size)
    assert LOOSE.hash not in stored(tmp_path)
    ok(run("checkout", "release/b", "out"))


# -- gc -----------------------------------------------------------------------------------------


def test_gc_expires_the_least_recently_used_ref_but_not_kept_ones(
    refs: dict[str, str], tmp_path: Path
) -> None:
    time.sleep(0.02)
    ok(run("ref", "get", "ci/a"))  # now release/b is the least recently used
    dry = json.loads(ok(run("gc", "--max-size", "10K", "--grace", "0", "--dry-run", "--json")))
    assert [r["name"] for r in dry["refs_deleted"]] == ["release/b"]
    assert ok(run("ref", "list", "--json")).count('"name"') == 2

    text = ok(
        run("gc", "--max-size", "11K", "--low-watermark", "0.9", "--keep", "release/*",
            "--grace", "0")
    )
    assert "over the quota of 11 KiB" in text
    assert "expired ref ci/a" in text and "kept ref release/b (matches --keep)" in text
    names = [r["name"] for r in json.loads(ok(run("ref", "list", "--json")))]
    assert names == ["release/b"]
    ok(run("checkout", "release/b", "out"))


def test_gc_that_cannot_reach_its_target_says_so_and_fails(refs: dict[str, str]) -> None:
    result = run("gc", "--max-size", "1K", "--keep", "*", "--grace", "0")
    assert result.exit_code == 1
    assert "casframe: warning: cannot get under 819 B" in result.stderr
    assert len(json.loads(ok(run("ref", "list", "--json")))) == 2


# -- fsck ---------------------------------------------------------------------------------------


def test_fsck_reports_corruption_with_digest_and_ref_and_repairs(
    refs: dict[str, str], tmp_path: Path
) -> None:
    assert ok(run("fsck")).endswith("2 refs, 3 directories: no problems\n")

    damaged = Digest.of_bytes(content(5000, "b"))
    path = tmp_path / "store" / layout.object_key(damaged)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))

    found = run("fsck")
    assert found.exit_code == 1
    lines = found.stdout.splitlines()
    assert lines[0].startswith(f"corrupt {damaged}: content hashes to ")
    assert lines[0].endswith("(refs: release/b)")
    assert lines[-1].endswith("1 problem")
    record = json.loads(run("fsck", "--json").stdout)
    assert record["ok"] is False and record["problems"][0]["refs"] == ["release/b"]

    repaired = run("fsck", "--repair")
    assert repaired.exit_code == 1  # the ref is still incomplete: still a problem
    assert f"deleted corrupt blob {damaged}" in repaired.stdout
    assert "incomplete ref release/b" in repaired.stdout
    assert not path.exists()
    ok(run("checkout", "ci/a", "out"))  # nothing healthy was touched

    after = run("fsck")
    assert after.exit_code == 1
    assert after.stdout.startswith(f"missing {damaged}: blob is not stored (refs: release/b)")


# -- du -----------------------------------------------------------------------------------------


def test_du_totals_and_per_ref_sizes(refs: dict[str, str]) -> None:
    text = ok(run("du"))
    assert text.splitlines()[-1] == (
        "total 7 objects (12.1 KiB): 6 objects (12.1 KiB) reachable from refs, "
        "1 object (15 B) unreachable"
    )
    record = json.loads(ok(run("du", "--json")))
    assert record["total_objects"] == 7 and record["unreachable_bytes"] == LOOSE.size
    usage = {r["name"]: r for r in record["refs"]}
    assert usage["ci/a"]["total_bytes"] == 4000 + 3000 + Digest.parse(refs["ci/a"]).size
    assert usage["ci/a"]["exclusive_bytes"] == 3000 + Digest.parse(refs["ci/a"]).size


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "--grace", "5x"], "Invalid value for '--grace': invalid duration '5x'"),
        (["gc", "--max-size", "lots"], "Invalid value for '--max-size': invalid size 'lots'"),
        (["gc", "--max-size", "0"], "invalid size '0': must be positive"),
        (["gc", "--max-size", "1G", "--low-watermark", "2"], "must be in (0, 1]"),
        (["gc"], "Missing option '--max-size'"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("casframe: error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_backend_that_cannot_list_says_so(tmp_path: Path) -> None:
    with open_store("memory://") as backing, Server(backing) as server:
        url = f"grpc://127.0.0.1:{server.port}"
        for command in (["prune"], ["gc", "--max-size", "1G"], ["du"]):
            result = run("--store", url, *command)
            assert result.exit_code == 1
            assert f"{command[0]} is not supported by this backend: it cannot list" in (
                result.stderr
            )
            assert len(result.stderr.splitlines()) == 1


# -- progress on a terminal ---------------------------------------------------------------------


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the console script with stderr on a pseudo-terminal; return its status and stderr."""
    script = os.path.join(os.path.dirname(sys.executable), "casframe")
    leader, follower = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide; progress bars need a real width.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen([script, *args], stdout=subprocess.DEVNULL, stderr=follower) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = proc.wait(timeout=60)
    os.close(leader)
    return status, b"".join(chunks).decode(errors="replace")


def test_long_runs_show_progress_on_a_terminal(refs: dict[str, str]) -> None:
    status, bars = run_on_a_terminal("fsck")
    assert status == 0
    assert "verify" in bars and "trees" in bars
    status, bars = run_on_a_terminal("prune", "--grace", "0")
    assert status == 0
    assert "scan" in bars and "mark" in bars and "delete" in bars
