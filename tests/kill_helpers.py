"""SIGKILL a casframe command in the middle of its work, for the crash tests.

A :class:`Killer` starts a command (import, transfer, prune, serve) in a child process and
waits until the child reports that it is about to work. Then it kills the child at one of two
kinds of moment:

- **At a step** (:meth:`Killer.kill_at_step`, or ``stop_at`` for a child killed by hand): the
  child counts the blobs it is about to commit (or, for prune, to delete) through a wrapper
  around its store's blob writes (:meth:`Stepper.count_writes`) or deletes
  (:meth:`Stepper.count_deletes`). At the step drawn for it, the child reports ``stopped N
  WHAT`` on its pipe and stops itself (SIGSTOP: every thread frozen wherever it is, the
  counted blob written but not committed, or not deleted); the parent reads the report and
  kills it. Such a kill lands in the middle of the work by construction, whatever the
  machine's speed or load; which step is drawn from the test's seeded generator.
- **After a random delay** (:meth:`Killer.kill_later`): anywhere in the work, or after it —
  an extra whose outcome the tests do not count, since where it lands depends on timing.

The child is forked (cheap) or, with ``spawn=True``, a fresh interpreter running this file (for
children that use grpc, which must not inherit a forked parent's threads). The outcome the
tests assert — fsck finds nothing wrong, and the command run again gives what an uninterrupted
run gives — must hold wherever the kill lands.

Run as a script, this file is the spawned child: ``python kill_helpers.py FD STEP COMMAND
ARGS...`` (``STEP`` a number, or ``-`` for none) reports on the pipe FD as a forked child does.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, NoReturn

from casframe import CasframeError, Digest, Store, open_store
from casframe.server import Server
from casframe.spi import BlobWriter

#: Seconds a child has to report that it started, or reached its step: a fresh interpreter on
#: a busy machine can take several (a hang guard, never the outcome).
REPORT_TIMEOUT = 120
#: Seconds a child whose peer was killed has to give up (a hang guard, never the outcome).
EXIT_TIMEOUT = 120
#: Set in a child's environment: behave as on a file system without ``O_TMPFILE``, where
#: uploads go through named temp files in ``tmp/`` that a kill leaves behind.
NO_TMPFILE_ENV = "CASFRAME_TEST_NO_TMPFILE"
#: Distinct blobs of a :func:`make_source` tree's files (300 small ones and a large one): a
#: command that stores, sends or deletes such a tree (its Directories too) counts more steps
#: than this, so a step drawn from ``1..SOURCE_BLOBS`` always comes before its end.
SOURCE_BLOBS = 301

Ready = Callable[..., None]


class Stepper:
    """Counts a child's steps (blobs committed or deleted) and stops the child at one.

    Reaching step ``stop_at``, it writes ``stopped N WHAT`` on the pipe and stops the whole
    process with SIGSTOP before the step is taken, for the parent to kill. Thread-safe: the
    store's workers count from several threads.
    """

    def __init__(self, write_end: int, stop_at: int | None) -> None:
        self.write_end = write_end
        self.stop_at = stop_at
        self.count = 0
        self._lock = threading.Lock()

    def steps(self, n: int) -> int | None:
        """Count ``n`` steps; the index among them of the one to stop at, if it is there."""
        with self._lock:
            first = self.count
            self.count += n
        if self.stop_at is not None and first < self.stop_at <= first + n:
            return self.stop_at - first - 1
        return None

    def step(self, what: str) -> None:
        if self.steps(1) is not None:
            self.halt(what)

    def halt(self, what: str) -> NoReturn:
        """Report the step and freeze; the step itself is never taken."""
        os.write(self.write_end, f"stopped {self.stop_at} {what}\n".encode())
        os.kill(os.getpid(), signal.SIGSTOP)
        while True:  # even if something continued the process: never take the step
            time.sleep(3600)

    def count_writes(self, store: Store) -> None:
        """Count each blob ``store``'s backend is about to commit, on every write path.

        A blob of ``write_blobs`` to stop at is written as that path would write it, through
        a writer of its own that is then never committed (a named temp file, on a local store
        without ``O_TMPFILE``), after the blobs before it in the call were stored.
        """
        blobs = store.blobs
        write_blobs, begin_write = blobs.write_blobs, blobs.begin_write
        begin_write_for, begin_write_copy = blobs.begin_write_for, blobs.begin_write_copy
        inside = threading.local()  # the default write_blobs calls begin_write: count once

        def counted_write_blobs(items: Iterable[tuple[Digest, bytes]]) -> None:
            items = list(items)
            stop = self.steps(len(items))
            inside.active = True
            try:
                write_blobs(items if stop is None else items[:stop])
                if stop is not None:
                    digest, data = items[stop]
                    begin_write(len(data)).write(data)
                    self.halt(f"{digest} written, not committed")
            finally:
                inside.active = False

        def counted(writer: BlobWriter) -> BlobWriter:
            return writer if getattr(inside, "active", False) else _CountedWriter(writer, self)

        def counted_begin_write(size_hint: int | None = None) -> BlobWriter:
            return counted(begin_write(size_hint))

        def counted_begin_write_for(digest: Digest) -> BlobWriter:
            return counted(begin_write_for(digest))

        def counted_begin_write_copy(fd: int) -> tuple[BlobWriter, BinaryIO]:
            writer, stored = begin_write_copy(fd)
            return counted(writer), stored

        blobs.write_blobs = counted_write_blobs  # type: ignore[method-assign]
        blobs.begin_write = counted_begin_write  # type: ignore[method-assign]
        blobs.begin_write_for = counted_begin_write_for  # type: ignore[method-assign]
        blobs.begin_write_copy = counted_begin_write_copy  # type: ignore[method-assign]

    def count_deletes(self, store: Store) -> None:
        """Count each blob ``store``'s backend is about to delete."""
        blobs = store.blobs
        delete_blobs = blobs.delete_blobs

        def counted_delete_blobs(
            digests: Iterable[Digest], *, older_than: float | None = None
        ) -> Collection[Digest] | None:
            digests = list(digests)
            stop = self.steps(len(digests))
            if stop is None:
                return delete_blobs(digests, older_than=older_than)
            delete_blobs(digests[:stop], older_than=older_than)
            self.halt(f"{digests[stop]} not deleted")

        blobs.delete_blobs = counted_delete_blobs  # type: ignore[method-assign]


