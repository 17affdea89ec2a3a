"""What casframe's value classes cost to define and to make, against frozen slotted dataclasses.

    .venv/bin/python bench/value_classes.py [--quick] [--repeat N]

* construction: casframe's classes made for every blob, ref or Directory (``BlobInfo``,
  ``RefInfo``, ``TreeSize``, which write their own ``__init__``) and ones made with the shared
  ``__init__`` of :mod:`casframe.values` (``BlobLimits`` by keyword, ``StrayEntry``), each
  against a ``@dataclass(frozen=True, slots=True)`` twin with the same fields, made the same
  way in the same run; target for the per-blob classes: at most 1.0x.
* definition: defining a three-field class with :func:`casframe.values.value_class`, against
  defining it as a frozen slotted dataclass; the reason the value classes exist.

CPU time of this process (``time.process_time``), the two sides alternated (A B A B ...), the
median of ``--repeat`` (15; 5 with ``--quick``) rounds: the ratios hold on a busy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from run import loadavg

from casframe import SHA256, BlobInfo, BlobLimits, Digest, RefInfo, StrayEntry
from casframe.treesize import TreeSize
from casframe.values import value_class

TARGET = 1.0  # x the dataclass twin, for the classes made per blob, ref or Directory


def _twin(cls: type) -> type:
    """A frozen slotted dataclass with ``cls``'s fields, defaults and ``__post_init__``."""
    specs = []
    for f in dataclasses.fields(cls):
        default = {} if f.default is dataclasses.MISSING else {"default": f.default}
        specs.append((f.name, f.type, dataclasses.field(**default)))
    checks = {"__post_init__": cls.__post_init__} if hasattr(cls, "__post_init__") else {}
    return dataclasses.make_dataclass(f"{cls.__name__}Twin", specs, frozen=True, slots=True,
                                      namespace=checks)


def _cpu(make: Callable[[], Any], count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        make()
    return time.process_time() - start


_FROZEN_DATACLASS = dataclasses.dataclass(frozen=True, slots=True)


def _define(decorate: Callable[[type], type]) -> type:
    @decorate
    class Record:
        name: str
        size: int
        mtime: float = 0.0

    return Record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, fewer calls each")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    rounds = 5 if args.quick else args.repeat
    calls = 20_000 if args.quick else 100_000
    digest = Digest(SHA256.empty_hash, 0)
    cases: list[tuple[str, type, Callable[[type], Any]]] = [
        ("BlobInfo(digest, mtime)", BlobInfo, lambda c: c(digest, 1.5)),
        ("RefInfo(name, digest, accessed)", RefInfo, lambda c: c("a/b", digest, 2.5)),
        ("TreeSize(entries, files, bytes)", TreeSize, lambda c: c(3, 2, 10)),
        ("StrayEntry(name, what)", StrayEntry, lambda c: c("objects/zz", "a directory")),
        ("BlobLimits(max_concurrency=16)", BlobLimits, lambda c: c(max_concurrency=16)),
    ]
    load_before = loadavg()
    print(f"{'construction':<34} {'ours us':>8} {'dataclass us':>13} {'ratio':>6}  target")
    for label, cls, make in cases:
        twin = _twin(cls)
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(_cpu(lambda cls=cls, make=make: make(cls), calls))
            theirs.append(_cpu(lambda twin=twin, make=make: make(twin), calls))
        a, b = statistics.median(ours) / calls * 1e6, statistics.median(theirs) / calls * 1e6
        per_item = cls in (BlobInfo, RefInfo, TreeSize)
        verdict = (f"<= {TARGET}x: {'ok' if a / b <= TARGET else 'MISSED'}" if per_item
                   else "(not made per item)")
        print(f"{label:<34} {a:>8.3f} {b:>13.3f} {a / b:>6.2f}  {verdict}")
    definitions = 20 if args.quick else 100
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_cpu(lambda: _define(value_class), definitions))
        theirs.append(_cpu(lambda: _define(_FROZEN_DATACLASS), definitions))
    a = statistics.median(ours) / definitions * 1e3
    b = statistics.median(theirs) / definitions * 1e3
    print(f"\n{'definition of a 3-field class':<34} {a:>8.3f} ms {b:>10.3f} ms {a / b:>6.2f}")
    print(f"load average before {load_before}, after {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
