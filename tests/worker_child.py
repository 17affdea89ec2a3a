"""A process that imports a tree with helper processes, for the tests that kill or interrupt it.

    python worker_child.py STORE_DIR SOURCE_DIR (stop-self | stop-helpers)

Helpers start from the first file on (the threshold is set to 1) and there are two of them.
Each helper's pid is printed on its own line (``helper PID``) as it is started. Then:

- ``stop-self``: once both helpers have greeted it (their store is open, they take work), this
  process stops itself (SIGSTOP), so that it can be killed with its helpers at work or waiting
  for more;
- ``stop-helpers``: every helper is stopped (SIGSTOP) as soon as it is started, so the import
  cannot end before the test interrupts it (SIGINT); ``interrupted, N helpers running`` is
  then printed, N counting the helpers not yet ended and reaped when the import gave up.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from typing import Any

import casframe.treeimport
from casframe import open_store
from casframe.workers import pool

_spawn = pool._spawn


def main(store_dir: str, source: str, mode: str) -> int:
    # A run that hangs prints every thread's stack (to the stderr the test shows) and exits
    # well before the test's own guard gives up on it.
    faulthandler.dump_traceback_later(90, exit=True)
    # Ctrl-C is what this child is tested for, so it takes SIGINT however it was started: a
    # process inherits an ignored SIGINT, and a shell starts its background commands so (a
    # test run started with `make test &` would otherwise hang here, as it should).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started: list[subprocess.Popen[Any]] = []

    def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        process = _spawn(argv, env)
        if mode == "stop-helpers":
            os.kill(process.pid, signal.SIGSTOP)
        started.append(process)
        print(f"helper {process.pid}", flush=True)
        return process

    greeted: list[int] = []
    answer = pool._Helper.answer

    def answer_and_stop(helper: pool._Helper) -> Any:
        value = answer(helper)
        if not helper.greeted:  # this was the greeting
            greeted.append(helper.process.pid)
            if len(greeted) == 2:
                os.kill(os.getpid(), signal.SIGSTOP)
        return value

    pool._spawn = spawn
    if mode == "stop-self":
        pool._Helper.answer = answer_and_stop  # type: ignore[method-assign]
    store = open_store(f"file://{store_dir}")
    casframe.treeimport.IMPORT_THRESHOLD_FILES = 1
    try:
        print(store.import_directory(source, stat_cache=False, jobs=2), flush=True)
    except KeyboardInterrupt:
        running = sum(1 for process in started if process.poll() is None)
        print(f"interrupted, {running} helpers running", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
