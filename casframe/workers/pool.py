"""Where batches of local work run: on threads of this process, or in helper processes.

Import and checkout cut their work into batches (a few hundred files each) and hand them to a
*runner*: ``runner.submit(task, payload)`` returns a future of ``task(store, payload)``.

- :class:`ThreadRunner` runs the task on a thread pool of this process: small trees, stores
  that cannot be opened by another process, ``jobs=1``.
- :class:`CheckoutThreads` does the same for checkout's copies, without
  :mod:`concurrent.futures`.
- :class:`WorkerPool` runs it in helper processes, the way git's parallel checkout feeds its
  ``checkout--worker`` helpers: each is casframe's own small program
  (``python -m casframe.workers.worker``), started by the running interpreter, which opens
  the same store and answers batch after batch over its pipes (:mod:`.protocol`). One thread
  of this process feeds each helper. A Python thread doing per-file system calls hands the
  interpreter lock over at every call, so threads cannot use a second core for small files;
  processes can.

What this module must never do: fork the calling process (it may run threads, such as a gRPC
server's), depend on :mod:`multiprocessing` (whose start methods import the caller's main
module again), or leave a helper running after the runner is shut down or its parent died.
A helper notices its parent's death by its closed pipe, and on Linux also by the
``PR_SET_PDEATHSIG`` signal it asks for; it ignores SIGINT, so Ctrl-C reaches the parent alone,
which then stops every helper.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from casframe.errors import WorkerError
from casframe.lazy import lazy_module
from casframe.workers.settings import CHECKOUT_THRESHOLD_FILES, IMPORT_THRESHOLD_FILES

# What only helper processes need is imported when the first pool starts: a checkout or import
# that stays in the process (most of them, and every whole `casframe checkout` of a tree under
# the threshold) does not pay for subprocess, signal, pickle and the import machinery. Thread
# pools (concurrent.futures, which brings logging and traceback, and queue) are imported by the
# first runner that uses them: a checkout on one thread runs its batches in the caller's.
if TYPE_CHECKING:
    import _queue
    import concurrent.futures as futures
    import importlib.util as importlib_util
    import queue
    import select
    import signal
    import subprocess
    from concurrent.futures import Future

    from casframe.blobs import VerifiedBlobs
    from casframe.workers import protocol
else:
    futures = lazy_module("concurrent.futures")
    importlib_util = lazy_module("importlib.util")
    queue = lazy_module("queue")
    _queue = lazy_module("_queue")  # SimpleQueue alone: compiled, without queue.py's imports
    select = lazy_module("select")
    signal = lazy_module("signal")
    subprocess = lazy_module("subprocess")
    protocol = lazy_module("casframe.workers.protocol")

__all__ = [
    "CHECKOUT_THRESHOLD_FILES",
    "IMPORT_THRESHOLD_FILES",
    "CheckoutThreads",
    "InlineRunner",
    "Outcome",
    "Pending",
    "Runner",
    "ThreadRunner",
    "WorkerPool",
    "open_checkout_runner",
    "open_runner",
]

_P = TypeVar("_P")
_R = TypeVar("_R")


_R_co = TypeVar("_R_co", covariant=True)


class Pending(Protocol[_R_co]):
    """What :meth:`Runner.submit` returns: the task's result (or error) when it is done."""

    def result(self) -> _R_co: ...


class Runner(Protocol):
    def submit(self, task: Callable[[VerifiedBlobs, _P], _R], payload: _P) -> Future[_R]: ...

    def shutdown(self, *, cancel: bool) -> None: ...


class Outcome(Generic[_R]):
    """A task run to its end: its result, or the error it raised (raised by :meth:`result`)."""

    __slots__ = ("_error", "_value")

    def __init__(self, value: _R | None, error: Exception | None) -> None:
        self._value = value
        self._error = error

    def result(self) -> _R:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set whenever there is no error

    def done(self) -> bool:
        """Always: as a future's ``done()``."""
        return True

    def cancel(self) -> bool:
        """Never: it has run (as a future's ``cancel()`` once started)."""
        return False


