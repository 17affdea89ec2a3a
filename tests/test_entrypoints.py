"""Reading an entry-point group without importlib.metadata gives exactly what it gives."""

from __future__ import annotations

import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from casframe.entrypoints import entry_points


def _ours(group: str) -> list[tuple[str, str, str, str]]:
    return [(ep.name, ep.value, ep.distribution, ep.version) for ep in entry_points(group)]


def _importlib(group: str) -> list[tuple[str, str, str, str]]:
    return [
        (ep.name, ep.value, ep.dist.name if ep.dist else "?", ep.dist.version if ep.dist else "?")
        for ep in metadata.entry_points(group=group)
    ]


def _dist_info(site: Path, folder: str, name: str, version: str, entry_points: str) -> None:
    info = site / folder
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.mark.parametrize("group", ["casframe", "console_scripts", "pytest11"])
def test_installed_groups_match_importlib_metadata(group: str) -> None:
    assert _ours(group) == _importlib(group)
    assert _ours(group)  # each of these groups has entry points in the test environment


def test_names_and_versions_come_from_the_metadata_and_the_first_copy_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _dist_info(first, "fake_plug-2.0.dist-info", "Fake-Plug", "2.0",
               "[casframe]\nfake = fake_mod:plugin [extra]\n\n[other]\nx = y\n")
    _dist_info(second, "fake.plug-1.0.dist-info", "fake.plug", "1.0",
               "[casframe]\nold = old_mod\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    ours = _ours("casframe")
    assert ours == _importlib("casframe")
    assert ("fake", "fake_mod:plugin [extra]", "Fake-Plug", "2.0") in ours
    assert not [ep for ep in ours if ep[0] == "old"]  # the same distribution, found later


def test_a_zip_archive_on_sys_path_is_read_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped-3.1.dist-info/METADATA", "Name: zipped\nVersion: 3.1\n")
        zf.writestr("zipped-3.1.dist-info/entry_points.txt", "[casframe]\nzipped = zmod\n")
    monkeypatch.syspath_prepend(str(archive))
    assert ("zipped", "zmod", "zipped", "3.1") in _ours("casframe")
    assert _ours("casframe") == _importlib("casframe")


def test_load_imports_the_named_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ep_target_mod.py").write_text("class Outer:\n    class Inner:\n        pass\n")
    _dist_info(tmp_path, "target-1.dist-info", "target", "1",
               "[casframe]\nmod = ep_target_mod\nobj = ep_target_mod:Outer.Inner [x]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ep_target_mod", raising=False)
    loaded = {ep.name: ep.load() for ep in entry_points("casframe") if ep.name in ("mod", "obj")}
    assert loaded["mod"].__name__ == "ep_target_mod"
    assert loaded["obj"] is loaded["mod"].Outer.Inner
