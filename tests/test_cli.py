"""The ``casframe`` command: every command, its JSON output, its errors, config and plugins.

Most tests drive the command in-process with click's CliRunner; a few run the installed
console script in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import casframe
from casframe import layout
from casframe.cli import TqdmProgress, make_cli

BLOB = bytes(range(256)) * 4  # every byte value, to prove binary safety


pytestmark = pytest.mark.usefixtures("isolated_env")


Run = Callable[..., Result]


@pytest.fixture
def run() -> Run:
    """Invoke a fresh ``casframe`` command in-process; stdout and stderr stay separate."""

    def invoke(*args: str, input: bytes | str | None = None) -> Result:
        return CliRunner().invoke(make_cli(), list(args), input=input)

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def assert_one_line_error(result: Result, fragment: str, code: int = 1) -> None:
    """The contract for every failure: one line on stderr, no traceback, non-zero exit."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("casframe: error: "), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small build output: files, a subdirectory, an executable, a symlink, an empty dir."""
    root = tmp_path / "build"
    (root / "bin").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "empty").mkdir()
    (root / "README.txt").write_text("hello\n")
    (root / "bin" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "bin" / "run.sh").chmod(0o755)
    (root / "data" / "blob.bin").write_bytes(BLOB)
    (root / "latest").symlink_to("README.txt")
    return root


@pytest.fixture
def imported(run: Run, tree: Path) -> str:
    """The digest of ``tree`` imported into the default test store as ref ``build/1``."""
    return ok(run("import", str(tree), "--ref", "build/1")).strip()


# -- commands -----------------------------------------------------------------------------------


def test_import_prints_the_root_digest_and_sets_the_ref(run: Run, tree: Path) -> None:
    digest = ok(run("import", str(tree), "--ref", "build/1")).strip()
    assert casframe.Digest.parse(digest)
    assert ok(run("ref", "get", "build/1")).strip() == digest
    record = json.loads(ok(run("import", str(tree), "--json")))
    assert record == {"digest": digest, "ref": None}