class _CountedWriter(BlobWriter):
    """A backend's writer whose commit is a step."""

    def __init__(self, inner: BlobWriter, stepper: Stepper) -> None:
        self._inner = inner
        self._stepper = stepper

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def commit(self, digest: Digest) -> None:
        self._stepper.step(f"{digest} written, not committed")
        self._inner.commit(digest)

    def abort(self) -> None:
        self._inner.abort()


def _import(ready: Ready, stepper: Stepper, url: str, source: str, ref: str) -> None:
    store = open_store(url)
    stepper.count_writes(store)
    ready()
    store.set_ref(ref, store.import_directory(source))


def _transfer(ready: Ready, stepper: Stepper, source_url: str, dest_url: str, ref: str) -> None:
    source, dest = open_store(source_url), open_store(dest_url)
    stepper.count_writes(dest)
    ready()
    source.push(dest, ref)


def _prune(ready: Ready, stepper: Stepper, url: str) -> None:
    store = open_store(url)
    stepper.count_deletes(store)
    ready()
    store.prune(grace_period=0)


def _serve(ready: Ready, stepper: Stepper, url: str) -> None:
    """``casframe serve URL`` on a free loopback port, until killed; reports the port. Its
    steps are the blobs clients upload."""
    store = open_store(url)
    stepper.count_writes(store)
    server = Server(store, listen="127.0.0.1:0")
    ready(server.start())
    while True:
        time.sleep(3600)


COMMANDS: dict[str, Callable[..., None]] = {
    "import": _import,
    "transfer": _transfer,
    "prune": _prune,
    "serve": _serve,
}


def _child_main(write_end: int, stop_at: int | None, command: str, args: list[str]) -> int:
    """Run ``command`` in this (child) process, reporting ``ready [DETAIL]``, ``stopped N
    WHAT`` (see :class:`Stepper`) and ``done SECONDS`` on ``write_end``; the exit status: 0,
    1 after a casframe error, 2 after any other."""
    try:
        if os.environ.get(NO_TMPFILE_ENV) and hasattr(os, "O_TMPFILE"):
            del os.O_TMPFILE  # this process only: the local store probes for it
        started = [0.0]

        def ready(detail: object = "") -> None:
            started[0] = time.monotonic()
            os.write(write_end, f"ready {detail}".strip().encode() + b"\n")

        COMMANDS[command](ready, Stepper(write_end, stop_at), *args)
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
        self.lines: list[str] = []  # everything it reported, in order
        self._status: int | None = None  # as os.waitstatus_to_exitcode: -SIGNAL if killed
        self._partial = b""  # the start of a line not yet ended
        self._expected = 0  # lines before this one were looked at by expect()

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
        """SIGKILL it if it is still running (or stopped); whether it was."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, signal.SIGKILL)
        self.wait()
        return True

    def _read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the pipe, and read what it holds into ``lines``;
        whether it may still bring more (false once it is closed at the other end)."""
        if self.read_end < 0:
            return False
        if not select.select([self.read_end], [], [], timeout)[0]:
            return True
        chunk = os.read(self.read_end, 4096)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode() for line in complete]
        return bool(chunk)

    def messages(self) -> list[str]:
        """Everything it reported so far (after it ended: everything)."""
        while self.read_end >= 0 and select.select([self.read_end], [], [], 0)[0]:
            if not self._read(0):
                break
        return self.lines

    def expect(self, word: str, *, peers: Sequence[Child] = ()) -> str:
        """Wait for its next report starting with ``word`` and return it.

        Fails if it or one of ``peers`` ends first, or after :data:`REPORT_TIMEOUT` (a guard
        against a hang).
        """
        deadline = time.monotonic() + REPORT_TIMEOUT
        while True:
            for index in range(self._expected, len(self.lines)):
                if self.lines[index].split(" ", 1)[0] == word:
                    self._expected = index + 1
                    return self.lines[index]
            self._expected = len(self.lines)
            open_ = self._read(0.05)
            ended = [p for p in (self, *peers) if p.poll() is not None]
            if ended or not open_:
                self.messages()  # all it said before it ended
                if any(line.split(" ", 1)[0] == word for line in self.lines[self._expected :]):
                    continue
            if ended or not open_:
                who = ended[0] if ended else self
                raise AssertionError(
                    f"{who.name} ended (status {who.wait()}) before {self.name} reported "
                    f"{word!r}; {self.name} said {self.lines}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not report {word!r} in {REPORT_TIMEOUT} s")

    def close(self) -> None:
        """Kill it if it still runs, and close its pipe (twice is harmless)."""
        self.kill()
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1


