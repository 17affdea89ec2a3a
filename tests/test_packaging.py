"""The built wheel (not only the editable install) carries everything a user needs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("casframe-*.whl")
    return built


def test_wheel_contains_protos_plugins_and_entry_points(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "casframe/py.typed",
        "casframe/_protos/build/bazel/remote/execution/v2/remote_execution_pb2.py",
        "casframe/_protos/build/bazel/remote/execution/v2/remote_execution_pb2_grpc.py",
        "casframe/_protos/google/bytestream/bytestream_pb2.py",
        "casframe/_protos/build/bazel/remote/asset/v1/remote_asset_pb2.py",
        "casframe/_protos/buildstream/v2/buildstream_pb2.py",
        "casframe/testing/plugin.py",
        "casframe_local/__init__.py",
        "casframe_memory/__init__.py",
        "casframe_cache/__init__.py",
        "casframe_cache/store.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[casframe]" in text and "local = casframe_local" in text
    assert "cache = casframe_cache" in text
    assert "[pytest11]" in text and "casframe.testing.plugin" in text
    assert "[console_scripts]" in text and "casframe = casframe.cli:main" in text


def test_installed_wheel_opens_a_store(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True,
        capture_output=True,
    )
    script = (
        "import casframe, casframe_local, sys;"
        f"assert casframe.__file__.startswith({str(target)!r}), casframe.__file__;"
        f"assert casframe_local.__file__.startswith({str(target)!r});"
        f"s = casframe.open_store('file://{tmp_path}/store');"
        f"d = s.import_directory({str(ROOT / 'protos')!r});"
        "print(d, sorted(p.name for p in casframe.list_plugins()))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "'local'" in result.stdout and "'memory'" in result.stdout
