"""Several remotes at once: pull from the first that has a tree, push to every push remote.

A :class:`Remotes` is an ordered list of remotes (:class:`~casframe.config.RemoteEntry`, from
the configuration files or made by hand). Each operation runs in two phases:

1. **check**, concurrently: every remote is opened and asked what the operation needs (pull:
   where does its ref point, or does it hold the tree; push: does it accept writes, and where
   does its ref point already) on a thread of its own, within the remote's ``timeout``. Ten
   dead remotes therefore cost one time-out, not ten. A remote that has not answered in time
   is reported unreachable; its thread is a daemon left to end on its own (it closes what it
   opened), so it never holds up the caller or the process's exit.
2. **transfer**, one remote at a time in configuration order, through :meth:`Store.pull` and
   :meth:`Store.push`: only missing blobs travel, and the ref is set last.

Every remote ends with exactly one :class:`RemoteOutcome`. One remote's failure is recorded in
its outcome and never stops the others; whether the operation as a whole succeeded is
:attr:`RemotesReport.ok` (see :meth:`Remotes.pull` and :meth:`Remotes.push` for the rule).
This module moves nothing itself and knows no backend: checks go through the Store API
(``get_ref``, ``contains``, ``check_writable``), transfers through :mod:`casframe.transfer`.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from casframe.config import RemoteEntry, configured_remotes, find_project_file, load_config
from casframe.digest import Digest, looks_like_digest
from casframe.errors import (
    BackendUnavailableError,
    BlobNotFoundError,
    CasframeError,
    ConfigError,
    PermissionDeniedError,
    RefNotFoundError,
    UnsupportedOperationError,
)
from casframe.names import validate_ref_name
from casframe.plugins import open_store
from casframe.progress import NO_PROGRESS, Progress
from casframe.refkinds import writable_ref_name
from casframe.registry import DIGEST_FUNCTION_OPTION
from casframe.values import replace

if TYPE_CHECKING:
    from casframe.config import Config
    from casframe.store import Store
    from casframe.transfer import TransferResult

__all__ = ["RemoteOutcome", "RemoteStatus", "Remotes", "RemotesError", "RemotesReport"]

T = TypeVar("T")


class RemoteStatus(enum.StrEnum):
    """How one remote ended in a pull or a push."""

    #: pull: the tree was copied from this remote (or this store already had all of it).
    PULLED = "pulled"
    #: pull: the remote does not have the ref (or the tree); the next one was tried.
    MISSING = "missing"
    #: push: blobs were sent or the ref was set.
    PUSHED = "pushed"
    #: push: the remote already had every blob and the ref; nothing was sent.
    UP_TO_DATE = "up-to-date"
    #: push: the remote refuses writes; nothing was attempted there.
    READ_ONLY = "read-only"
    #: the remote could not be reached, or did not answer within its time-out.
    UNREACHABLE = "unreachable"
    #: any other error (an incomplete tree on the remote, a corrupt blob, a bad option...).
    FAILED = "failed"


_SUCCESS = frozenset({RemoteStatus.PULLED, RemoteStatus.PUSHED, RemoteStatus.UP_TO_DATE})


@dataclass(frozen=True)
class RemoteOutcome:
    """What happened at one remote.

    ``message`` explains a status other than success (the reason a remote was unreachable,
    read-only or failed; what it lacks); ``error`` is then the machine-readable reason
    (:attr:`CasframeError.reason`, e.g. ``unavailable``). ``transfer`` holds the counts when
    blobs were compared; ``ref`` is the ref on the receiving side (``None`` for a digest), and
    ``ref_set`` whether it was (re)pointed there rather than found pointing at the tree.
    """

    name: str
    url: str
    status: RemoteStatus
    message: str = ""
    error: str | None = None
    transfer: TransferResult | None = None
    ref: str | None = None
    ref_set: bool = False

    @property
    def ok(self) -> bool:
        return self.status in _SUCCESS

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record (what ``--json`` prints for each remote)."""
        result = self.transfer
        return {
            "name": self.name,
            "url": self.url,
            "status": str(self.status),
            "message": self.message or None,
            "error": self.error,
            "blobs_total": result.blobs_total if result else None,
            "blobs_sent": result.blobs_sent if result else None,
            "bytes_sent": result.bytes_sent if result else None,
            "ref": self.ref,
            "ref_set": self.ref_set,
        }


