"""What a new user meets first: a mistyped store path, units and numbers, gRPC's own logging,
``--listen`` ports."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from casframe.cli import TqdmProgress, make_cli
from casframe.cli.group import help_width
from casframe.server.command import ByteSize

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
    # One process: gRPC itself binds the port (with --workers, casframe binds it first).
    result = _serve(
        str(tmp_path / "store"), "--listen", f"127.0.0.1:{busy_port}", "--log-level", "debug",
        "--workers", "1",
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


# -- units and numbers ----------------------------------------------------------------------


@pytest.fixture
def stored(run: Run, tmp_path: Path) -> Path:
    """A store holding 1,200 small files under ref build/1 (more than a thousand blobs)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(1200):
        (tree / f"f{i:04}").write_text(f"file {i}\n")
    store = tmp_path / "store"
    result = run("--store", str(store), "import", str(tree), "--ref", "build/1")
    assert result.exit_code == 0, result.stderr
    return store


@pytest.mark.parametrize(
    ("given", "printed"),
    [("20K", "20 KiB"), ("20KiB", "20 KiB"), ("20k", "20 KiB"), ("20kB", "19.5 KiB")],
)
def test_gc_prints_the_quota_it_was_given(
    run: Run, stored: Path, given: str, printed: str
) -> None:
    result = run("--store", str(stored), "gc", "--max-size", given, "--dry-run")
    assert result.stdout.startswith(
        f"store holds 1,201 objects (103.2 KiB): over the quota of {printed}\n"
    ), result.stdout


def test_the_gc_warning_names_only_the_options_given(run: Run, stored: Path) -> None:
    young = run("--store", str(stored), "gc", "--max-size", "1K", "--grace", "1h", "--dry-run")
    assert young.exit_code == 1
    assert young.stderr == (
        "casframe: warning: cannot get under 819 B: what is left is kept by blobs younger "
        "than --grace 1h\n"
    )
    kept = run("--store", str(stored), "gc", "--max-size", "1K", "--grace", "0",
               "--keep", "build/*", "--dry-run")
    assert kept.exit_code == 1
    assert kept.stderr == (
        "casframe: warning: cannot get under 819 B: what is left is kept by refs matching "
        "--keep\n"
    )


def test_transfers_print_counts_like_du(run: Run, stored: Path, tmp_path: Path) -> None:
    pushed = run("--store", str(stored), "push", "build/1", "--to", str(tmp_path / "copy"))
    assert pushed.exit_code == 0, pushed.stderr
    assert pushed.stdout.endswith(
        ": copied 1,201 of 1,201 blobs (103.2 KiB); ref build/1 set\n"
    ), pushed.stdout
    again = run("--store", str(stored), "push", "build/1", "--to", str(tmp_path / "copy"))
    assert again.stdout.endswith(": already present (1,201 blobs); ref build/1 set\n")
    du = run("--store", str(stored), "du")
    assert du.stdout.splitlines()[-1].startswith("total 1,201 objects (103.2 KiB): ")


def test_progress_bars_space_their_units_and_separate_thousands() -> None:
    output = io.StringIO()
    progress = TqdmProgress(file=output)
    progress.start("import", 20441, unit="files")
    progress.advance(256)
    progress._bar.refresh()  # tqdm redraws at most every 0.1 s on its own
    progress.start("scan", None, unit="objects")
    progress.advance(20441)
    progress._bar.refresh()
    progress.start("transfer", 20 << 10, unit="B")
    progress.advance(10 << 10)
    progress._bar.refresh()
    progress.finish()
    text = output.getvalue()
    assert "| 256 / 20,441 files [" in text
    assert "scan: 20,441 objects [" in text
    assert re.search(r"\| 10 KiB / 20 KiB \[[^]]*, [\d.,]+ (B|KiB|MiB|GiB|TiB)/s\]", text), text
    assert " files/s]" in text and " objects/s]" in text


@pytest.mark.parametrize(
    ("given", "size"),
    [("4194304", 4 << 20), ("4M", 4 << 20), ("4MiB", 4 << 20), ("5MB", 5_000_000),
     ("1.5M", 3 << 19)],
)
def test_serve_reads_sizes_in_the_same_convention(given: str, size: int) -> None:
    assert ByteSize().convert(given, None, None) == size


