"""What a new user meets first: a mistyped store path, units and numbers, gRPC's own logging,
``--listen`` ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from casframe.cli import make_cli

pytestmark = pytest.mark.usefixtures("isolated_env")

Run = Callable[..., Result]

HASH = "ab" * 32
CASFRAME = str(Path(sys.executable).with_name("casframe"))  # the console script, as users run it


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


# -- casframe serve: gRPC's own logging, the serving line, --listen ---------------------------


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run(
        [CASFRAME, "serve", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_port_in_use_is_one_line_without_grpc_log_lines(tmp_path: Path, busy_port: int) -> None:
    result = _serve(str(tmp_path / "store"), "--listen", f"127.0.0.1:{busy_port}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"casframe: error: 127.0.0.1:{busy_port}: cannot listen (Address already in use)"
    ]


def test_grpc_log_lines_show_at_debug_level(tmp_path: Path, busy_port: int) -> None:
    result = _serve(
        str(tmp_path / "store"), "--listen", f"127.0.0.1:{busy_port}", "--log-level", "debug"
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any("add_port.cc" in line for line in lines), result.stderr
    assert lines[-1] == (
        f"casframe: error: 127.0.0.1:{busy_port}: cannot listen (Address already in use)"
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1",
                                    "127.0.0.1", "127.0.0.1:http", ":50051"])
def test_a_port_outside_0_to_65535_is_a_usage_error(run: Run, listen: str) -> None:
    assert_one_line_error(
        run("serve", "store", "--listen", listen),
        f"Invalid value for '--listen': listen address {listen!r} is not HOST:PORT with a "
        "port from 0 to 65535 (see 'casframe serve --help')",
        code=2,
    )


def test_the_serving_line_is_printed_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    process = subprocess.Popen(
        [CASFRAME, "serve", str(tmp_path / "store"),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith(f"casframe: serving file://{tmp_path}/store on 127.0.0.1:")
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0
    assert rest == ""
    assert f"serving file://{tmp_path}/store on" not in errors, errors
