"""What a new user meets first: a mistyped store path, units and numbers, gRPC's own logging,
``--listen`` ports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from casframe.cli import make_cli

pytestmark = pytest.mark.usefixtures("isolated_env")

Run = Callable[..., Result]

HASH = "ab" * 32


@pytest.fixture
def run() -> Run:
    def invoke(*args: str) -> Result:
        return CliRunner().invoke(make_cli(), list(args))

    return invoke


def assert_one_line_error(result: Result, expected: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [f"casframe: error: {expected}"]


# -- a store that does not exist ----------------------------------------------------------------


READING = [
    ["ls", "build/1"],
    ["ls", "-r", "build/1"],
    ["cat", "build/1", "README.txt"],
    ["get", f"{HASH}/3"],
    ["diff", "build/1", "build/2"],
    ["ref", "list"],
    ["ref", "get", "build/1"],
    ["checkout", "build/1", "out"],
    ["fsck"],
    ["du"],
    ["push", "build/1", "--to", "elsewhere"],
    ["serve", "--read-only", "--listen", "127.0.0.1:0"],
]


@pytest.mark.parametrize("args", READING, ids=lambda a: " ".join(a[:2]))
def test_a_reading_command_refuses_a_store_that_does_not_exist(
    run: Run, tmp_path: Path, args: list[str]
) -> None:
    typo = tmp_path / "typo-store"
    if args[0] == "serve":
        result = run("serve", str(typo), *args[1:])
    else:
        result = run("--store", str(typo), *args)
    assert_one_line_error(
        result,
        f"no store at {typo}: it does not exist (commands that only read do not create one)",
    )
    assert not typo.exists()
    assert not (tmp_path / "elsewhere").exists()


def test_pull_refuses_an_origin_that_does_not_exist(run: Run, tmp_path: Path) -> None:
    typo = tmp_path / "typo-store"
    result = run("--store", str(tmp_path / "here"), "pull", "build/1", "--from", str(typo))
    assert_one_line_error(
        result,
        f"no store at {typo}: it does not exist (commands that only read do not create one)",
    )
    assert not typo.exists()


def test_writing_commands_create_the_store(run: Run, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a\n")
    put = run("--store", str(tmp_path / "s1"), "put", str(tmp_path / "a.txt"))
    assert put.exit_code == 0, put.stderr
    assert (tmp_path / "s1" / "objects").is_dir()
    imported = run("--store", str(tmp_path / "s2"), "import", str(tmp_path), "--ref", "t")
    assert imported.exit_code == 0, imported.stderr
    listed = run("--store", str(tmp_path / "s2"), "ref", "list")
    assert listed.exit_code == 0 and listed.stdout.endswith("  t\n")


def test_an_empty_directory_is_an_empty_store(run: Run, tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    result = run("--store", str(tmp_path / "fresh"), "ref", "list")
    assert result.exit_code == 0 and result.stdout == ""