# -- start-up: what the light commands import -------------------------------------------------

_IMPORTED = """
import sys
from casframe.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted({name.split(".")[0] if not name.startswith("google.") else "google.protobuf"
                for name in sys.modules
                if name.split(".")[0] in ("grpc", "boto3", "botocore", "tqdm", "prometheus_client")
                or name.startswith("google.protobuf")})
print("HEAVY", *heavy, file=sys.stderr)
"""


def _last_line_of_script(
    script: str, tmp_path: Path, args: list[str], cwd: Path | None = None
) -> str:
    """Run ``script`` in a fresh interpreter (in ``cwd``) against a store holding ref build/1."""
    (tmp_path / "a.txt").write_text("a\n")
    store = tmp_path / "store"
    imported = CliRunner().invoke(
        make_cli(), ["--store", str(store), "import", str(tmp_path), "--ref", "build/1"]
    )
    assert imported.exit_code == 0, imported.stderr
    result = subprocess.run(
        [sys.executable, "-c", script, "--store", str(store), *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], ["ref", "list"], ["ref", "get", "build/1"], ["ref", "--help"]],
    ids=" ".join,
)
def test_light_commands_import_no_grpc_protobuf_boto3_tqdm_or_prometheus_client(
    tmp_path: Path, args: list[str]
) -> None:
    assert _last_line_of_script(_IMPORTED, tmp_path, args) == "HEAVY"


_IMPORTED_MODULES = """
import sys
from casframe.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("MODULES", *sorted(sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("args", "command_module"),
    [(["--version"], None), (["--help"], None), (["ref", "list"], "casframe.cli.refs"),
     (["ref", "get", "build/1"], "casframe.cli.refs")],
    ids=lambda value: " ".join(value) if isinstance(value, list) else str(value),
)
def test_light_commands_import_no_other_command(
    tmp_path: Path, args: list[str], command_module: str | None
) -> None:
    # --help lists the built-in commands without importing them.
    modules = set(_last_line_of_script(_IMPORTED_MODULES, tmp_path, args).split()[1:])
    if command_module is None:  # no store is opened: no store implementation is imported
        assert not modules & {"casframe.store", "casframe_local.store", "casframe_memory.store"}
    assert ("casframe_local" in modules) == (args != ["--version"])  # --help loads plugins
    commands = {m for m in modules if m.startswith(("casframe.cli.", "casframe.server"))}
    assert commands - {"casframe.cli.app", "casframe.cli.group", "casframe.cli.helpers",
                       "casframe.cli.progressbar"} == ({command_module} - {None})


def test_help_lists_each_builtin_command_as_the_command_describes_itself() -> None:
    listed = CliRunner().invoke(make_cli(), ["--help"])
    loaded = make_cli()
    context = click.Context(loaded)
    for name in loaded.list_commands(context):  # import every command, as running it would
        assert loaded.get_command(context, name) is not None
    assert listed.exit_code == 0
    assert listed.stdout == CliRunner().invoke(loaded, ["--help"]).stdout
    # The column is as wide as the longest name, a plugin's command included.
    assert re.search(
        r"\n  serve +Serve STORE \(a URL or a configured store name\) to REAPI", listed.stdout
    ), listed.stdout


@pytest.mark.parametrize("args", [["ref", "list"], ["ref", "get", "build/1"]], ids=" ".join)
def test_reading_refs_imports_no_algorithm_behind_the_store(
    tmp_path: Path, args: list[str]
) -> None:
    """Store names its algorithms lazily: a command that only reads refs imports none of them,
    nor the thread pool they use."""
    modules = set(_last_line_of_script(_IMPORTED_MODULES, tmp_path, args).split()[1:])
    assert "casframe.store" in modules
    algorithms = {"casframe.tree", "casframe.treeimport", "casframe.checkout",
                  "casframe.treediff", "casframe.transfer", "casframe.maintenance",
                  "concurrent.futures"}
    assert modules & algorithms == set()


@pytest.mark.parametrize("args", [["ref", "list"], ["ref", "get", "build/1"]], ids=" ".join)
def test_reading_refs_loads_no_json_and_no_traceback(tmp_path: Path, args: list[str]) -> None:
    """Modules only some commands need load on first use: ``json`` for ``--json`` output,
    ``traceback`` for ``--debug``'s tracebacks."""
    modules = set(_last_line_of_script(_IMPORTED_MODULES, tmp_path, args).split()[1:])
    assert "casframe.cli.helpers" in modules
    assert modules & {"json", "traceback"} == set()


