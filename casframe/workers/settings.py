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
#: Measured by ``bench/workers.py``'s sweep (in-process time / helpers' time, medians of three
#: alternating rounds, load 2-3): 0.66 at 2,000 files, 0.97 at 4,000, 1.21 at 8,000; so
#: helpers pay from about 4,500. Below this the import stays in the process; files whose
#: digest the stat cache remembers do not count.
IMPORT_THRESHOLD_FILES = 4500
#: Files a checkout must write or link before helper processes pay. Linking is spent in the
#: kernel and already runs on two threads (a link releases the interpreter lock), so helpers
#: gain less per file than for import. The same sweep: 0.49 at 4,000 files, 0.71 at 8,000,
#: 1.11 at 20,000 (0.518 s in the process, 0.465 s with helpers); so helpers pay from about
#: 16,000.
CHECKOUT_THRESHOLD_FILES = 16_000


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
