"""The settings of local parallel work: how many processes, and from which size on.

Kept apart from the runners so that opening a store (which reads the ``jobs`` option) imports
nothing but this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from casframe.errors import ConfigError

__all__ = [
    "CHECKOUT_THRESHOLD_FILES",
    "DEFAULT_JOBS",
    "IMPORT_THRESHOLD_FILES",
    "JOBS_OPTION",
    "jobs_from_options",
]


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Processes (or threads) a local import or checkout uses when neither the call, ``--jobs``
#: nor the store's ``jobs`` option says otherwise: one per core this process may run on.
DEFAULT_JOBS = _usable_cores()
#: The store option (URL query ``?jobs=N`` or a named store's ``options``) that sets it.
JOBS_OPTION = "jobs"
#: Files an import must read and store before helper processes pay for their start-up.
#: A helper costs ~0.12 s of CPU and ~22 MiB to start; an import spends ~100 µs a file in one
#: process, so two helpers gain ~50 µs a file and pay from about 3,000 files on
#: (``bench/workers.py`` measures the crossing). Below this the import stays in the process;
#: files whose digest the stat cache remembers do not count.
IMPORT_THRESHOLD_FILES = 3000
#: Files a checkout must write or link before helper processes pay. Linking costs ~27 µs a
#: file, spent in the kernel, and already runs on two threads (a link releases the interpreter
#: lock), so helpers gain little per file while their start-up is most of what a whole
#: ``casframe checkout`` of 20,000 files costs beyond ``cp -al``: set high until a quiet
#: machine's ``bench/workers.py`` sweep shows where they pay.
CHECKOUT_THRESHOLD_FILES = 50_000


def jobs_from_options(options: Mapping[str, Any], url: str) -> int | None:
    """The store's ``jobs`` option as a number, or None when it is not set."""
    text = options.get(JOBS_OPTION)
    if text is None:
        return None
    try:
        jobs = int(str(text))
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"option {JOBS_OPTION}={text!r} in {url} is not a count of 1 or more")
    return jobs
