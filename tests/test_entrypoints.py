"""The ``casframe`` entry points remembered between commands (casframe.entrypoints)."""

from __future__ import annotations

import json
import json.decoder
import os
import subprocess
import sys
import time
from pathlib import Path

import platformdirs
import pytest

from casframe import entrypoints
from casframe.entrypoints import (
    ENTRY_POINT_CACHE_ENV,
    EntryPointRecord,
    cache_path,
    entry_points,
)
from casframe.plugins import open_store
from casframe.userdirs import user_dir

GROUP = "casframe-test-entrypoints"
AN_HOUR_AGO = time.time() - 3600


def _install(site: Path, dist: str, body: str) -> None:
    """A distribution ``dist`` 1.0 with ``body`` as its entry_points.txt, in folder ``site``."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(body)


def _age(folder: Path) -> None:
    """As if the folder had last changed an hour ago (installs long done)."""
    os.utime(folder, (AN_HOUR_AGO, AN_HOUR_AGO))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENTRY_POINT_CACHE_ENV, str(tmp_path / "entry-points"))


def _cache() -> str:
    path = cache_path()
    assert path is not None
    return path


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _names(records: list[EntryPointRecord]) -> list[tuple[str, str, str, str]]:
    return sorted((r.name, r.value, r.distribution, r.version) for r in records)


def test_the_cache_answers_what_the_metadata_says(site: Path) -> None:
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _age(site)
    first = entry_points(GROUP)
    assert _names(first) == [("alpha", "json:dumps", "one", "1.0")]
    assert os.path.exists(_cache())
    assert _names(entry_points(GROUP)) == _names(first)
    assert first[0].load() is __import__("json").dumps


def test_a_later_install_is_seen(site: Path) -> None:
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _age(site)
    assert [r.name for r in entry_points(GROUP)] == ["alpha"]
    _install(site, "two", f"[{GROUP}]\nbeta = json:loads\n")
    # Even an install whose folder time is still old enough to be trusted.
    os.utime(site, (AN_HOUR_AGO + 60, AN_HOUR_AGO + 60))
    assert sorted(r.name for r in entry_points(GROUP)) == ["alpha", "beta"]


def test_a_removed_distribution_is_forgotten(site: Path) -> None:
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _install(site, "two", f"[{GROUP}]\nbeta = json:loads\n")
    _age(site)
    assert len(entry_points(GROUP)) == 2
    for path in sorted((site / "two-1.0.dist-info").iterdir()):
        path.unlink()
    (site / "two-1.0.dist-info").rmdir()
    os.utime(site, (AN_HOUR_AGO + 60, AN_HOUR_AGO + 60))
    assert [r.name for r in entry_points(GROUP)] == ["alpha"]


def test_a_folder_changed_just_now_is_read_but_not_remembered(site: Path) -> None:
    """Its next change may come within the same tick of the file system's clock."""
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    assert [r.name for r in entry_points(GROUP)] == ["alpha"]
    assert not os.path.exists(_cache())


def test_a_different_import_path_is_a_different_answer(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _age(site)
    assert entry_points(GROUP) == []
    other = tmp_path / "other"
    _install(other, "three", f"[{GROUP}]\ngamma = json:dumps\n")
    _age(other)
    monkeypatch.syspath_prepend(str(other))
    assert [r.name for r in entry_points(GROUP)] == ["gamma"]


@pytest.mark.parametrize("content", [b"", b"not marshal data", b"\xff" * 40])
def test_a_damaged_cache_is_ignored_and_replaced(site: Path, content: bytes) -> None:
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _age(site)
    entry_points(GROUP)
    Path(_cache()).write_bytes(content)
    assert [r.name for r in entry_points(GROUP)] == ["alpha"]
    assert Path(_cache()).read_bytes() != content


def test_an_unwritable_cache_directory_costs_only_speed(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = Path(_cache()).parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the cache folder would go")
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _age(site)
    assert [r.name for r in entry_points(GROUP)] == ["alpha"]


def test_fresh_reads_the_metadata_whatever_the_cache_says(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _age(site)
    entry_points(GROUP)
    stale = [EntryPointRecord("ghost", "json:dumps", "gone", "0")]
    monkeypatch.setattr(entrypoints, "_load_cache", lambda path, key: stale)
    assert entry_points(GROUP) == stale
    assert [r.name for r in entry_points(GROUP, fresh=True)] == ["alpha"]


def test_value_forms_load_like_importlib_metadata() -> None:
    assert EntryPointRecord("a", "json", "d", "1").load() is json
    assert EntryPointRecord("a", "json.decoder:JSONDecoder.decode", "d", "1").load() is (
        json.decoder.JSONDecoder.decode
    )
    assert EntryPointRecord("a", "json:dumps [extra]", "d", "1").load() is json.dumps


def test_off_reads_the_metadata_every_time(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENTRY_POINT_CACHE_ENV, "off")
    assert cache_path() is None
    _install(site, "one", f"[{GROUP}]\nalpha = json:dumps\n")
    _age(site)
    assert [r.name for r in entry_points(GROUP)] == ["alpha"]


def test_a_command_skips_importlib_metadata_once_the_cache_is_written(tmp_path: Path) -> None:
    """What the cache is for: ``casframe ref list`` without importing importlib.metadata."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    del env[ENTRY_POINT_CACHE_ENV]
    store = tmp_path / "store"
    probe = (
        "import sys; from casframe.cli.group import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "finally:\n    print('METADATA' if 'importlib.metadata' in sys.modules else 'NONE',"
        " file=sys.stderr)\n"
    )
    cmd = [sys.executable, "-c", probe, "--store", str(store), "ref", "list"]
    open_store(f"file://{store}").close()
    # The first command reads the metadata (and remembers it unless a folder on the import
    # path changed in the last seconds, as right after an install: then try again later).
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        if os.path.exists(os.path.join(env["XDG_CACHE_HOME"], "casframe", "entry-points")):
            break
        assert time.monotonic() < deadline, "the entry-point cache was never written"
        time.sleep(entrypoints.FRESH_SECONDS)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "NONE"
    plugins = subprocess.run(
        [sys.executable, "-m", "casframe.cli", "plugins", "--json"],
        env=env, check=True, capture_output=True, text=True,
    )
    assert '"local"' in plugins.stdout


# -- the user's folders, as platformdirs would give them ---------------------------------------


@pytest.mark.parametrize("kind", ["cache", "config"])
@pytest.mark.parametrize(
    "home, xdg",
    [
        ("/home/ann", None),
        ("/home/ann/", ""),
        ("/home/ann", "/srv/xdg"),
        ("/home/ann", "relative/xdg"),
        ("relative-home", None),
        (None, None),
        (None, "/srv/xdg"),
        ("/", None),
    ],
)
def test_user_dirs_match_platformdirs(
    kind: str, home: str | None, xdg: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = "XDG_CACHE_HOME" if kind == "cache" else "XDG_CONFIG_HOME"
    for name, value in (("HOME", home), (variable, xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    expected = (
        platformdirs.user_cache_dir("casframe")
        if kind == "cache"
        else platformdirs.user_config_dir("casframe")
    )
    assert user_dir(kind) == expected  # type: ignore[arg-type]


def test_each_import_path_keeps_its_own_file(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command run from another folder (another first entry of sys.path) does not replace
    the answer remembered for this one."""
    here = _cache()
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    assert _cache() != here
