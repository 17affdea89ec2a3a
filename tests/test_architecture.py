"""The layers of docs/architecture.md hold: no module of ``casframe/`` imports from a higher one.

The map is the table in docs/architecture.md (its one source); this test parses it, parses every
module with ``ast`` (imports inside functions and under ``if TYPE_CHECKING:`` included) and
fails on an import that goes up a layer, on a module in no layer, and on a module of casframe
importing a backend plugin.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import casframe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "casframe"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
TABLE_MARK = "<!-- layers: the map tests/test_architecture.py checks -->"

#: Modules the map names before they exist (being written elsewhere); each leaves this list the
#: day it lands, or the test says so.
NOT_YET: set[str] = set()

#: Imports that go up a layer today, each with the reason it is still here. Strict: an entry
#: whose import has gone fails the test until it is removed from this list.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

#: The backend packages shipped in plugins/: the core reaches them only through the registry.
BACKENDS = ("casframe_local", "casframe_memory", "casframe_s3", "casframe_grpc", "casframe_cache")


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    entries: tuple[str, ...]


def parse_layers(text: str) -> list[Layer]:
    """The layer table that follows :data:`TABLE_MARK` in ``text``."""
    _, found, rest = text.partition(TABLE_MARK)
    assert found, f"docs/architecture.md lacks the marker {TABLE_MARK!r} before its layer table"
    layers = []
    for line in rest.strip().splitlines():
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        heading = re.fullmatch(r"(\d+)\. (.+)", cells[0])
        if heading is None:
            continue  # the header and its rule
        entries = tuple(re.findall(r"`([^`]+)`", cells[1]))
        layers.append(Layer(int(heading[1]), heading[2], entries))
    assert [layer.number for layer in layers] == list(range(1, len(layers) + 1)), layers
    return layers


def covers(entry: str, module: str) -> bool:
    if entry.endswith(".*"):
        package = entry[:-2]
        return module == package or module.startswith(package + ".")
    return module == entry


def layer_of(layers: list[Layer], module: str) -> Layer | None:
    matches = [layer for layer in layers for entry in layer.entries if covers(entry, module)]
    assert len(matches) <= 1, f"{module} is in several layers: {[m.name for m in matches]}"
    return matches[0] if matches else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def casframe_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "_protos" not in path.relative_to(PACKAGE).parts
    }


def imported_modules(module: str, path: Path, modules: set[str]) -> set[str]:
    """Every module that ``module`` (the file ``path``) imports, anywhere in it, with
    ``from casframe import X`` resolved to the module defining ``X``; a module named with
    ``lazy_module("...")`` counts as imported."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(_resolve(base, alias.name, modules))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "lazy_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)  # imported when first used: a dependency all the same
    return found


def _resolve(base: str, name: str, modules: set[str]) -> str:
    """The module that ``from base import name`` depends on."""
    if f"{base}.{name}" in modules:
        return f"{base}.{name}"
    if base == "casframe" and name in casframe._LAZY:
        return casframe._LAZY[name]  # the public index: the name's own module
    return base


def upward_imports(layers: list[Layer], modules: dict[str, Path]) -> set[tuple[str, str]]:
    upward = set()
    for module, path in modules.items():
        own = layer_of(layers, module)
        assert own is not None
        for target in imported_modules(module, path, set(modules)):
            if not target.startswith("casframe.") and target != "casframe":
                continue
            theirs = layer_of(layers, target)
            if theirs is not None and theirs.number > own.number:
                upward.add((module, target))
    return upward


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    return parse_layers(ARCHITECTURE.read_text(encoding="utf-8"))


def test_every_module_is_in_one_layer(layers: list[Layer]) -> None:
    unmapped = [m for m in casframe_modules() if layer_of(layers, m) is None]
    assert not unmapped, f"modules in no layer of docs/architecture.md: {unmapped}"


def test_every_entry_of_the_map_names_a_module(layers: list[Layer]) -> None:
    modules = set(casframe_modules()) | {"casframe._protos"}
    entries = {entry for layer in layers for entry in layer.entries}
    absent = {e for e in entries if not any(covers(e, m) for m in modules)}
    assert absent == NOT_YET, (
        f"docs/architecture.md names modules that do not exist: {sorted(absent - NOT_YET)}; "
        f"NOT_YET lists modules that exist now: {sorted(NOT_YET - absent)}"
    )


def test_no_module_imports_from_a_higher_layer(layers: list[Layer]) -> None:
    upward = upward_imports(layers, casframe_modules())
    unexplained = sorted(upward - set(KNOWN_UPWARD))
    assert not unexplained, "imports from a higher layer (see docs/architecture.md): " + ", ".join(
        f"{module} -> {target}" for module, target in unexplained
    )
    gone = sorted(set(KNOWN_UPWARD) - upward)
    assert not gone, f"KNOWN_UPWARD lists imports that are gone: {gone}"


def test_the_core_never_imports_a_backend() -> None:
    offenders = [
        f"{module} -> {target}"
        for module, path in casframe_modules().items()
        for target in imported_modules(module, path, set())
        if target.split(".")[0] in BACKENDS
    ]
    assert not offenders, f"casframe/ imports backend plugins: {offenders}"


def test_an_upward_import_is_noticed(layers: list[Layer], tmp_path: Path) -> None:
    """The check itself: a foundation module naming the Store facade in a type, and importing
    the plugins inside a function, is caught twice."""
    digest = tmp_path / "digest.py"
    digest.write_text(
        "from typing import TYPE_CHECKING\n"
        "from casframe.errors import ConfigError\n"
        "if TYPE_CHECKING:\n"
        "    from casframe import Store\n"
        "def opener():\n"
        "    from casframe.plugins import open_store\n"
    )
    assert upward_imports(layers, {"casframe.digest": digest}) == {
        ("casframe.digest", "casframe.store"),
        ("casframe.digest", "casframe.plugins"),
    }