@dataclass(frozen=True)
class RemotesReport:
    """The outcome of a pull or push over several remotes, one entry per remote reported.

    ``root`` is the tree's digest when it became known (always for a push); ``ref`` is the
    ref set on the receiving side, if any.
    """

    operation: str
    tree: str
    root: Digest | None
    ref: str | None
    outcomes: tuple[RemoteOutcome, ...]

    @property
    def ok(self) -> bool:
        """pull: one remote delivered the tree; push: every push remote got it or had it."""
        if self.operation == "pull":
            return any(o.status is RemoteStatus.PULLED for o in self.outcomes)
        return bool(self.outcomes) and all(o.ok for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "tree": self.tree,
            "root": str(self.root) if self.root is not None else None,
            "ref": self.ref,
            "ok": self.ok,
            "remotes": [o.as_dict() for o in self.outcomes],
        }

    def raise_for_failure(self) -> None:
        """Raise :class:`RemotesError` unless :attr:`ok`."""
        if not self.ok:
            raise RemotesError(self)


class RemotesError(CasframeError):
    """A pull found the tree nowhere, or a push did not reach every push remote.

    ``report`` holds every remote's outcome.
    """

    reason = "remotes"

    def __init__(self, report: RemotesReport) -> None:
        self.report = report
        failed = [o for o in report.outcomes if not o.ok]
        causes = "; ".join(f"{o.name} {o.status}" for o in failed) or "no remote answered"
        if report.operation == "pull":
            text = f"could not pull {report.tree} from any remote ({causes})"
        else:
            reached = len(report.outcomes) - len(failed)
            text = (
                f"pushed {report.tree} to {reached} of {len(report.outcomes)} push remotes "
                f"({causes})"
            )
        super().__init__(text)
        self.temporary = all(o.status is RemoteStatus.UNREACHABLE for o in failed) and bool(
            failed
        )


