"""How casframe's modules import each other: at module level, and plugins only public modules.

A function-level import of a casframe module hides a dependency (usually a cycle between two
layers that should not know each other); only the optional or heavy third-party dependencies
listed here may be imported where they are used. The built-in plugins live by the rule third
parties do: they import no private casframe module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASFRAME = ROOT / "casframe"
PLUGINS = ROOT / "plugins"

#: Packages (third-party, or heavy parts of the standard library kept off the start-up path)
#: that may be imported inside a function, each with the reason.
DEFERRED_IMPORTS = {
    "tqdm": "progress bars: only a command that draws one loads them",
    "platformdirs": "the user's directories: looked up only when no path is configured",
    "grpc_health": "the health service: loaded with the server that serves it",
    "google": "google.rpc's error details: only when the server answers an error with them",
    "boto3": "the S3 fixtures: optional (casframe[s3]), loaded by the fixture using them",
    "botocore": "the S3 fixtures: optional (casframe[s3]), loaded by the fixture using them",
    "moto": "the S3 fixtures: optional (casframe[test]), loaded by the fixture using them",
    "logging": "the moto server fixture quiets its logger: the pytest plugin stays cheap",
    "urllib": "the moto server fixture's reset call: the pytest plugin stays cheap",
    "tomllib": "compiles its regular expressions on import: only when there is a config file",
    "importlib": "importlib.metadata: the slow path the entry-point cache exists to avoid",
}


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if "_protos" not in path.parts:  # generated code
            yield path


def _function_level_imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                for alias in inner.names:
                    yield inner.lineno, alias.name
            elif isinstance(inner, ast.ImportFrom):
                module = inner.module or ""
                yield inner.lineno, "." * inner.level + module


def test_no_function_level_imports_in_casframe(tmp_path: Path) -> None:
    # The check itself sees an import inside a function, and the exceptions are no casframe
    # module.
    probe = tmp_path / "late.py"
    probe.write_text("def f():\n    from casframe.tree import walk\n    return walk\n")
    assert list(_function_level_imports(probe)) == [(2, "casframe.tree")]
    assert not any(name.startswith("casframe") for name in DEFERRED_IMPORTS)

    found = [
        f"{path.relative_to(ROOT)}:{line}: import of {module}"
        for path in _python_files(CASFRAME)
        for line, module in _function_level_imports(path)
        if module.split(".")[0] not in DEFERRED_IMPORTS
    ]
    assert not found, "imports inside functions:\n" + "\n".join(found)


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def test_plugins_import_no_private_casframe_module() -> None:
    private = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _python_files(PLUGINS)
        for line, module in _imported_modules(path)
        if module.split(".")[0] == "casframe"
        and any(part.startswith("_") for part in module.split(".")[1:])
    ]
    assert not private, "plugins importing private casframe modules:\n" + "\n".join(private)


def test_the_store_and_its_algorithms_load_without_protobuf() -> None:
    """Opening a store and reading refs (``casframe ref list``) loads no message classes:
    the generated modules are loaded by the code that builds a message, on first use."""
    code = (
        "import sys\n"
        "import casframe.store, casframe.maintenance, casframe.transfer, casframe.refkinds\n"
        "import casframe.reapi\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('google', 'grpc', "
        "'casframe._protos')))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_a_checkout_loads_no_protobuf(tmp_path: Path) -> None:
    """A whole checkout (reading, measuring and writing a tree of files, directories and
    symlinks) decodes its Directories without protobuf (:func:`casframe.directory.read_directory`):
    the generated modules cost a `casframe checkout` more than reading the whole tree."""
    source = tmp_path / "source"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (source / "sub" / "run.sh").chmod(0o755)
    (source / "sub" / "deeper" / "b").write_text("b")
    (source / "link").symlink_to("a.txt")
    store = f"file://{tmp_path / 'store'}"
    code = (
        "import sys, casframe\n"
        f"with casframe.open_store({store!r}) as store:\n"
        f"    root = store.import_directory({str(source)!r}, stat_cache=False)\n"
        "    before = [m for m in sys.modules if m.startswith(('google', 'casframe._protos'))]\n"
        "    for module in before:\n"
        "        del sys.modules[module]\n"
        "    import casframe._messages as messages\n"
        "    for name in list(vars(messages)):\n"
        "        if name in messages._MODULES or name == 'DecodeError':\n"
        "            delattr(messages, name)\n"
        f"    store.checkout(root, {str(tmp_path / 'out')!r}, jobs=1)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('google', 'casframe._protos')))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "out" / "sub" / "deeper" / "b").read_text() == "b"
    assert (tmp_path / "out" / "link").readlink() == Path("a.txt")


def _modules_loaded(argv: list[str], **run: object) -> set[str]:
    """The modules a whole process imports, from ``python -X importtime``'s report."""
    result = subprocess.run(  # stdout may be binary (a helper's greeting)
        [sys.executable, "-X", "importtime", *argv], capture_output=True, timeout=120,
        check=True, **run,  # type: ignore[call-overload]
    )
    return {
        line.rpartition("|")[2].strip()
        for line in result.stderr.decode().splitlines()
        if line.startswith("import time:")
    }