def test_import_keeps_its_stat_cache_in_the_user_cache_unless_told_not_to(
    run: Run, tree: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "casframe" / "stat-cache"
    digest = ok(run("import", str(tree), "--no-stat-cache"))
    assert not cache.exists()
    assert ok(run("import", str(tree))) == digest
    assert len(list(cache.glob("*.stat"))) == 1
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    assert ok(run("import", str(copy))) == digest
    assert len(list(cache.glob("*.stat"))) == 2, "one cache file per imported directory"


def test_import_prints_no_progress_when_stderr_is_not_a_terminal(run: Run, tree: Path) -> None:
    result = run("import", str(tree))
    assert result.exit_code == 0
    assert result.stderr == ""


def test_ls_lists_one_directory_or_everything(run: Run, imported: str) -> None:
    lines = ok(run("ls", "build/1")).splitlines()
    names = [line.split()[-1] for line in lines]
    assert names == ["README.txt", "bin", "data", "empty", "README.txt"]
    assert lines[0].split()[:3] == ["100644", "file", "6"]
    assert lines[1].split()[:2] == ["040000", "directory"]
    assert lines[4].split()[:2] == ["120000", "symlink"]
    assert lines[4].endswith("latest -> README.txt")

    recursive = ok(run("ls", "-r", imported)).splitlines()
    assert any(line.startswith("100755 file") and line.endswith("bin/run.sh") for line in recursive)
    assert recursive[-1].endswith("latest -> README.txt")

    records = json.loads(ok(run("ls", "build/1", "data", "--json")))
    assert records == [
        {
            "path": "data/blob.bin",
            "kind": "file",
            "mode": "100644",
            "executable": False,
            "size": len(BLOB),
            "digest": str(casframe.Digest.of_bytes(BLOB)),
            "target": None,
        }
    ]
    paths = [r["path"] for r in json.loads(ok(run("ls", "-r", "--json", "build/1")))]
    assert paths == ["README.txt", "bin", "bin/run.sh", "data", "data/blob.bin", "empty", "latest"]


def test_cat_is_binary_safe(run: Run, imported: str) -> None:
    assert run("cat", "build/1", "data/blob.bin").stdout_bytes == BLOB
    assert ok(run("cat", imported, "README.txt")) == "hello\n"


def test_put_and_get(run: Run, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(BLOB)
    lines = ok(run("put", "a.bin", "-", input=b"from stdin")).splitlines()
    assert lines == [
        str(casframe.Digest.of_bytes(BLOB)),
        str(casframe.Digest.of_bytes(b"from stdin")),
    ]
    assert run("get", lines[0]).stdout_bytes == BLOB
    ok(run("get", lines[1], "-o", "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == b"from stdin"
    records = json.loads(ok(run("put", "--json", "a.bin")))
    assert records == [{"path": "a.bin", "digest": lines[0]}]


def test_get_replaces_a_file_only_with_verified_content(run: Run, tmp_path: Path) -> None:
    digest = ok(run("put", "-", input=BLOB)).strip()
    out = tmp_path / "out.bin"
    out.write_bytes(b"what was there before")
    out.chmod(0o640)
    ok(run("get", digest, "-o", "out.bin"))
    assert out.read_bytes() == BLOB and stat.S_IMODE(out.stat().st_mode) == 0o640
    ok(run("get", digest, "-o", "/dev/null"))  # written in place, not replaced by a file
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    read_end, write_end = os.pipe()  # a pipe, as in `casframe get D -o /dev/stdout | cat`
    try:
        ok(run("get", digest, "-o", f"/proc/self/fd/{write_end}"))
        assert os.read(read_end, len(BLOB) + 1) == BLOB
    finally:
        os.close(read_end)
        os.close(write_end)

    out.write_bytes(b"what was there before")
    parsed = casframe.Digest.parse(digest)
    stored = tmp_path / "store" / layout.object_key(parsed)
    stored.chmod(0o644)
    stored.write_bytes(BLOB[:-1] + bytes([BLOB[-1] ^ 1]))  # same size, other content
    result = run("get", digest, "-o", "out.bin")
    assert result.exit_code != 0 and "corrupt" in result.stderr
    assert out.read_bytes() == b"what was there before"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


@pytest.mark.parametrize("name", ["ac/release", "asset/blob/x", "asset/directory/y"])
def test_the_server_namespaces_are_no_names_for_trees(
    run: Run, imported: str, tmp_path: Path, name: str
) -> None:
    """Prune reads a ref under ac/ as an ActionResult and one under asset/blob/ as a plain
    blob: a tree set there would lose its files at the next prune."""
    commands = (
        ["import", "build", "--ref", name],
        ["ref", "set", name, imported],
        ["ref", "cp", "build/1", name],
        ["push", "build/1", "--to", "./other", "--ref", name],
    )
    for args in commands:
        result = run(*args)
        assert result.exit_code == 1 and "is reserved" in result.stderr, (args, result.stderr)
    with casframe.open_store(f"file://{tmp_path / 'store'}") as store:
        with pytest.raises(casframe.InvalidNameError, match="reserved"):
            store.set_ref(name, casframe.Digest.parse(imported))
        assert [r.name for r in store.list_refs()] == ["build/1"]


def test_a_ref_name_that_is_not_utf8_is_refused_on_every_store(
    run: Run, imported: str, tmp_path: Path
) -> None:
    """Undecodable bytes of an argument: no REAPI peer could send or receive such a name."""
    name = "rel/" + os.fsdecode(b"\xff")
    result = run("ref", "set", name, imported)
    assert result.exit_code == 1 and "not valid UTF-8" in result.stderr
    for url in ("memory://", f"file://{tmp_path / 'other'}"):
        with casframe.open_store(url) as store:
            with pytest.raises(casframe.InvalidNameError, match="not valid UTF-8"):
                store.set_ref(name, casframe.Digest.parse(imported), check_complete=False)


def test_refs(run: Run, imported: str, tmp_path: Path) -> None:
    ok(run("ref", "set", "build/2", imported))
    ok(run("ref", "cp", "build/1", "release"))
    # File timestamps tick coarsely: age the refs explicitly (refs/heads/NAME, file:// layout).
    heads = tmp_path / "store" / "refs" / "heads"
    os.utime(heads / "build" / "2", (1_000_000, 1_000_000))
    os.utime(heads / "release", (2_000_000, 2_000_000))
    ok(run("ref", "get", "build/1"))  # a use: build/1 becomes the most recently used
    names = [line.split()[-1] for line in ok(run("ref", "list")).splitlines()]
    assert names == ["build/2", "release", "build/1"]
    assert [r["name"] for r in json.loads(ok(run("ref", "list", "build/", "--json")))] == [
        "build/2",
        "build/1",
    ]
    record = json.loads(ok(run("ref", "list", "--json", "release")))[0]
    assert record["digest"] == imported
    assert record["accessed"].endswith("+00:00")
    assert json.loads(ok(run("ref", "get", "release", "--json"))) == {
        "name": "release",
        "digest": imported,
    }
    ok(run("ref", "rm", "release"))
    assert_one_line_error(run("ref", "get", "release"), "ref not found")


def test_ref_set_accepts_another_ref(run: Run, imported: str) -> None:
    ok(run("ref", "set", "alias", "build/1"))
    assert ok(run("ref", "get", "alias")).strip() == imported


def test_checkout_links_or_copies(run: Run, imported: str, tree: Path, tmp_path: Path) -> None:
    ok(run("checkout", "build/1", "linked"))
    assert (tmp_path / "linked" / "data" / "blob.bin").stat().st_nlink > 1
    assert os.readlink(tmp_path / "linked" / "latest") == "README.txt"
    assert os.access(tmp_path / "linked" / "bin" / "run.sh", os.X_OK)
    assert (tmp_path / "linked" / "empty").is_dir()

    ok(run("checkout", imported, "copied", "--copy"))
    assert (tmp_path / "copied" / "data" / "blob.bin").stat().st_nlink == 1
    assert (tmp_path / "copied" / "data" / "blob.bin").read_bytes() == BLOB

    ok(run("checkout", imported, "hard", "--link"))
    assert (tmp_path / "hard" / "README.txt").stat().st_nlink > 1
    assert_one_line_error(
        run("checkout", imported, "both", "--link", "--copy"), "cannot be used together", 2
    )


def test_diff(run: Run, imported: str, tree: Path) -> None:
    (tree / "README.txt").write_text("changed\n")
    (tree / "bin" / "run.sh").unlink()
    (tree / "data" / "new.txt").write_text("new\n")
    ok(run("import", str(tree), "--ref", "build/2"))
    assert ok(run("diff", "build/1", "build/2")).splitlines() == [
        "M README.txt",
        "D bin/run.sh",
        "A data/new.txt",
    ]
    assert json.loads(ok(run("diff", "--json", "build/1", "build/2"))) == {
        "added": ["data/new.txt"],
        "removed": ["bin/run.sh"],
        "modified": ["README.txt"],
    }
    assert ok(run("diff", "build/1", "build/2", "--subdir", "data")) == "A new.txt\n"
    assert ok(run("diff", "build/1", imported)) == ""


def test_push_and_pull_between_file_stores(run: Run, imported: str, tmp_path: Path) -> None:
    out = ok(run("push", "build/1", "--to", "./remote"))
    # 3 files and 3 Directories; the empty directory is the empty blob, always present.
    assert "copied 6 of 6 blobs" in out and "ref build/1 set" in out
    assert "already present" in ok(run("push", "build/1", "--to", "./remote"))
    record = json.loads(ok(run("push", imported, "--to", "./remote", "--ref", "x", "--json")))
    assert record["already_present"] is True
    assert record["ref"] == "x"
    assert record["destination"] == f"file://{tmp_path}/remote"

    pulled = json.loads(
        ok(run("--store", "./third", "pull", "build/1", "--from", "./remote", "--json"))
    )
    assert (pulled["blobs_sent"], pulled["blobs_total"]) == (6, 6)
    assert pulled["bytes_sent"] > len(BLOB)
    assert ok(run("--store", "./third", "ref", "get", "build/1")).strip() == imported
    again = ok(run("--store", "./third", "pull", imported, "--from", "./remote"))
    assert "already present" in again


def test_plugins_lists_the_builtin_backends(run: Run) -> None:
    text = ok(run("plugins"))
    assert text.splitlines()[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "SCHEMES"]
    assert "file://" in text and "memory://" in text
    records = {r["name"]: r for r in json.loads(ok(run("plugins", "--json")))}
    assert records["local"]["schemes"] == ["file"]
    assert records["local"]["distribution"] == "casframe"
    assert records["memory"]["blocked"] is False


def test_plugins_marks_blocked_plugins(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from casframe.plugins import reset_plugin_manager

    monkeypatch.setenv("CASFRAME_BLOCK_PLUGINS", "memory")
    reset_plugin_manager()
    try:
        line = next(x for x in ok(run("plugins")).splitlines() if x.startswith("memory"))
        assert line.endswith("(blocked)")
        assert_one_line_error(run("--store", "memory://", "ref", "list"), "unknown store scheme")
    finally:
        monkeypatch.delenv("CASFRAME_BLOCK_PLUGINS")
        reset_plugin_manager()


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["--store", "nope://x", "ref", "list"], "unknown store scheme 'nope'", 1),
        (["ref", "get", "missing"], "ref not found", 1),
        (["ls", "missing/ref"], "ref not found", 1),
        (["get", "not-a-digest"], "expected HASH/SIZE", 1),
        (["get", "abc/12"], "not a hex digest", 1),
        (["get", f"{'0' * 64}/5"], "blob not found", 1),
        (["put", "no-such-file"], "no-such-file: No such file or directory", 1),
        (["import", "no-such-dir"], "no-such-dir: No such file or directory", 1),
        (["import", "build", "--ref", "bad//name"], "invalid ref name", 1),
        (["cat", "build/1", "no/such/file"], "no directory 'no'", 1),
        (["cat", "build/1", "bin"], "is a directory", 1),
        (["ref", "set", "x", "build/1/../y"], "invalid ref name", 1),
        (["--store", "unconfigured", "ref", "list"], "unknown store 'unconfigured'", 1),
        (["--config", "missing.toml", "ref", "list"], "configuration file not found", 1),
        (["frobnicate"], "No such command 'frobnicate'", 2),
        (["ls"], "Missing argument 'TREE'", 2),
        (["ls", "--bogus", "x"], "No such option '--bogus'", 2),
        (["--digest-function", "md5", "ref", "list"], "unsupported digest function 'md5'", 1),
        (["--store", "memory://?digest_function=sha1", "ref", "list"], "function 'sha1'", 1),
    ],
)
def test_errors_are_one_line_without_traceback(
    run: Run, imported: str, args: list[str], fragment: str, code: int
) -> None:
    assert_one_line_error(run(*args), fragment, code)


def test_checkout_into_a_non_empty_directory_is_refused(
    run: Run, imported: str, tmp_path: Path
) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("mine")
    assert_one_line_error(
        run("checkout", "build/1", "dest"), "dest: checkout destination is not empty"
    )
    assert (tmp_path / "dest" / "keep").read_text() == "mine"


def test_verbose_shows_the_traceback(run: Run, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    result = run("-v", "ref", "get", "missing")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"casframe: error: ref not found in file://{os.getcwd()}/store: missing"
    )


# -- configuration and the default store --------------------------------------------------------


def test_store_from_config_file_by_name(run: Run, tree: Path, tmp_path: Path) -> None:
    config = tmp_path / "casframe.toml"
    config.write_text(f'[stores.team]\nurl = "file://{tmp_path}/team"\n')
    digest = ok(run("--config", str(config), "--store", "team", "import", str(tree))).strip()
    assert (tmp_path / "team" / "objects" / digest[:2] / digest[2:64]).exists()


def test_default_store_from_casframe_config(
    run: Run, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('default_store = "team"\n[stores.team]\nurl = "team-store"\n')
    monkeypatch.setenv("CASFRAME_CONFIG", str(config))
    monkeypatch.delenv("CASFRAME_STORE")
    ok(run("import", str(tree), "--ref", "r"))
    assert (tmp_path / "team-store" / "refs" / "heads" / "r").is_file()
    # --to accepts configured names too.
    ok(run("push", "r", "--to", "team"))


def test_casframe_store_env(
    run: Run, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASFRAME_STORE", f"file://{tmp_path}/env-store")
    ok(run("import", str(tree), "--ref", "r"))
    assert (tmp_path / "env-store" / "refs" / "heads" / "r").is_file()
    # --store wins over the environment.
    ok(run("--store", "./flag-store", "import", str(tree), "--ref", "r"))
    assert (tmp_path / "flag-store" / "refs" / "heads" / "r").is_file()


def test_default_store_is_under_the_xdg_cache(
    run: Run, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CASFRAME_STORE")
    ok(run("import", str(tree), "--ref", "r"))
    assert (tmp_path / "cache" / "casframe" / "store" / "refs" / "heads" / "r").is_file()


def test_malformed_config_is_one_line(run: Run, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[stores.x\n")
    assert_one_line_error(run("--config", "bad.toml", "ref", "list"), "bad.toml: invalid TOML")


# -- plugin commands ----------------------------------------------------------------------------


class HelloPlugin:
    @casframe.hookimpl
    def casframe_register_commands(self, cli: click.Group) -> None:
        @cli.command("hello")
        @click.argument("who", default="world")
        def hello(who: str) -> None:
            """Say hello."""
            click.echo(f"hello {who}")


class ClashingPlugin:
    @casframe.hookimpl
    def casframe_register_commands(self, cli: click.Group) -> None:
        cli.add_command(click.Command("import", callback=lambda: None))


class InterruptedPlugin:
    @casframe.hookimpl
    def casframe_register_commands(self, cli: click.Group) -> None:
        def interrupted() -> None:
            raise KeyboardInterrupt

        cli.add_command(click.Command("interrupted", callback=interrupted))


class BrokenPlugin:
    @casframe.hookimpl
    def casframe_register_commands(self, cli: click.Group) -> None:
        raise RuntimeError("boom")


def test_plugin_commands_are_added_through_the_hook(run: Run) -> None:
    with casframe.registered_plugin(HelloPlugin(), "hello-plugin"):
        assert ok(run("hello", "casframe")) == "hello casframe\n"
        assert "hello" in ok(run("--help"))
    assert_one_line_error(run("hello"), "No such command 'hello'", 2)


def test_a_plugin_command_clashing_with_a_builtin_names_the_plugin(run: Run) -> None:
    with casframe.registered_plugin(ClashingPlugin(), "clash-plugin"):
        result = run("ref", "list")
    assert_one_line_error(result, "plugin 'clash-plugin' cannot add command 'import'")
    assert "taken by casframe" in result.stderr


def test_two_plugins_adding_the_same_command_name_both(run: Run) -> None:
    with (
        casframe.registered_plugin(HelloPlugin(), "first-hello"),
        casframe.registered_plugin(HelloPlugin(), "second-hello"),
    ):
        result = run("hello")
    assert_one_line_error(
        result, "plugin 'second-hello' cannot add command 'hello': "
        "the name is already taken by plugin 'first-hello'"
    )


def test_a_failing_plugin_hook_is_one_line_naming_the_plugin(run: Run) -> None:
    with casframe.registered_plugin(BrokenPlugin(), "broken-plugin"):
        result = run("ref", "list")
    assert_one_line_error(result, "plugin 'broken-plugin' failed to add its commands")


def test_keyboard_interrupt_exits_130_quietly(run: Run) -> None:
    with casframe.registered_plugin(InterruptedPlugin(), "interrupt-plugin"):
        result = run("interrupted")
    assert result.exit_code == 130
    assert result.stderr.strip() == ""


# -- progress -----------------------------------------------------------------------------------


def test_progress_bar_is_thread_safe() -> None:
    import io

    output = io.StringIO()
    progress = TqdmProgress(file=output)
    progress.start("import", 8000)

    def work() -> None:
        for _ in range(1000):
            progress.advance(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress._bar.n == 8000
    progress.finish()
    progress.finish()  # idempotent
    progress.start("transfer", 3 << 20, unit="B")
    progress.advance(3 << 19)
    progress._bar.refresh()
    progress.finish()
    assert "import" in output.getvalue()
    assert "1.5 MiB / 3 MiB" in output.getvalue()


# -- the installed console script -----------------------------------------------------------------


def console_script() -> str:
    found = shutil.which("casframe", path=os.path.dirname(sys.executable))
    assert found is not None, "the casframe console script is not installed next to this Python"
    return found


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run the console script; stdout stays bytes (``cat`` is binary), stderr is decoded."""
    result = subprocess.run(
        [console_script(), *args], capture_output=True, timeout=60, env=os.environ
    )
    if check:
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
    return result


def sh_text(*args: str) -> str:
    return sh(*args).stdout.decode()


def test_tour(run: Run, tree: Path, tmp_path: Path) -> None:
    """import → ls → cat → refs → diff → checkout → push → pull, in-process."""
    root = ok(run("import", str(tree), "--ref", "demo/build-1")).strip()
    assert "README.txt" in ok(run("ls", "demo/build-1"))
    assert ok(run("cat", "demo/build-1", "bin/run.sh")) == "#!/bin/sh\necho run\n"
    ok(run("ref", "set", "demo/pinned", root))
    ok(run("ref", "cp", "demo/build-1", "demo/keep"))
    refs = json.loads(ok(run("ref", "list", "demo/", "--json")))
    assert sorted(r["name"] for r in refs) == ["demo/build-1", "demo/keep", "demo/pinned"]
    ok(run("ref", "rm", "demo/keep"))

    (tree / "README.txt").write_text("changed\n")
    ok(run("import", str(tree), "--ref", "demo/build-2"))
    assert ok(run("diff", "demo/build-1", "demo/build-2")) == "M README.txt\n"

    ok(run("checkout", "demo/build-1", "out"))
    assert (tmp_path / "out" / "README.txt").read_text() == "hello\n"
    ok(run("push", "demo/build-1", "--to", "./remote"))
    ok(run("--store", "./elsewhere", "pull", "demo/build-1", "--from", "./remote"))
    ok(run("--store", "./elsewhere", "checkout", "demo/build-1", "out2", "--copy"))
    assert (tmp_path / "out2" / "data" / "blob.bin").read_bytes() == BLOB


def test_console_script_tour(tree: Path, tmp_path: Path) -> None:
    """The installed ``casframe`` script, as a user runs it (kept short: each run costs)."""
    root = sh_text("import", str(tree), "--ref", "demo/build-1").strip()
    listing = json.loads(sh_text("ls", "-r", "demo/build-1", "--json"))
    assert listing[-1]["path"] == "latest" and listing[-1]["target"] == "README.txt"
    assert sh("cat", "demo/build-1", "data/blob.bin").stdout == BLOB

    pushed = json.loads(sh_text("push", "demo/build-1", "--to", "./remote", "--json"))
    assert pushed["root"] == root and pushed["blobs_sent"] == 6
    pulled = sh_text("--store", "./elsewhere", "pull", "demo/build-1", "--from", "./remote")
    assert pulled.startswith(f"pulled {root} from file://{tmp_path}/remote: copied 6 of 6 blobs")
    sh("--store", "./elsewhere", "checkout", "demo/build-1", "out")
    assert (tmp_path / "out" / "data" / "blob.bin").read_bytes() == BLOB


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--store", "nope://x", "ref", "list"], "unknown store scheme"),
        (["put", "missing-file"], "missing-file: No such file or directory"),
    ],
)
def test_console_script_errors(args: list[str], fragment: str) -> None:
    result = sh(*args, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr.startswith("casframe: error: ")
    assert fragment in stderr
    assert stderr.count("\n") == 1
    assert "Traceback" not in stderr


def test_the_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    """``make demo`` runs examples/demo.py; it must succeed and leave nothing behind."""
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, str(demo)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "M README.txt" in result.stdout
    assert list(scratch.iterdir()) == []
