"""The built wheel (not only the editable install) carries everything a user needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
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
    assert "[console_scripts]" in text and "casframe = casframe.__main__:main" in text


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


# -- a release a user can install, from a clean clone -----------------------------------------

# Installing into a fresh virtual environment downloads casframe's dependencies.
_INSTALL_TIMEOUT = 900


def _env() -> dict[str, str]:
    """The environment without this test run's virtualenv and source tree in it."""
    return {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CI")
    }


def _run(*args: str | Path, cwd: Path, timeout: float = _INSTALL_TIMEOUT) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _leftovers(tree: Path) -> list[str]:
    """What a build left in a source tree: a project's build/ or dist/, any *.egg-info."""
    projects = [tree, tree / "examples" / "casframe-sqlite"]
    found = [p for project in projects for p in (project / "build", project / "dist")]
    found += tree.rglob("*.egg-info")
    return sorted(str(p.relative_to(tree)) for p in found if p.exists())


@pytest.fixture(scope="module")
def clean_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files a fresh clone of this working tree has (tracked and new, not ignored ones)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    clone = tmp_path_factory.mktemp("clone") / "casframe"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


@pytest.fixture(scope="module")
def release(clean_clone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of casframe and of the sqlite example, into one folder."""
    dist = tmp_path_factory.mktemp("dist")
    for project in (clean_clone, clean_clone / "examples" / "casframe-sqlite"):
        _run(sys.executable, "-m", "build", "--outdir", dist, project, cwd=dist)
    return dist


def test_the_release_passes_twine_check(release: Path, clean_clone: Path) -> None:
    built = sorted(p.name for p in release.iterdir())
    assert built == [
        "casframe-0.1.0-py3-none-any.whl", "casframe-0.1.0.tar.gz",
        "casframe_sqlite-0.1.0-py3-none-any.whl", "casframe_sqlite-0.1.0.tar.gz",
    ]
    output = _run(sys.executable, "-m", "twine", "check", "--strict", *sorted(release.iterdir()),
                  cwd=release)
    assert output.count("PASSED") == 4, output
    assert _leftovers(clean_clone) == []


def test_the_wheels_work_in_a_fresh_venv_without_the_source_tree(
    release: Path, clean_clone: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python, casframe = venv / "bin" / "python", venv / "bin" / "casframe"
    _run(python, "-m", "pip", "install", "--quiet", *release.glob("*.whl"), "pytest",
         cwd=tmp_path)
    away = tmp_path / "elsewhere"  # no checkout in sight: only what the wheels installed
    away.mkdir()
    where = _run(python, "-c", "import casframe, casframe_sqlite; print(casframe.__file__); "
                 "print(casframe_sqlite.__file__)", cwd=away)
    assert all(line.startswith(str(venv)) for line in where.splitlines()), where

    assert _run(casframe, "--version", cwd=away) == "casframe, version 0.1.0\n"
    assert "sqlite  casframe-sqlite  0.1.0    sqlite://" in _run(casframe, "plugins", cwd=away)
    shutil.copy(ROOT / "examples" / "demo.py", away / "demo.py")
    assert "M README.txt" in _run(python, "demo.py", cwd=away)

    suite = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
                 "casframe.testing.test_memory", cwd=away)
    assert " passed" in suite and "failed" not in suite and "skipped" not in suite, suite

    # The sqlite example's own tests, from its sdist, against its installed wheel.
    with tarfile.open(release / "casframe_sqlite-0.1.0.tar.gz") as sdist:
        sdist.extractall(away, filter="data")
    tests = away / "casframe_sqlite-0.1.0" / "tests"
    suite = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, cwd=away)
    assert " passed" in suite and "failed" not in suite and "skipped" not in suite, suite


def _console_lines(readme: Path, prefix: str) -> list[str]:
    """The commands of a README's ``console`` blocks that start with ``prefix``."""
    return [
        line.removeprefix("$ ") for line in readme.read_text().splitlines()
        if line.startswith(f"$ {prefix}")
    ]


def test_the_sqlite_readme_installs_from_a_clean_clone(clean_clone: Path) -> None:
    readme = clean_clone / "examples" / "casframe-sqlite" / "README.md"
    steps = _console_lines(readme, "python3 -m venv") + _console_lines(readme, "pip install")
    assert steps == ["python3 -m venv venv && . venv/bin/activate",
                     "pip install . ./examples/casframe-sqlite"]
    script = " && ".join([*steps, "casframe plugins"])
    output = _run("bash", "-c", script, cwd=clean_clone)
    assert "sqlite  casframe-sqlite  0.1.0    sqlite://" in output
    shutil.rmtree(clean_clone / "venv")
    assert _leftovers(clean_clone) == []


def test_make_demo_installs_casframe_and_its_runtime_dependencies_only(
    clean_clone: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "demo-venv"
    output = _run("make", "demo", f"VENV={venv}", cwd=clean_clone)
    assert "M README.txt" in output
    installed = _run(venv / "bin" / "python", "-m", "pip", "list", "--format=freeze",
                     cwd=tmp_path)
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert "casframe" in names
    assert names & {"pytest", "moto", "mypy", "ruff", "cryptography", "grpcio-tools",
                    "boto3", "build", "twine"} == set()
    assert _leftovers(clean_clone) == []