#: What a whole `casframe checkout` on one job (and a checkout helper) does without: thread
#: pools (concurrent.futures brings logging and traceback), the stat cache of import, the URL
#: quoting of helpers' stores, the library search of ctypes.util (subprocess, tempfile).
_NOT_FOR_CHECKOUT = {
    "concurrent.futures", "logging", "traceback", "queue", "casframe.statcache",
    "casframe.treeimport", "urllib.parse", "ipaddress", "ctypes.util", "subprocess", "tempfile",
}


_FILES = 300


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_checkout_command_loads_no_thread_pool_nor_import_machinery(
    tmp_path: Path, jobs: str
) -> None:
    """On one job, and on two (a checkout by hardlinks below the helpers' threshold links in
    the command's own thread: two threads would hand the interpreter lock to each other
    around every link)."""
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub" / "b").write_text("b")
    for i in range(_FILES):
        (source / "sub" / f"f{i}").write_text(str(i))
    store = str(tmp_path / "store")
    # The import fills an entry-point cache of this test's own, which the checkout then finds
    # (its import path without the working folder, -P, whose time stamp keeps changing).
    env = {**os.environ, "CASFRAME_ENTRY_POINT_CACHE": str(tmp_path / "entry-points")}
    subprocess.run(
        [sys.executable, "-P", "-m", "casframe.cli", "--store", store, "import", str(source),
         "--ref", "t", "--no-stat-cache"], check=True, capture_output=True, timeout=120, env=env,
    )
    out = tmp_path / "out"
    argv = ["--store", store, "checkout", "t", str(out), "--jobs", jobs]
    code = (
        "import sys\n"
        "from casframe.cli.group import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
        check=True, env=env,
    )
    loaded = set(result.stdout.split())
    assert "casframe.checkout" in loaded  # the command ran in this process
    assert not loaded & _NOT_FOR_CHECKOUT
    assert (out / "sub" / "b").read_text() == "b"
    last = _FILES - 1
    assert (out / "sub" / f"f{last}").read_text() == str(last)


def test_a_checkout_helper_starts_without_the_library_search_or_the_stat_cache(
    tmp_path: Path,
) -> None:
    # A helper whose input ends at once: it opens the store, greets, and exits.
    store = tmp_path / "store"
    (store / "objects").mkdir(parents=True)
    loaded = _modules_loaded(
        ["-P", "-m", "casframe.workers.worker", "casframe_local.store:open_local_store",
         f"file://{store}", str(os.getpid())],
        stdin=subprocess.DEVNULL,
    )
    assert "casframe.workers.tasks" in loaded
    assert not loaded & _NOT_FOR_CHECKOUT