class InlineRunner:
    """Runs each task in the caller's thread, when it is submitted: one job, no pool.

    A checkout with one job does all its writing in a task anyway, and a thread would only
    hand it back and forth; an error surfaces from :meth:`Outcome.result`, as a future's does.
    Interrupts (``BaseException`` that is not an ``Exception``) propagate from ``submit``.
    """

    def __init__(self, store: VerifiedBlobs) -> None:
        self._store = store

    def submit(self, task: Callable[[VerifiedBlobs, _P], _R], payload: _P) -> Outcome[_R]:
        try:
            return Outcome(task(self._store, payload), None)
        except Exception as exc:  # noqa: BLE001 - raised again by result(), as a future would
            return Outcome(None, exc)

    def shutdown(self, *, cancel: bool) -> None:
        """Nothing runs after ``submit`` returns: nothing to stop."""


class _Done(Generic[_R]):
    """The result of a task handed to :class:`CheckoutThreads`, once a thread has run it."""

    __slots__ = ("_error", "_finished", "_value")

    def __init__(self) -> None:
        self._finished = threading.Lock()
        self._finished.acquire()  # released by the thread that runs the task
        self._value: _R | None = None
        self._error: BaseException | None = None

    def _set(self, value: _R | None, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._finished.release()

    def result(self) -> _R:
        """Wait for the task (Ctrl-C interrupts the wait); its result, or raise its error."""
        with self._finished:
            pass
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set whenever there is no error


class _Cancelled(WorkerError):
    """What a task left unrun by a cancelled :class:`CheckoutThreads` gives (nobody waits for
    it: the caller cancels because it stopped waiting)."""


class CheckoutThreads:
    """Runs tasks on ``threads`` threads of this process, in the order submitted.

    For checkout's copies: its tasks need nothing but their result, so this runner does
    without :mod:`concurrent.futures` (which brings :mod:`logging`, :mod:`traceback` and
    more, ~21 M instructions of a whole command's start-up).
    """

    def __init__(self, store: VerifiedBlobs, threads: int) -> None:
        self._store = store
        self._queue: _queue.SimpleQueue[tuple[Callable[[VerifiedBlobs, Any], Any], Any, _Done[Any]]
                                 | None] = _queue.SimpleQueue()
        self._cancelled = False
        self._threads = [
            threading.Thread(target=self._work, name="casframe-checkout", daemon=True)
            for _ in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, task: Callable[[VerifiedBlobs, _P], _R], payload: _P) -> _Done[_R]:
        done: _Done[_R] = _Done()
        self._queue.put((task, payload, done))
        return done

    def _work(self) -> None:
        store = self._store
        while (item := self._queue.get()) is not None:
            task, payload, done = item
            if self._cancelled:
                done._set(None, _Cancelled("checkout cancelled"))
                continue
            try:
                value = task(store, payload)
            except BaseException as exc:  # noqa: BLE001 - raised again by result()
                done._set(None, exc)
            else:
                done._set(value, None)

    def cancel(self) -> None:
        """Run none of the tasks still queued: each gives an error instead."""
        self._cancelled = True

    def shutdown(self, *, cancel: bool) -> None:
        """Wait for the threads to end: after the queued tasks, or (``cancel``) after the
        ones already running. No task runs once this returns."""
        if cancel:
            self.cancel()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


class ThreadRunner:
    """Runs tasks on ``threads`` threads of this process, over this process's ``store``."""

    def __init__(self, store: VerifiedBlobs, threads: int) -> None:
        self._store = store
        self._pool = futures.ThreadPoolExecutor(max_workers=max(1, threads))

    def submit(self, task: Callable[[VerifiedBlobs, _P], _R], payload: _P) -> Future[_R]:
        return self._pool.submit(task, self._store, payload)

    def shutdown(self, *, cancel: bool) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start one helper (a separate function, so tests can watch helpers being started).

    In a process group of its own: Ctrl-C in a terminal signals the foreground group, and
    only the parent must get it (it then stops its helpers), even while a helper is still
    starting and has not yet set SIGINT aside.
    """
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        process_group=0,
    )


def _import_roots(*modules: str) -> list[str]:
    """The sys.path folders the given modules were found in, so a helper finds them too."""
    roots: list[str] = []
    for module in modules:
        spec = importlib_util.find_spec(module.split(".")[0])
        if spec is None or spec.origin is None:
            continue
        origin = spec.origin
        package_dir = os.path.dirname(origin)
        root = os.path.dirname(package_dir) if origin.endswith("__init__.py") else package_dir
        if root not in roots:
            roots.append(root)
    return roots


# Seconds to wait for a helper to exit after its pipe is closed, before it is killed.
_EXIT_GRACE_S = 5.0

if TYPE_CHECKING:
    _Item = tuple[str, Any, Future[Any]]


class _Helper:
    """One helper process and the thread of this process that feeds it, one batch at a time."""

    def __init__(self, pool: WorkerPool, argv: list[str], env: dict[str, str]) -> None:
        self.pool = pool
        self.process = _spawn(argv, env)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests: IO[bytes] = self.process.stdin
        self.replies: IO[bytes] = self.process.stdout
        self.greeted = False
        self.thread = threading.Thread(
            target=self.feed, name=f"casframe-helper-{self.process.pid}", daemon=True
        )
        self.thread.start()

    def feed(self) -> None:
        dead: BaseException | None = None
        try:
            # The helper's greeting (its store opened, or why not), before any batch is
            # taken: until then batches stay queued, where the caller may take them back.
            self.answer()
            self.greeted = True
        except BaseException as exc:  # noqa: BLE001 - handed to the next batch's owner
            dead = exc
        while True:
            item = self.pool.queue.get()
            if item is None:
                return
            name, payload, future = item
            if not future.set_running_or_notify_cancel():
                continue
            if dead is not None:
                # Fail the batches this thread takes from now on, so that no caller waits
                # for work nobody does; the caller stops the others.
                future.set_exception(dead)
                continue
            try:
                self.ask(name, payload)
                result = self.answer()
            except BaseException as exc:  # noqa: BLE001 - handed to the future's owner
                if isinstance(exc, WorkerError):
                    dead = exc
                future.set_exception(exc)
            else:
                future.set_result(result)

    def ask(self, name: str, payload: Any) -> None:
        try:
            protocol.write_message(self.requests, (name, payload))
        except (OSError, ValueError):  # a broken pipe, or closed by shutdown: the helper is gone
            raise self.death() from None

    def answer(self) -> Any:
        try:
            ok, value = protocol.read_message(self.replies)
        except (EOFError, OSError):
            raise self.death() from None
        if not ok:
            raise protocol.rebuild_error(value)
        return value

    def death(self) -> WorkerError:
        try:
            code = self.process.wait(timeout=_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            code = None
        how = (
            "stopped answering" if code is None
            else f"was killed by signal {-code}" if code < 0
            else f"exited with status {code}"
        )
        return WorkerError(f"helper process {self.process.pid} {how} in the middle of its work")

    def stop(self, *, kill: bool) -> None:
        if kill:
            # Before closing the pipe: the feeder may be blocked writing a batch to a helper
            # that reads no more (hung, or stopped), and closing waits for that write to end.
            with contextlib.suppress(OSError):
                self.process.kill()
        with contextlib.suppress(OSError):
            self.requests.close()  # end of work: the helper exits when it reads this
        try:
            _wait_exit(self.process, _EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.replies.close()


def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``process`` to exit, at most ``timeout`` seconds (then TimeoutExpired).

    ``Popen.wait(timeout)`` polls, sleeping up to 50 ms between looks: a helper that exits
    a moment after a look costs its parent that long (a whole ``casframe checkout`` lost
    0.1-0.2 s so). A pidfd (Linux 5.3+) becomes readable the moment the process exits.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(process.pid)
        except OSError:  # exited and reaped already, or pidfds not allowed here
            pass
        else:
            try:
                select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
            timeout = 0  # exited (reaped at once), or the grace is spent
    process.wait(timeout=timeout)


def _block_sigint() -> set[int | signal.Signals] | None:
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _restore_signals(masked: set[int | signal.Signals] | None) -> None:
    if masked is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)


class WorkerPool:
    """``jobs`` helper processes, each with the store ``factory(url)`` opens (see
    :meth:`casframe.spi.BlobStore.worker_spec`).

    The helpers start at the first :meth:`submit`, not when the pool is made: by then the
    caller holds the pool, so that whatever interrupts it from then on (Ctrl-C included) finds
    a pool to shut down.
    """

    def __init__(self, factory: str, url: str, jobs: int) -> None:
        self.queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.jobs = jobs
        self.argv = [
            sys.executable, "-P", "-m", "casframe.workers.worker", factory, url, str(os.getpid())
        ]
        self.env = dict(os.environ)
        roots = _import_roots("casframe", factory.partition(":")[0])
        self.env["PYTHONPATH"] = os.pathsep.join(
            [*roots, *filter(None, [self.env.get("PYTHONPATH")])]
        )
        self.helpers: list[_Helper] = []
        self.started = False

    def start(self) -> None:
        """Start the helpers now, before the first :meth:`submit` (which would start them):
        they get ready while the caller prepares the work."""
        if not self.started:
            self._start()

    def _start(self) -> None:
        self.started = True
        # SIGINT (Ctrl-C) waits until every helper started is listed here: a KeyboardInterrupt
        # between a helper's start and its listing would leave it unknown to shutdown().
        # Threads started meanwhile (the feeders) keep it blocked, so it reaches this one, as
        # soon as the mask is lifted: the helpers are then listed, and the caller that gets
        # the KeyboardInterrupt from submit() shuts them down.
        masked = _block_sigint()
        try:
            for _ in range(self.jobs):
                self.helpers.append(_Helper(self, self.argv, self.env))
        finally:
            _restore_signals(masked)

    @property
    def pids(self) -> list[int]:
        return [helper.process.pid for helper in self.helpers]

    def submit(self, task: Callable[[VerifiedBlobs, _P], _R], payload: _P) -> Future[_R]:
        future: Future[_R] = futures.Future()
        self.queue.put((f"{task.__module__}:{task.__qualname__}", payload, future))
        if not self.started:  # the first call: from the caller's thread, before any feeder
            self._start()
        return future

    def shutdown(self, *, cancel: bool) -> None:
        """Stop every helper: after the queued work (``cancel=False``) or at once.

        Killing a helper in the middle of a write leaves nothing visible: a store object is
        published only once complete (``file://`` writes to an unnamed temp file and links it
        into place).
        """
        if cancel:
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[2].cancel()
        for _ in self.helpers:
            self.queue.put(None)
        for helper in self.helpers:
            if not cancel:
                helper.thread.join()
            helper.stop(kill=cancel)
        for helper in self.helpers:
            helper.thread.join()


def open_runner(store: VerifiedBlobs, jobs: int, files: int, threshold: int) -> Runner:
    """Helper processes for ``files`` files of work when they pay and the store can be opened
    by them; threads of this process otherwise."""
    pool = _helpers(store, jobs, files, threshold) if jobs > 1 else None
    return pool or ThreadRunner(store, _threads(store, jobs))


def _helpers(
    store: VerifiedBlobs, helpers: int, files: int, threshold: int
) -> WorkerPool | None:
    """``helpers`` helper processes for ``files`` files of work, when that is at least
    ``threshold`` and the store can be opened by them."""
    # The store's URL for helpers is asked for only when they may start (quoting a path
    # loads urllib.parse).
    spec = store.backend.worker_spec() if helpers > 0 and files >= threshold else None
    return None if spec is None else WorkerPool(*spec, jobs=helpers)


def open_checkout_runner(
    store: VerifiedBlobs, jobs: int, files: int, threshold: int, *, links: bool = False
) -> Runner | CheckoutThreads | InlineRunner:
    """Where a checkout of ``files`` files runs its batches.

    From ``threshold`` files on, in helper processes when the store can be opened by them:
    ``jobs`` of them for copies (none for one job); ``jobs - 1`` for hardlinks (``links``),
    whose caller links beside them. Hardlinks never run on threads: a link and the stat
    before it are system calls, and two threads hand the interpreter lock to each other
    around every one of them (measured: more CPU and a slower checkout than one thread).
    Copies below the threshold run on threads; one job, or links below it, in the caller's
    thread (:class:`InlineRunner`).
    """
    pool = _helpers(store, jobs - 1 if links or jobs == 1 else jobs, files, threshold)
    if pool is not None:
        return pool
    threads = 1 if links else _threads(store, jobs)
    return CheckoutThreads(store, threads) if threads > 1 else InlineRunner(store)


def _threads(store: VerifiedBlobs, jobs: int) -> int:
    return min(jobs, max(1, store.backend.limits.max_concurrency))
