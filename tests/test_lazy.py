"""casframe.lazy: modules named at the top of a file, imported when first used."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from casframe.lazy import lazy_module

BODY = """
    import time
    RUNS.append(1)
    time.sleep(0.05)  # a slow import: other threads arrive while it runs
    def answer():
        return 42
"""


@pytest.fixture
def slow_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "casframe_lazy_probe"
    (tmp_path / f"{name}.py").write_text(
        "from casframe_lazy_runs import RUNS\n" + textwrap.dedent(BODY)
    )
    (tmp_path / "casframe_lazy_runs.py").write_text("RUNS = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop("casframe_lazy_runs", None)


def test_nothing_is_imported_until_an_attribute_is_read(slow_module: str) -> None:
    module = lazy_module(slow_module)
    assert slow_module not in sys.modules
    assert module.answer() == 42
    assert slow_module in sys.modules
    assert sys.modules["casframe_lazy_runs"].RUNS == [1]


def test_threads_arriving_together_run_the_module_once(slow_module: str) -> None:
    module = lazy_module(slow_module)
    start = threading.Barrier(8)
    answers: list[int] = []

    def use() -> None:
        start.wait()
        answers.append(module.answer())

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == [42] * 8
    assert sys.modules["casframe_lazy_runs"].RUNS == [1]


def test_a_patched_function_is_seen_through_the_lazy_name(
    slow_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = lazy_module(slow_module)
    assert module.answer() == 42
    monkeypatch.setattr(sys.modules[slow_module], "answer", lambda: 7)
    assert module.answer() == 7


def test_a_missing_module_or_attribute_raises_as_an_import_would() -> None:
    with pytest.raises(ModuleNotFoundError):
        lazy_module("casframe_no_such_module").anything  # noqa: B018
    with pytest.raises(AttributeError):
        lazy_module("json").no_such_function  # noqa: B018