class Killer:
    """Starts commands and kills them at a step or after a random delay; see the module
    docstring."""

    def __init__(self, rng: random.Random, first_estimate: dict[str, float]) -> None:
        self.rng = rng
        #: Per command, the delay up to which random kills are drawn: first a guess, then the
        #: run time of the last run that finished before its kill.
        self.estimate = dict(first_estimate)
        self.stopped = 0  # children killed at the step drawn for them
        self.kills = 0  # random kills that found the process still running ...
        self.interrupted = 0  # ... and its work unfinished

    def start(
        self,
        command: str,
        *args: object,
        spawn: bool = False,
        without_tmpfile: bool = False,
        stop_at: int | None = None,
    ) -> Child:
        """Start ``command`` and wait until it reports ready (its ``detail`` set); with
        ``stop_at``, it stops itself at that step (see :class:`Stepper`)."""
        read_end, write_end = os.pipe()
        argv = [str(a) for a in args]
        process = None
        if spawn:
            env = dict(os.environ)
            env.pop(NO_TMPFILE_ENV, None)
            if without_tmpfile:
                env[NO_TMPFILE_ENV] = "1"
            step = "-" if stop_at is None else str(stop_at)
            process = subprocess.Popen(
                [sys.executable, __file__, str(write_end), step, command, *argv],
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
                    status = _child_main(write_end, stop_at, command, argv)
                finally:
                    os._exit(status)
        os.close(write_end)
        child = Child(command, read_end, pid, process)
        try:
            child.detail = child.expect("ready").partition(" ")[2]
        except BaseException:
            child.close()
            raise
        return child

    def stop_and_kill(self, child: Child, *, peers: Sequence[Child] = ()) -> str:
        """Wait until ``child`` stops at its step, kill it, and return what it stopped at."""
        report = child.expect("stopped", peers=peers)
        print(f"{child.name} {report}")  # shown with a failure: where the kills landed
        assert child.kill(), f"{child.name} ended by itself after {report!r}"
        assert child.wait() == -signal.SIGKILL
        assert not [m for m in child.messages() if m.startswith("done")]
        self.stopped += 1
        return report

    def kill_at_step(self, command: str, *args: object, **options: bool) -> str:
        """Start ``command``, kill it at a step drawn from ``1..SOURCE_BLOBS``, return what it
        stopped at."""
        child = self.start(command, *args, stop_at=self.rng.randint(1, SOURCE_BLOBS), **options)
        try:
            return self.stop_and_kill(child)
        finally:
            child.close()

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

    def kill_at_random(
        self, command: str, *args: object, estimate: str | None = None, **options: bool
    ) -> None:
        """Start ``command`` and kill it after a random delay (the ``estimate`` of its key,
        by default the command)."""
        self.kill_later(self.start(command, *args, **options), estimate)


def make_source(root: Path, rng: random.Random, tag: int) -> Path:
    """~300 small files in a few folders and one 3 MiB file (streamed in chunks); the files'
    contents are distinct (:data:`SOURCE_BLOBS`) and new at every call."""
    for i in range(300):
        folder = root / f"d{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(rng.randbytes(rng.randint(1024, 8192)))
    (root / "large.bin").write_bytes(rng.randbytes(3 << 20) + b"%d" % tag)
    return root


def assert_sound(store: Store) -> None:
    """fsck finds no corrupt or partial object and no ref to an incomplete tree."""
    report = store.fsck()
    assert report.ok, [p.to_dict() for p in report.problems]
    assert not report.incomplete_refs


if __name__ == "__main__":
    step = None if sys.argv[2] == "-" else int(sys.argv[2])
    sys.exit(_child_main(int(sys.argv[1]), step, sys.argv[3], sys.argv[4:]))
