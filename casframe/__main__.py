"""The ``casframe`` command's entry point: the console script, and ``python -m casframe``.

What a short command loads (click, casframe's command line, the plugins, the store's modules)
lives as long as the process. Python's cyclic garbage collector would walk it again and again
while it loads, and once more at exit, finding nothing to free: a tenth of what ``casframe ref
list`` costs. So the collector is held off while the command line loads, what is loaded by then
is moved out of its sight (:func:`gc.freeze`), and it runs as usual for the command itself.

Importing this module loads neither click nor the command line (:func:`main` does), and
changes nothing: the collector is only held off inside :func:`main`.
"""

from __future__ import annotations

import gc

from casframe.lazy import lazy_module

TYPE_CHECKING = False  # not typing's: see casframe/__init__.py
if TYPE_CHECKING:
    from collections.abc import Sequence

    from casframe.cli import group
else:  # imported by main, with the collector held off
    group = lazy_module("casframe.cli.group")

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``casframe`` command (``argv``: the arguments, default ``sys.argv[1:]``)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        run = group.main  # imports click and the command group
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    run(argv)


if __name__ == "__main__":
    main()
