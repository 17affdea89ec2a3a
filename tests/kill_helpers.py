"""SIGKILL a casframe command at a random moment, for the crash tests.

A :class:`Killer` starts a command (import, transfer, prune, serve) in a child process, waits
until the child reports that it is about to work, then kills it after a random delay drawn from
its seeded generator. The child is forked (a few milliseconds: most kills land in the work) or,
with ``spawn=True``, a fresh interpreter running this file (for children that use grpc, which
must not inherit a forked parent's threads). The outcome the tests assert — fsck finds nothing
wrong, and the command run again gives what an uninterrupted run gives — must hold wherever the
kill lands; the delay only spreads the kills over the work.

Run as a script, this file is the spawned child: ``python kill_helpers.py FD COMMAND ARGS...``
reports on the pipe FD as a forked child does.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from casframe import CasframeError, Store, open_store
from casframe.maintenance import fsck, prune
from casframe.server import Server

#: Seconds a child has to report that it started: a fresh interpreter on a busy machine can
#: take several; a fork of a process with threads can hang before it gets going.
READY_TIMEOUT = 60
#: Seconds a child whose peer was killed has to give up (a hang guard, never the outcome).
EXIT_TIMEOUT = 120
#: Set in a child's environment: behave as on a file system without ``O_TMPFILE``, where
#: uploads go through named temp files in ``tmp/`` that a kill leaves behind.
NO_TMPFILE_ENV = "CASFRAME_TEST_NO_TMPFILE"

Ready = Callable[..., None]


def _import(ready: Ready, url: str, source: str, ref: str) -> None:
    store = open_store(url)
    ready()
    store.set_ref(ref, store.import_directory(source))


def _transfer(ready: Ready, source_url: str, dest_url: str, ref: str) -> None:
    source, dest = open_store(source_url), open_store(dest_url)
    ready()
    source.push(dest, ref)


def _prune(ready: Ready, url: str) -> None:
    store = open_store(url)
    ready()
    prune(store, grace_period=0)


def _serve(ready: Ready, url: str) -> None:
    """``casframe serve URL`` on a free loopback port, until killed; reports the port."""
    server = Server(open_store(url), listen="127.0.0.1:0")
    ready(server.start())
    while True:
        time.sleep(3600)


COMMANDS: dict[str, Callable[..., None]] = {
    "import": _import,
    "transfer": _transfer,
    "prune": _prune,
    "serve": _serve,
}


def _child_main(write_end: int, command: str, args: list[str]) -> int:
    """Run ``command`` in this (child) process, reporting ``ready [DETAIL]`` and ``done SECONDS``
    on ``write_end``; the exit status: 0, 1 after a casframe error, 2 after any other."""
    try:
        if os.environ.get(NO_TMPFILE_ENV) and hasattr(os, "O_TMPFILE"):
            del os.O_TMPFILE  # this process only: the local store probes for it
        started = [0.0]

        def ready(detail: object = "") -> None:
            started[0] = time.monotonic()
            os.write(write_end, f"ready {detail}".strip().encode() + b"\n")

        COMMANDS[command](ready, *args)
        os.write(write_end, b"done %f\n" % (time.monotonic() - started[0]))
        return 0
    except CasframeError as exc:  # what a user would see: one line
        print(f"{command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 2


class Child:
    """A started command: forked (``pid``) or spawned (``process``)."""

    def __init__(self, name: str, read_end: int, pid: int, process: subprocess.Popen[bytes] | None):
        self.name = name
        self.read_end = read_end
        self.pid = pid
        self.process = process
        self.detail = ""  # what the command said with "ready" (the server's port)
        self._status: int | None = None  # as os.waitstatus_to_exitcode: -SIGNAL if killed
        self._unread = b""  # read from the pipe after the "ready" line

    def poll(self) -> int | None:
        if self._status is None:
            if self.process is not None:
                self._status = self.process.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.name} did not end within {timeout} s")
            time.sleep(0.01)
        return status

    def kill(self) -> bool:
        """SIGKILL it if it is still running; whether it was."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, signal.SIGKILL)
        self.wait()
        return True

    def messages(self) -> list[str]:
        """What it reported since the last call (after it ended: everything)."""
        chunks = [self._unread]
        self._unread = b""
        while select.select([self.read_end], [], [], 0)[0]:
            chunk = os.read(self.read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode().splitlines()

    def close(self) -> None:
        """Kill it if it still runs, and close its pipe (twice is harmless)."""
        self.kill()
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1


class Killer:
    """Starts commands and kills them after a random delay; see the module docstring."""

    def __init__(self, rng: random.Random, first_estimate: dict[str, float]) -> None:
        self.rng = rng
        #: Per command, the delay up to which kills are drawn: first a guess, then the run time
        #: of the last run that finished before its kill, so kills land mid-work on any machine.
        self.estimate = dict(first_estimate)
        self.kills = 0  # the process was still running when killed
        self.interrupted = 0  # ... and had not finished its work

    def start(
        self, command: str, *args: object, spawn: bool = False, without_tmpfile: bool = False
    ) -> Child:
        """Start ``command`` and wait until it reports ready (its ``detail`` set)."""
        read_end, write_end = os.pipe()
        argv = [str(a) for a in args]
        process = None
        if spawn:
            env = dict(os.environ)
            env.pop(NO_TMPFILE_ENV, None)
            if without_tmpfile:
                env[NO_TMPFILE_ENV] = "1"
            process = subprocess.Popen(
                [sys.executable, __file__, str(write_end), command, *argv],
                pass_fds=(write_end,),
                env=env,
            )
            pid = process.pid
        else:
            pid = os.fork()
            if pid == 0:  # the child: never return into pytest
                status = 1
                try:
                    os.close(read_end)
                    if without_tmpfile:
                        os.environ[NO_TMPFILE_ENV] = "1"
                    status = _child_main(write_end, command, argv)
                finally:
                    os._exit(status)
        os.close(write_end)
        child = Child(command, read_end, pid, process)
        try:
            received = b""
            deadline = time.monotonic() + READY_TIMEOUT
            while b"\n" not in received:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([read_end], [], [], left)[0]:
                    raise AssertionError(f"{command} did not start within {READY_TIMEOUT} s")
                chunk = os.read(read_end, 4096)
                if not chunk:
                    raise AssertionError(f"{command} ended before it started its work")
                received += chunk
            line, _, child._unread = received.partition(b"\n")
            assert line.startswith(b"ready"), (command, line)
            child.detail = line.decode().partition(" ")[2]
        except BaseException:
            child.close()
            raise
        return child

    def random_delay(self, command: str) -> None:
        time.sleep(self.rng.uniform(0, self.estimate[command]))

    def kill_later(self, child: Child, estimate: str | None = None) -> None:
        """Kill ``child`` after a random delay; note whether it had finished its work."""
        key = estimate or child.name
        self.random_delay(key)
        if child.kill():
            self.kills += 1
        status = child.wait()
        done = [m for m in child.messages() if m.startswith("done")]
        if status == 0:
            self.estimate[key] = float(done[0].split()[1])  # aim at its real run time
        else:
            assert status == -signal.SIGKILL, f"{child.name} failed (status {status})"
            if not done:
                self.interrupted += 1
        child.close()

    def run(self, command: str, *args: object, **options: bool) -> None:
        """Start ``command`` and kill it after a random delay."""
        self.kill_later(self.start(command, *args, **options))


def make_source(root: Path, rng: random.Random, tag: int) -> Path:
    """~300 small files in a few folders and one 3 MiB file (streamed in chunks)."""
    for i in range(300):
        folder = root / f"d{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(rng.randbytes(rng.randint(1024, 8192)))
    (root / "large.bin").write_bytes(rng.randbytes(3 << 20) + b"%d" % tag)
    return root


def assert_sound(store: Store) -> None:
    """fsck finds no corrupt or partial object and no ref to an incomplete tree."""
    report = fsck(store)
    assert report.ok, [p.to_dict() for p in report.problems]
    assert not report.incomplete_refs


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