class _ReadOnly(Exception):
    """A push remote's check found it refusing writes (wraps the backend's error)."""

    def __init__(self, cause: PermissionDeniedError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Check(Generic[T]):
    """One remote opened and asked a question on a daemon thread, awaited with a deadline.

    Whoever waits owns the opened store afterwards and must :meth:`release` the check; a check
    given up on (past its deadline, or not needed) closes its store itself when it ends.
    """

    def __init__(self, entry: RemoteEntry, ask: Callable[[Store], T]) -> None:
        self.entry = entry
        self.deadline = time.monotonic() + entry.timeout
        self.store: Store | None = None
        self.answer: T | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._released = False
        threading.Thread(
            target=self._run, args=(ask,), name=f"casframe-remote-{entry.name}", daemon=True
        ).start()

    def _run(self, ask: Callable[[Store], T]) -> None:
        store: Store | None = None
        answer: T | None = None
        error: Exception | None = None
        try:
            store = open_store(self.entry.url, self.entry.options)
            answer = ask(store)
        except Exception as exc:  # noqa: BLE001 - becomes this remote's outcome
            error = exc
        with self._lock:
            keep = not self._released and error is None
            if keep:
                self.store, self.answer = store, answer
            self.error = error
            self._done.set()
        if not keep and store is not None:
            store.close()

    def wait(self) -> bool:
        """Wait for the answer until the deadline; False when it did not come in time."""
        return self._done.wait(max(0.0, self.deadline - time.monotonic()))

    def result(self) -> tuple[Store, T]:
        """The opened store and the answer, once :meth:`wait` said the check ended well."""
        assert self.store is not None and self.error is None
        return self.store, cast(T, self.answer)

    def release(self) -> None:
        """Close the store now, or (still running) as soon as the check ends."""
        with self._lock:
            self._released = True
            store, self.store = self.store, None
        if store is not None:
            store.close()


class _Labelled(Progress):
    """Progress that names the remote in every phase it reports."""

    def __init__(self, inner: Progress, label: str) -> None:
        self._inner = inner
        self._label = label

    def start(self, task: str, total: int | None = None, unit: str = "files") -> None:
        self._inner.start(f"{self._label}: {task}", total, unit)

    def advance(self, amount: int = 1) -> None:
        self._inner.advance(amount)

    def finish(self) -> None:
        self._inner.finish()


def _failure(entry: RemoteEntry, exc: Exception) -> RemoteOutcome:
    """The outcome of a remote whose check or transfer raised ``exc``."""
    if isinstance(exc, _ReadOnly):
        status, message, error = RemoteStatus.READ_ONLY, str(exc), exc.cause.reason
    elif isinstance(exc, BackendUnavailableError | ConnectionError | TimeoutError):
        status, message = RemoteStatus.UNREACHABLE, _one_line(exc)
        error = exc.reason if isinstance(exc, CasframeError) else "unavailable"
    else:
        status, message = RemoteStatus.FAILED, _one_line(exc)
        error = exc.reason if isinstance(exc, CasframeError) else type(exc).__name__
    return RemoteOutcome(entry.name, entry.url, status, message, error)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    elif isinstance(exc, CasframeError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _as_digest(tree: Digest | str) -> Digest | None:
    """``tree`` as a digest, or ``None`` when it names a ref."""
    if isinstance(tree, Digest):
        return tree
    return Digest.parse(tree) if looks_like_digest(tree) else None


def _timed_out(check: _Check[Any]) -> RemoteOutcome:
    entry = check.entry
    return RemoteOutcome(
        entry.name,
        entry.url,
        RemoteStatus.UNREACHABLE,
        f"no answer within {entry.timeout:g} s",
        BackendUnavailableError.reason,
    )


class Remotes:
    """An ordered list of remotes to pull from and push to.

    ``Remotes.from_config()`` reads the user's configuration and the project file;
    ``Remotes([RemoteEntry(...), ...])`` takes any list. Names must be unique.
    """

    def __init__(self, entries: Iterable[RemoteEntry], *, where: str = "") -> None:
        self._entries = tuple(entries)
        #: Where these remotes were configured (for messages).
        self.where = where or "the list given"
        # Chosen by name: a remote that cannot serve the operation is then an error, not
        # silently left out.
        self._chosen = False
        names = [entry.name for entry in self._entries]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"remote {duplicates[0]!r} is defined twice in {self.where}")

    @classmethod
    def from_config(
        cls,
        config: Config | None = None,
        *,
        project_dir: str | os.PathLike[str] | None = None,
    ) -> Remotes:
        """The configured remotes: the user's file, then the project file found from
        ``project_dir`` (default: the working directory) upwards."""
        config = config or load_config()
        places = [config.path if config.exists else f"{config.path} (no such file)"]
        project_file = find_project_file(project_dir)
        places.append(project_file or "no project file (casframe.toml)")
        return cls(
            configured_remotes(config, project_dir=project_dir), where=" and ".join(places)
        )

    def __iter__(self) -> Iterator[RemoteEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Remotes {', '.join(e.name for e in self._entries) or '(none)'}>"

    def with_digest_function(self, name: str) -> Remotes:
        """These remotes, each opened with the digest function ``name``."""
        entries = [
            replace(e, options={**e.options, DIGEST_FUNCTION_OPTION: name}) for e in self._entries
        ]
        return Remotes(entries, where=self.where)

    def select(self, names: Sequence[str]) -> Remotes:
        """Only the named remotes, in the order given."""
        by_name = {entry.name: entry for entry in self._entries}
        chosen = []
        for name in names:
            if name not in by_name:
                known = ", ".join(by_name) or "none"
                raise ConfigError(
                    f"unknown remote {name!r}: not defined in {self.where} (defined: {known})"
                )
            chosen.append(by_name[name])
        selected = Remotes(chosen, where=self.where)
        selected._chosen = True
        return selected

    def _usable(self, operation: str, timeout: float | None) -> list[RemoteEntry]:
        """The remotes that serve ``operation`` (``pull`` or ``push``), ``timeout`` applied."""
        pulling = operation == "pull"
        serving = [e for e in self._entries if (e.pull if pulling else e.push)]
        if self._chosen and len(serving) < len(self._entries):
            entry = next(e for e in self._entries if e not in serving)
            setting = "pull = false" if pulling else "push = true is not set"
            raise ConfigError(
                f"remote {entry.name!r} is not a {operation} remote "
                f"({setting} in {entry.source or self.where})"
            )
        if not serving:
            setting = "pull = true (the default)" if pulling else "push = true"
            raise ConfigError(
                f"no remote to {operation} {'from' if pulling else 'to'}: none with {setting} "
                f"in {self.where}"
            )
        if timeout is None:
            return serving
        if not 0 < timeout < float("inf"):
            raise ConfigError(f"remote time-out must be a positive number, not {timeout}")
        return [replace(e, timeout=timeout) for e in serving]

    # -- pull -------------------------------------------------------------------------------

    def pull(
        self,
        store: Store,
        tree: Digest | str,
        *,
        ref: str | None = None,
        timeout: float | None = None,
        progress: Progress | None = None,
        on_outcome: Callable[[RemoteOutcome], None] | None = None,
        check: bool = True,
    ) -> RemotesReport:
        """Copy ``tree`` into ``store`` from the first remote (in order) that has it.

        ``tree`` is a ref name of the remotes (also the ref set in ``store``, unless ``ref``
        names another) or a digest. Remotes with ``pull = false`` are left out. Every remote is
        checked at once; they are then tried in order: one without the ref is reported
        ``missing``, one out of reach ``unreachable``, and a transfer that fails moves on to
        the next remote that has it. Remotes after the one pulled from are not reported.
        ``timeout`` overrides every remote's own; ``on_outcome`` is called with each outcome
        as soon as it is known. The pull succeeds when one remote delivered the tree; with
        ``check`` (the default) a failure raises :class:`RemotesError`.
        """
        entries = self._usable("pull", timeout)
        wanted = _as_digest(tree)
        name = None if wanted is not None else str(tree)
        if name is not None:
            validate_ref_name(name)
        local_ref = ref if ref is not None else name
        if local_ref is not None:
            writable_ref_name(local_ref)  # a tree: never in the server's own namespaces
        progress = progress or NO_PROGRESS

        def locate(remote: Store) -> Digest | None:
            if name is not None:
                try:
                    return remote.get_ref(name, touch=False)
                except RefNotFoundError:
                    return None
            assert wanted is not None
            return wanted if remote.contains(wanted) else None

        def fetch(entry: RemoteEntry, remote: Store, found: Digest | None) -> RemoteOutcome:
            if found is None:
                if name is not None:
                    what, error = f"the ref {name}", RefNotFoundError.reason
                else:
                    what, error = "the tree", BlobNotFoundError.reason
                return RemoteOutcome(
                    entry.name, entry.url, RemoteStatus.MISSING, f"does not have {what}", error
                )
            if name is not None:
                found = remote.get_ref(name)  # the use counts for the remote's LRU order
            result = store.pull(
                remote, found, ref=local_ref, progress=_Labelled(progress, entry.name)
            )
            return RemoteOutcome(
                entry.name, entry.url, RemoteStatus.PULLED, transfer=result, ref=local_ref,
                ref_set=local_ref is not None,
            )

        outcomes = _each(entries, locate, fetch, progress, on_outcome, until_success=True)
        pulled = [o.transfer.root for o in outcomes if o.ok and o.transfer is not None]
        root = pulled[0] if pulled else None
        result = RemotesReport(
            "pull", str(tree), root, local_ref if root is not None else None, tuple(outcomes)
        )
        if check:
            result.raise_for_failure()
        return result

    # -- push -------------------------------------------------------------------------------

    def push(
        self,
        store: Store,
        tree: Digest | str,
        *,
        ref: str | None = None,
        timeout: float | None = None,
        progress: Progress | None = None,
        on_outcome: Callable[[RemoteOutcome], None] | None = None,
        check: bool = True,
    ) -> RemotesReport:
        """Copy ``tree`` from ``store`` to every remote with ``push = true``.

        ``tree`` is a digest or a ref of ``store`` (then also the ref set on the remotes,
        unless ``ref`` names another). Every push remote is checked at once: one that refuses
        writes is reported ``read-only`` and one out of reach ``unreachable``, and neither is
        written to. The others receive only the blobs they lack, then the ref (left alone
        where it already points at the tree); one that had everything is ``up-to-date``. The
        push succeeds when every push remote is ``pushed`` or ``up-to-date``; with ``check``
        (the default) a failure raises :class:`RemotesError`. ``timeout``, ``progress`` and
        ``on_outcome`` as for :meth:`pull`.
        """
        entries = self._usable("push", timeout)
        root = store.resolve(tree)  # a missing local ref fails here, before any remote
        name = ref if ref is not None else (None if _as_digest(tree) else str(tree))
        if name is not None:
            writable_ref_name(name)  # a tree: never in the server's own namespaces
        progress = progress or NO_PROGRESS

        def prepare(remote: Store) -> Digest | None:
            try:
                remote.check_writable()
            except PermissionDeniedError as exc:
                raise _ReadOnly(exc) from exc
            if name is None:
                return None
            try:
                return remote.get_ref(name, touch=False)
            except (RefNotFoundError, UnsupportedOperationError):
                return None  # absent, or a remote that cannot read refs back

        def send(entry: RemoteEntry, remote: Store, existing: Digest | None) -> RemoteOutcome:
            # Where the ref already points at the tree it is left alone: only blobs the
            # remote lacks (none, normally) are sent.
            set_ref = name is not None and existing != root
            result = store.push(
                remote, root, ref=name if set_ref else None,
                progress=_Labelled(progress, entry.name),
            )
            status = (
                RemoteStatus.UP_TO_DATE
                if result.blobs_sent == 0 and not set_ref
                else RemoteStatus.PUSHED
            )
            return RemoteOutcome(
                entry.name, entry.url, status, transfer=result, ref=name, ref_set=set_ref
            )

        outcomes = _each(entries, prepare, send, progress, on_outcome, until_success=False)
        result = RemotesReport("push", str(tree), root, name, tuple(outcomes))
        if check:
            result.raise_for_failure()
        return result


def _each(
    entries: list[RemoteEntry],
    ask: Callable[[Store], T],
    act: Callable[[RemoteEntry, Store, T], RemoteOutcome],
    progress: Progress,
    on_outcome: Callable[[RemoteOutcome], None] | None,
    *,
    until_success: bool,
) -> list[RemoteOutcome]:
    """Check every remote at once with ``ask``, then, in order, ``act`` on each that answered
    (``until_success``: up to the first that succeeds). One outcome per remote reached."""
    checks = [_Check(entry, ask) for entry in entries]
    outcomes: list[RemoteOutcome] = []
    try:
        for chk in checks:
            if not chk.wait():
                outcome = _timed_out(chk)
            elif chk.error is not None:
                outcome = _failure(chk.entry, chk.error)
            else:
                remote, answer = chk.result()
                try:
                    outcome = act(chk.entry, remote, answer)
                except Exception as exc:  # noqa: BLE001 - reported; the other remotes go on
                    outcome = _failure(chk.entry, exc)
                finally:
                    progress.finish()
            chk.release()
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if until_success and outcome.ok:
                break
    finally:
        for chk in checks:
            chk.release()
    return outcomes