def _modules_a_user_meets(tmp_path: Path, args: list[str]) -> set[str]:
    """The modules a second run of ``args`` loads: the first remembers the entry points (reading
    installed metadata imports urllib.parse, shutil...). The working directory (first on the
    import path) is dated an hour back, as a folder a user works in is: one changed within the
    last seconds is not trusted by the entry-point cache."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    os.utime(cwd, (cwd.stat().st_atime, cwd.stat().st_mtime - 3600))
    _last_line_of_script(_IMPORTED_MODULES, tmp_path, args, cwd)
    return set(_last_line_of_script(_IMPORTED_MODULES, tmp_path, args, cwd).split()[1:])


@pytest.mark.parametrize(
    "args", [["--help"], ["ref", "list"], ["ref", "get", "build/1"]], ids=" ".join
)
def test_light_commands_set_up_neither_openssl_nor_urllib(tmp_path: Path, args: list[str]) -> None:
    """hashlib (OpenSSL's set-up) loads when something is first hashed, urllib.parse (with
    ipaddress) for a URL with a query or a path that needs quoting: a command that only reads
    refs from a plain path pays for neither (in the second run, :func:`_modules_a_user_meets`)."""
    modules = _modules_a_user_meets(tmp_path, args)
    if args != ["--help"]:  # a store was opened
        assert "casframe.registry" in modules and "casframe.config" in modules
    assert modules & {"hashlib", "_hashlib", "urllib.parse", "ipaddress"} == set()


@pytest.mark.parametrize(
    "args", [["--version"], ["--help"], ["ref", "list"], ["ref", "get", "build/1"]], ids=" ".join
)
def test_light_commands_define_no_dataclass(tmp_path: Path, args: list[str]) -> None:
    """Defining a dataclass compiles its methods (a fiftieth of ``python -c pass`` each): the
    records, limits and settings every command defines are value classes
    (:mod:`casframe.values`), and the dataclasses module itself is not loaded."""
    modules = set(_last_line_of_script(_IMPORTED_MODULES, tmp_path, args).split()[1:])
    assert "dataclasses" not in modules


def test_help_asks_the_plugins_for_commands_and_opens_no_store(tmp_path: Path) -> None:
    """``--help`` loads the plugins (they may add commands), but neither what opening a store
    needs (configuration, scheme registry, tree limits, helper settings) nor shutil (click
    measures the terminal with it; casframe gives it the width instead)."""
    modules = _modules_a_user_meets(tmp_path, ["--help"])
    assert {"casframe_local", "casframe_sqlite.commands"} <= modules
    unneeded = {"casframe.config", "casframe.registry", "casframe.treesize",
                "casframe.workers.settings", "casframe.actions", "shutil"}
    assert modules & unneeded == set()


@pytest.mark.parametrize("columns", [None, "120", "79", "60", "30", "0", "wide"])
def test_help_is_as_wide_as_click_makes_it(
    monkeypatch: pytest.MonkeyPatch, columns: str | None
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(click.formatting, "FORCED_WIDTH", None)
    assert help_width() == max(min(shutil.get_terminal_size().columns, 80) - 2, 50)
    monkeypatch.setattr(click.formatting, "FORCED_WIDTH", 90)  # as click's test runner does
    assert help_width() == 90


_COLLECTOR = """
import gc, sys
import casframe.__main__ as entry
loaded = "click" in sys.modules
try:
    entry.main(sys.argv[1:])
except SystemExit:
    pass
print("GC", loaded, gc.isenabled(), gc.get_freeze_count() > 10_000, file=sys.stderr)
"""


def test_the_command_line_loads_out_of_the_collector_s_sight(tmp_path: Path) -> None:
    """The console script's entry loads nothing itself; it holds the garbage collector off
    while the command line loads, freezes what is loaded, and the command runs with the
    collector on."""
    assert _last_line_of_script(_COLLECTOR, tmp_path, ["ref", "list"]) == "GC False True True"
