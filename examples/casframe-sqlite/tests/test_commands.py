"""``casframe sqlite-vacuum``, the command the plugin adds, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from casframe import open_store
from casframe.cli.helpers import format_size

CASFRAME = str(Path(sys.executable).parent / "casframe")


def casframe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASFRAME_")}
    return subprocess.run(
        [CASFRAME, *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_vacuum_gives_back_the_space_of_pruned_blobs(tmp_path: Path) -> None:
    database = tmp_path / "cas.db"
    url = f"sqlite://{database}"
    with open_store(url) as store:
        for _ in range(4):
            store.put_bytes(os.urandom(1 << 20))  # no ref reaches them
        assert store.prune(grace_period=0).objects_freed == 4
    before = database.stat().st_size
    assert before > 4 << 20, "SQLite keeps the freed pages in the file"

    result = casframe("--store", url, "sqlite-vacuum", "--json")
    assert result.returncode == 0, result.stderr
    after = database.stat().st_size
    assert json.loads(result.stdout) == {
        "database": str(database), "bytes_before": before, "bytes_after": after,
    }
    assert after < 1 << 20

    again = casframe("--store", url, "sqlite-vacuum")
    assert again.returncode == 0, again.stderr
    size = format_size(database.stat().st_size)
    assert again.stdout == f"{url}: {size} -> {size} (0 B given back)\n"


def test_vacuum_of_a_store_of_another_kind_fails_in_one_line(tmp_path: Path) -> None:
    open_store(f"file://{tmp_path / 'cas'}").close()
    result = casframe("--store", f"file://{tmp_path / 'cas'}", "sqlite-vacuum")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"casframe: error: sqlite-vacuum compacts sqlite:// stores; file://{tmp_path / 'cas'} "
        "is not one (name one with --store)\n"
    )


def test_the_command_is_listed_with_casframes_own() -> None:
    result = casframe("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line for line in result.stdout.splitlines() if line[:2] == "  "}
    assert "Give the space of deleted blobs back to the file system." in listed["sqlite-vacuum"]
    assert "ref" in listed, "next to casframe's own commands"
