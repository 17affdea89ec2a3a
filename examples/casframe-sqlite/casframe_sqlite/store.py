"""The ``sqlite://PATH`` backend: every blob and ref of a store in one SQLite database file.

URL forms (everything after ``sqlite://`` is the file's path, as for ``file://``)::

    sqlite:///srv/cas/cas.db        absolute path
    sqlite://cas.db                 relative to the current directory (also sqlite://./cas.db)
    sqlite://~/cas.db               in the home directory
    sqlite:///srv/cas/cas.db?timeout=120&fsync=true

Options (URL query or the ``options`` table of a configured store): ``timeout`` — seconds a
writer waits for another one to finish its transaction (default 60); ``fsync`` — with ``true``
every transaction is flushed to disk (``synchronous=FULL``), surviving power loss at a cost in
speed; by default (``synchronous=NORMAL`` in WAL mode) a committed transaction survives the
process being killed, and a power loss may lose the last ones but never leaves the file damaged.
The file and its folders are created when missing.

Design:

* **Schema.** ``blobs(id, hash, size, mtime)`` with a unique index on ``(hash, size)`` — a
  blob's identity — and ``chunks(blob_id, start, data)`` holding its content in pieces of at
  most :data:`CHUNK_SIZE` bytes; ``refs(name, hash, size, accessed)``. The header's
  ``application_id`` marks the file as ours and ``user_version`` is the schema version, so a
  file of another application is refused instead of being written into. Row ids are never
  reused (``AUTOINCREMENT``): a reader or writer holding the id of a row deleted meanwhile
  cannot reach another blob's content through it.
* **Uploads stage in the database.** A writer keeps at most one chunk in memory. When a chunk
  fills up it is written, in its own short transaction, under an *upload row*: a ``blobs`` row
  whose ``hash`` is NULL, which no lookup by digest can see. ``commit`` is then one short
  transaction that gives the upload row its digest: the blob appears whole, at once, and only
  under the digest the core has verified. A blob that fits in one chunk skips the staging and
  is stored by one transaction at commit. This was chosen over spooling to a temporary file:
  publishing a spooled blob would copy all of it inside one transaction, holding the only write
  lock for as long as that takes, while here no transaction outlasts one chunk.
* **Dedup.** If the digest is already stored when an upload commits, the stored copy wins and
  only its ``mtime`` is refreshed (so prune's grace period covers a re-stored blob); the
  upload's chunks are dropped. Identical uploads racing in several threads or processes end
  with exactly one copy, because each commit runs under the database's write lock.
* **Concurrency.** WAL mode: readers never wait for the writer and one writer works at a time.
  Every write transaction starts with ``BEGIN IMMEDIATE``, so it waits (up to ``timeout``) for
  the write lock before reading anything and can never fail half-way on a lock upgrade.
  Connections come from a small pool, one per thread at a time; after a ``fork`` the child
  leaves its parent's connections alone and opens its own.
* **Reads** fetch one chunk per query, so a stream holds no transaction open between reads.
  If prune deletes the blob while it is being read, the reader looks the digest up again (a
  writer may have stored it anew) and otherwise raises :class:`~casframe.BlobNotFoundError`.
  Queries that must agree with each other (a blob's row and its chunks) run in one read
  transaction, :meth:`SQLiteDatabase.snapshot`: run one by one, a delete committed between
  them would make a healthy blob look empty or cut short.
* **Leftovers.** The upload row of a writer killed mid-upload stays invisible; ``clean_temp``
  (run by prune with its grace cutoff) deletes upload rows not written to since the cutoff.
  Deleted content's pages are reused by later writes; the file itself shrinks only with an
  offline ``VACUUM``.

This module must never hash or verify content (the core does), and never hold a transaction
open across a call into code it does not control.
"""

from __future__ import annotations

import io
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import BinaryIO
from urllib.parse import unquote

from casframe import (
    DIGEST_FUNCTIONS,
    SHA256,
    BackendUnavailableError,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    Capability,
    CasframeError,
    ConfigError,
    Digest,
    DigestFunction,
    InvalidDigestError,
    PermissionDeniedError,
    RefCapability,
    RefConflictError,
    RefInfo,
    RefNotFoundError,
    RefStore,
    Store,
    StoreURL,
)

__all__ = [
    "CHUNK_SIZE",
    "DatabaseOpenError",
    "SQLiteBlobStore",
    "SQLiteDatabase",
    "SQLiteRefStore",
    "SQLiteStoreError",
    "database_path",
    "open_sqlite_store",
]

#: Largest piece of a blob in one row. SQLite keeps a large value as a chain of overflow pages
#: and reads it whole, so a row is what one read costs in memory; 1 MiB matches the core's
#: streaming chunks and keeps a chunk's transaction to a few milliseconds.
CHUNK_SIZE = 1 << 20
#: ``PRAGMA application_id`` of a casframe-sqlite database ("CFSQ").
APPLICATION_ID = 0x43465351
#: ``PRAGMA user_version``: the schema this module reads and writes.
SCHEMA_VERSION = 1

_DEFAULT_TIMEOUT = 60.0
# 16 KiB pages: content is stored in overflow chains, and SQLite's own measurements of blob
# storage favour pages above the 4 KiB default. Only takes effect when the file is created.
_PAGE_SIZE = 16384
# A WAL file shrinks back to this after a checkpoint instead of keeping its peak size.
_WAL_SIZE_LIMIT = 64 << 20
# Digests per lookup query: 999 host parameters is the limit of older SQLite builds.
_LOOKUP_BATCH = 500
# Rows per listing page: each page is its own short query.
_LIST_PAGE = 2000
# Blobs per delete transaction, and content bytes freed by one, to keep transactions short.
_DELETE_BATCH = 200
_DELETE_BATCH_BYTES = 64 << 20
# Pooled connections kept idle per database (more are opened when more threads need them).
_MAX_IDLE = 8
_OPTIONS = ("fsync", "timeout")

_SCHEMA = """
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id finds no other blob
    hash TEXT,              -- NULL while this row is an upload in progress
    size INTEGER NOT NULL,  -- of an upload: the bytes written so far
    mtime REAL NOT NULL     -- seconds since the epoch: stored, touched, or last chunk written
);
CREATE UNIQUE INDEX blobs_digest ON blobs (hash, size);
CREATE INDEX blobs_uploads ON blobs (mtime) WHERE hash IS NULL;
CREATE TABLE chunks (
    blob_id INTEGER NOT NULL,
    start INTEGER NOT NULL,  -- offset of data[0] in the blob
    data BLOB NOT NULL,
    PRIMARY KEY (blob_id, start)
);
CREATE TABLE refs (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    accessed REAL NOT NULL
) WITHOUT ROWID;
"""


class SQLiteStoreError(CasframeError):
    """The database failed an operation (disk full, I/O error, damaged file)."""

    reason = "sqlite"


class DatabaseOpenError(SQLiteStoreError, ConfigError):
    """The database file cannot be opened, or is not a casframe-sqlite database."""

    reason = "sqlite-open"


def _translate(exc: sqlite3.Error, where: str) -> CasframeError:
    """The casframe error for a failed SQLite call on the database ``where``."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    message = f"{where}: {exc}"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return BackendUnavailableError(f"{message} (another writer held the database too long)")
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
        return PermissionDeniedError(message)
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CANTOPEN")):
        return DatabaseOpenError(message)
    return SQLiteStoreError(message)


def database_path(url: StoreURL) -> str:
    """The absolute path of the database file a ``sqlite://`` URL names."""
    raw = unquote(url.netloc + url.path)
    if not raw:
        raise ConfigError(f"sqlite:// URL needs a database file path: {url.url!r}")
    return os.path.abspath(os.path.expanduser(raw))


class SQLiteDatabase:
    """One database file: a pool of connections, short transactions, errors translated.

    Shared by the :class:`SQLiteBlobStore` and :class:`SQLiteRefStore` of one store. Opening
    checks (or creates) the schema, so a bad path fails at once with
    :class:`DatabaseOpenError`.
    """

    def __init__(self, path: str, *, timeout: float = _DEFAULT_TIMEOUT, fsync: bool = False):
        self.path = path
        self.url = f"sqlite://{path}"
        self._timeout = timeout
        self._synchronous = "FULL" if fsync else "NORMAL"
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._closed = False
        if os.path.isdir(path):
            raise DatabaseOpenError(f"{self.url}: {path} is a directory, not a database file")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as exc:
            raise DatabaseOpenError(f"{self.url}: cannot create its folder: {exc}") from None
        try:
            with self.connection() as conn:
                self._prepare(conn)
        except BaseException:
            self.close()
            raise

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE.
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._open_failure(exc) from None
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._open_failure(exc) from None
        return conn

    def _open_failure(self, exc: sqlite3.Error) -> CasframeError:
        """The error for a database that could not be opened or read at all."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return DatabaseOpenError(
                f"{self.url}: {self.path} is not a casframe-sqlite database ({exc})"
            )
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return _translate(exc, self.url)  # another process is busy with it: temporary
        return DatabaseOpenError(f"{self.url}: cannot open {self.path}: {exc}")

    def _checkout(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise SQLiteStoreError(f"{self.url} is closed")
            if self._pid != os.getpid():
                # Forked: those connections belong to the parent; using or even closing them
                # here could disturb its locks. Forget them and open our own.
                self._idle = []
                self._pid = os.getpid()
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if self._pid != os.getpid():
                return  # a connection of the parent, used across a fork: leave it alone
            if not self._closed and not conn.in_transaction and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this thread's exclusive use while the block runs (autocommit)."""
        conn = self._checkout()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise _translate(exc, self.url) from exc
        finally:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._checkin(conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed when the block ends and rolled back if it raises.

        ``BEGIN IMMEDIATE`` takes the write lock first, waiting up to ``timeout`` for other
        writers; blocks must stay short, since every other writer waits for them.
        """
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query of the block sees the database in the same state.

        Writers are not held up (WAL), but the block must stay short all the same: it pins the
        state it reads, so no checkpoint can move past it.
        """
        with self.connection() as conn:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")

    def vacuum(self) -> None:
        """Rewrite the file without its free pages, then empty the write-ahead log into it."""
        with self.connection() as conn:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Close the pooled connections; connections in use close when they come back."""
        with self._lock:
            self._closed = True
            idle = self._idle if self._pid == os.getpid() else []
            self._idle = []
        for conn in idle:
            conn.close()

    # -- schema -----------------------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        application_id, version, objects = self._header(conn)
        if application_id == 0 and objects == 0:
            self._create(conn)
        elif application_id != APPLICATION_ID:
            raise DatabaseOpenError(
                f"{self.url}: {self.path} is an SQLite database of another application, "
                "not a casframe-sqlite store"
            )
        elif version > SCHEMA_VERSION:
            raise DatabaseOpenError(
                f"{self.url}: the database has schema version {version}, written by a newer "
                f"casframe-sqlite; this one reads version {SCHEMA_VERSION}"
            )
        mode = self._journal_mode_wal(conn)
        if str(mode).lower() != "wal":
            raise DatabaseOpenError(
                f"{self.url}: cannot use WAL mode (journal mode stays {mode!r}); the database "
                "must be on a local file system"
            )
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")

    def _journal_mode_wal(self, conn: sqlite3.Connection) -> object:
        """Switch to WAL and return the journal mode now in force.

        The switch needs the database to itself, and SQLite answers "database is locked" at
        once, without waiting the busy timeout, when another process is switching or reading
        at that moment (several processes opening a new database together): retried here for
        up to ``timeout`` seconds like any other wait for a lock.
        """
        deadline = time.monotonic() + self._timeout
        pause = 0.005
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _header(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        # One read transaction: the three answers come from one state of the database, not
        # from before and after another process created the schema in between.
        own_transaction = not conn.in_transaction
        try:
            if own_transaction:
                conn.execute("BEGIN")
            try:
                application_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            finally:
                if own_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._open_failure(exc) from None
        return int(application_id), int(version), int(objects)

    def _create(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        self._journal_mode_wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        # Another process may have created the schema while this one waited for the lock.
        application_id, _, objects = self._header(conn)
        if application_id == 0 and objects == 0:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")

    # -- shared queries -----------------------------------------------------------------------

    def find_blob(self, conn: sqlite3.Connection, digest: Digest) -> int | None:
        """The row id of a stored blob, or None."""
        row = conn.execute(
            "SELECT id FROM blobs WHERE hash = ? AND size = ?", (digest.hash, digest.size)
        ).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def drop_rows(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Delete blob or upload rows and their chunks."""
        conn.executemany("DELETE FROM chunks WHERE blob_id = ?", [(i,) for i in ids])
        conn.executemany("DELETE FROM blobs WHERE id = ?", [(i,) for i in ids])


def _store_whole(conn: sqlite3.Connection, digest: Digest, data: bytes, now: float) -> None:
    """Store ``data`` under ``digest`` inside a write transaction; an existing copy is kept.

    The existing copy only has its time refreshed, as ``touch_blobs`` would.
    """
    if conn.execute(
        "UPDATE blobs SET mtime = ? WHERE hash = ? AND size = ?", (now, digest.hash, digest.size)
    ).rowcount:
        return
    blob_id = conn.execute(
        "INSERT INTO blobs (hash, size, mtime) VALUES (?, ?, ?)", (digest.hash, digest.size, now)
    ).lastrowid
    view = memoryview(data)
    conn.executemany(
        "INSERT INTO chunks (blob_id, start, data) VALUES (?, ?, ?)",
        ((blob_id, at, view[at : at + CHUNK_SIZE]) for at in range(0, len(data), CHUNK_SIZE)),
    )


class _SQLiteWriter(BlobWriter):
    """Buffers up to one chunk; larger content is staged chunk by chunk under an upload row."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._buffer = bytearray()
        self._upload: int | None = None  # the upload row, once a first chunk was written
        self._staged = 0  # bytes already written as chunks
        self._finished = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self._finished, "write after commit or abort"
        view = memoryview(data).cast("B")
        while view:
            if not self._buffer and len(view) >= CHUNK_SIZE:
                chunk: bytes | memoryview = view[:CHUNK_SIZE]  # a whole chunk: no copy
                view = view[CHUNK_SIZE:]
            else:
                room = CHUNK_SIZE - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
                if len(self._buffer) < CHUNK_SIZE:
                    return
                chunk = bytes(self._buffer)
                self._buffer.clear()
            with self._db.transaction() as conn:
                staged = self._stage(conn, chunk)
            self._upload, self._staged = staged

    def _stage(self, conn: sqlite3.Connection, chunk: bytes | memoryview) -> tuple[int, int]:
        """Write ``chunk`` after what is staged; return the upload row and the bytes staged.

        The caller records them only once the transaction has committed: the id of a row whose
        insertion was rolled back may be given to another row.
        """
        now = time.time()
        upload = self._upload
        if upload is None:
            cursor = conn.execute(
                "INSERT INTO blobs (hash, size, mtime) VALUES (NULL, 0, ?)", (now,)
            )
            assert cursor.lastrowid is not None
            upload = cursor.lastrowid
        conn.execute(
            "INSERT INTO chunks (blob_id, start, data) VALUES (?, ?, ?)",
            (upload, self._staged, chunk),
        )
        staged = self._staged + len(chunk)
        # The upload row's time is the last write: clean_temp leaves a live upload alone.
        self._claim(conn, upload, "UPDATE blobs SET size = ?, mtime = ?", (staged, now))
        return upload, staged

    def _claim(
        self, conn: sqlite3.Connection, upload: int, update: str, values: tuple[object, ...]
    ) -> None:
        """Run ``update ... WHERE`` on the upload row ``upload``, which must still exist."""
        cursor = conn.execute(f"{update} WHERE id = ? AND hash IS NULL", (*values, upload))
        if cursor.rowcount != 1:
            raise BackendUnavailableError(
                f"{self._db.url}: an upload was removed as abandoned while it was still being "
                "written (it was idle longer than prune's grace period); store the blob again"
            )

    def commit(self, digest: Digest) -> None:
        assert not self._finished, "commit after commit or abort"
        now = time.time()
        if self._upload is None:
            with self._db.transaction() as conn:
                _store_whole(conn, digest, bytes(self._buffer), now)
            self._finished = True
            self._buffer = bytearray()
            return
        with self._db.transaction() as conn:
            duplicate = self._db.find_blob(conn, digest) is not None
            if duplicate:
                conn.execute(
                    "UPDATE blobs SET mtime = ? WHERE hash = ? AND size = ?",
                    (now, digest.hash, digest.size),
                )
            else:
                upload = self._upload
                if self._buffer:
                    upload, _ = self._stage(conn, bytes(self._buffer))
                publish = "UPDATE blobs SET hash = ?, size = ?, mtime = ?"
                self._claim(conn, upload, publish, (digest.hash, digest.size, now))
        self._finished = True
        self._buffer = bytearray()
        if duplicate:
            self._discard()
        else:
            self._upload = None

    def abort(self) -> None:
        self._finished = True
        self._buffer = bytearray()
        # A failure here must not hide the error that made the caller abort; the upload row
        # left behind is invisible, and clean_temp removes it later.
        with suppress(CasframeError):
            self._discard()

    def _discard(self) -> None:
        upload, self._upload = self._upload, None
        if upload is not None:
            with self._db.transaction() as conn:
                self._db.drop_rows(conn, [upload])


class _ChunkReader(io.RawIOBase):
    """A blob's content, one chunk per query, from ``offset`` on."""

    def __init__(self, db: SQLiteDatabase, digest: Digest, blob_id: int, offset: int) -> None:
        super().__init__()
        self._db = db
        self._digest = digest
        self._blob_id = blob_id
        self._position = offset
        self._chunk: memoryview = memoryview(b"")
        self._chunk_start = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        within = self._position - self._chunk_start
        if not 0 <= within < len(self._chunk):
            if not self._fetch():
                return 0
            within = self._position - self._chunk_start
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._chunk) - within)
        view[:n] = self._chunk[within : within + n]
        self._position += n
        return n

    def _fetch(self) -> bool:
        """Load the chunk holding the current position; False at the end of the content."""
        with self._db.snapshot() as conn:
            for _ in range(3):
                row = conn.execute(
                    "SELECT start, data FROM chunks WHERE blob_id = ? AND start <= ? "
                    "ORDER BY start DESC LIMIT 1",
                    (self._blob_id, self._position),
                ).fetchone()
                if row is not None and row[0] + len(row[1]) > self._position:
                    self._chunk_start, self._chunk = row[0], memoryview(row[1])
                    return True
                if conn.execute("SELECT 1 FROM blobs WHERE id = ?", (self._blob_id,)).fetchone():
                    return False  # the stored content ends here (the core judges if too early)
                # Deleted while being read; a writer may have stored the same content again.
                blob_id = self._db.find_blob(conn, self._digest)
                if blob_id is None:
                    raise BlobNotFoundError(self._digest, self._db.url)
                self._blob_id = blob_id
        raise BlobNotFoundError(self._digest, self._db.url)


class SQLiteBlobStore(BlobStore):
    """Blobs as rows of chunks in one SQLite database (see the module docstring)."""

    capabilities = frozenset({Capability.LIST, Capability.DELETE, Capability.TOUCH})
    # Any: each digest function's store is a database file of its own (open_sqlite_store).
    digest_functions = frozenset(DIGEST_FUNCTIONS)

    def __init__(self, db: SQLiteDatabase, function: DigestFunction = SHA256) -> None:
        self.db = db
        self.digest_function = function

    def describe(self) -> str:
        return self.db.url

    def close(self) -> None:
        self.db.close()

    # -- primitives -------------------------------------------------------------------------

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        wanted = list(digests)
        present: set[tuple[str, int]] = set()
        with self.db.connection() as conn:
            for first in range(0, len(wanted), _LOOKUP_BATCH):
                hashes = sorted({d.hash for d in wanted[first : first + _LOOKUP_BATCH]})
                marks = ",".join("?" * len(hashes))
                present.update(
                    conn.execute(f"SELECT hash, size FROM blobs WHERE hash IN ({marks})", hashes)
                )
        return {d for d in wanted if (d.hash, d.size) not in present}

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        with self.db.connection() as conn:
            blob_id = self.db.find_blob(conn, digest)
        if blob_id is None:
            raise self._not_found(digest)
        return io.BufferedReader(_ChunkReader(self.db, digest, blob_id, offset), CHUNK_SIZE)

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        return _SQLiteWriter(self.db)

    # -- fast paths ---------------------------------------------------------------------------

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        for digest in digests:
            # One snapshot: a blob deleted between the two queries would read as empty.
            with self.db.snapshot() as conn:
                blob_id = self.db.find_blob(conn, digest)
                if blob_id is None:
                    raise self._not_found(digest)
                parts = conn.execute(
                    "SELECT data FROM chunks WHERE blob_id = ? ORDER BY start", (blob_id,)
                ).fetchall()
            yield digest, b"".join(part for (part,) in parts)

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        """Small blobs in shared transactions of about ``limits.max_batch_bytes``; large ones
        staged."""
        batch: list[tuple[Digest, bytes]] = []
        batch_bytes = 0
        for digest, data in blobs:
            if len(data) > CHUNK_SIZE:
                super().write_blobs([(digest, data)])
                continue
            batch.append((digest, data))
            batch_bytes += len(data)
            if batch_bytes >= self.limits.max_batch_bytes:
                self._write_batch(batch)
                batch, batch_bytes = [], 0
        self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[Digest, bytes]]) -> None:
        if not batch:
            return
        now = time.time()
        with self.db.transaction() as conn:
            for digest, data in batch:
                _store_whole(conn, digest, data, now)

    # -- capabilities ------------------------------------------------------------------------

    def iter_blobs(self) -> Iterator[BlobInfo]:
        after: tuple[str, int] = ("", -1)
        while True:
            # A page per query, resuming after the last key: no transaction stays open while
            # the caller works through the listing.
            with self.db.connection() as conn:
                page = conn.execute(
                    "SELECT hash, size, mtime FROM blobs WHERE (hash, size) > (?, ?) "
                    "ORDER BY hash, size LIMIT ?",
                    (*after, _LIST_PAGE),
                ).fetchall()
            for hash_, size, mtime in page:
                try:
                    digest = Digest(hash_, size)
                except InvalidDigestError:
                    continue  # a row not written by this module is not a blob
                yield BlobInfo(digest, mtime)
            if len(page) < _LIST_PAGE:
                return
            after = (page[-1][0], page[-1][1])

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> list[Digest]:
        deleted: list[Digest] = []
        batch: list[Digest] = []
        batch_bytes = 0
        for digest in digests:
            batch.append(digest)
            batch_bytes += digest.size
            if len(batch) >= _DELETE_BATCH or batch_bytes >= _DELETE_BATCH_BYTES:
                deleted += self._delete_batch(batch, older_than)
                batch, batch_bytes = [], 0
        return deleted + self._delete_batch(batch, older_than)

    def _delete_batch(self, batch: list[Digest], older_than: float | None) -> list[Digest]:
        """Delete what of ``batch`` is stored and older than ``older_than``; return that."""
        if not batch:
            return []
        cutoff = float("inf") if older_than is None else older_than
        with self.db.transaction() as conn:
            # The cutoff is checked inside the transaction that deletes: a blob stored again or
            # touched since prune listed it is newer by now, and stays.
            found = [
                (digest, row[0])
                for digest in batch
                for row in conn.execute(
                    "SELECT id FROM blobs WHERE hash = ? AND size = ? AND mtime < ?",
                    (digest.hash, digest.size, cutoff),
                )
            ]
            self.db.drop_rows(conn, [blob_id for _, blob_id in found])
        return [digest for digest, _ in found]

    def touch_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        now = time.time()
        wanted = list(digests)
        absent: list[Digest] = []
        for first in range(0, len(wanted), _LOOKUP_BATCH):
            with self.db.transaction() as conn:
                for digest in wanted[first : first + _LOOKUP_BATCH]:
                    touched = conn.execute(
                        "UPDATE blobs SET mtime = ? WHERE hash = ? AND size = ?",
                        (now, digest.hash, digest.size),
                    ).rowcount
                    if not touched:
                        absent.append(digest)
        return absent

    def clean_temp(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Delete upload rows (and their chunks) not written to since ``older_than``.

        They are left by writers killed mid-upload; a live writer refreshes its row with every
        chunk, so it stays younger than any sensible grace period.
        """
        query = "SELECT id, size FROM blobs WHERE hash IS NULL AND mtime < ?"
        with self.db.connection() as conn:
            stale: list[tuple[int, int]] = conn.execute(query, (older_than,)).fetchall()
        if dry_run:
            return len(stale), sum(size for _, size in stale)
        removed: list[tuple[int, int]] = []
        for first in range(0, len(stale), _DELETE_BATCH):
            ids = [blob_id for blob_id, _ in stale[first : first + _DELETE_BATCH]]
            with self.db.transaction() as conn:
                # Only rows still stale: a writer that woke up meanwhile keeps its upload.
                marks = ",".join("?" * len(ids))
                still = conn.execute(f"{query} AND id IN ({marks})", (older_than, *ids))
                rows = still.fetchall()
                self.db.drop_rows(conn, [blob_id for blob_id, _ in rows])
            removed.extend(rows)
        return len(removed), sum(size for _, size in removed)


class SQLiteRefStore(RefStore):
    """Refs as rows ``(name, hash, size, accessed)`` of the same database."""

    capabilities = frozenset({RefCapability.LIST, RefCapability.DELETE})

    def __init__(self, db: SQLiteDatabase) -> None:
        self.db = db

    def close(self) -> None:
        self.db.close()

    def _digest(self, name: str, row: tuple[str, int]) -> Digest:
        try:
            return Digest(row[0], row[1])
        except InvalidDigestError as exc:
            raise InvalidDigestError(f"ref {name} in {self.db.url} is damaged: {exc}") from None

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        if touch:
            with self.db.transaction() as conn:
                conn.execute("UPDATE refs SET accessed = ? WHERE name = ?", (time.time(), name))
                row = conn.execute("SELECT hash, size FROM refs WHERE name = ?", (name,)).fetchone()
        else:
            with self.db.connection() as conn:
                row = conn.execute("SELECT hash, size FROM refs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise RefNotFoundError(name, self.db.url)
        return self._digest(name, row)

    def set_ref(self, name: str, digest: Digest) -> None:
        with self.db.transaction() as conn:
            # Checked again under the write lock: two writers setting "a" and "a/b" at once
            # cannot both pass the core's check.
            existing = _ref_in_the_way(conn, name)
            if existing is not None:
                raise RefConflictError(name, existing)
            conn.execute(
                "INSERT OR REPLACE INTO refs (name, hash, size, accessed) VALUES (?, ?, ?, ?)",
                (name, digest.hash, digest.size, time.time()),
            )

    def conflicting_ref(self, name: str) -> str | None:
        with self.db.connection() as conn:
            return _ref_in_the_way(conn, name)

    def delete_ref(self, name: str) -> None:
        with self.db.transaction() as conn:
            deleted = conn.execute("DELETE FROM refs WHERE name = ?", (name,)).rowcount
        if not deleted:
            raise RefNotFoundError(name, self.db.url)

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        """Every ref starting with ``prefix``, least recently used first."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT name, hash, size, accessed FROM refs WHERE substr(name, 1, ?) = ? "
                "ORDER BY accessed, name",
                (len(prefix), prefix),
            ).fetchall()
        for name, hash_, size, accessed in rows:
            yield RefInfo(name, self._digest(name, (hash_, size)), accessed)


def _ref_in_the_way(conn: sqlite3.Connection, name: str) -> str | None:
    """A ref named like a folder of ``name`` (``a`` for ``a/b``), or one under ``name/``: two
    lookups in the index of names, where the default ``conflicting_ref`` lists every ref
    under ``name/``."""
    segments = name.split("/")
    folders = ["/".join(segments[:end]) for end in range(1, len(segments))]
    if folders:
        marks = ",".join("?" * len(folders))
        query = f"SELECT name FROM refs WHERE name IN ({marks}) ORDER BY name LIMIT 1"
        row = conn.execute(query, folders).fetchone()
        if row is not None:
            return str(row[0])
    # Names under "NAME/" sort from "NAME/" to just before "NAME0" ('0' follows '/').
    row = conn.execute(
        "SELECT name FROM refs WHERE name >= ? AND name < ? ORDER BY name LIMIT 1",
        (f"{name}/", f"{name}0"),
    ).fetchone()
    return None if row is None else str(row[0])


def _options(url: StoreURL) -> tuple[float, bool]:
    url.check_options(_OPTIONS)
    raw = url.option("timeout")
    try:
        timeout = _DEFAULT_TIMEOUT if raw is None else float(raw)
    except ValueError:
        timeout = -1.0
    if not 0 <= timeout < float("inf"):
        raise ConfigError(f"option timeout={raw!r} in {url.url} must be a number of seconds")
    return timeout, url.flag("fsync")


def open_sqlite_store(url: StoreURL) -> Store:
    """Factory for ``sqlite://PATH``: opens the database, creating it when missing.

    Raises :class:`DatabaseOpenError` when the path cannot be opened as a database or holds
    something other than a casframe-sqlite store, and :class:`~casframe.ConfigError` for a
    malformed URL or option. A digest function other than SHA-256 has a database file of its
    own beside PATH, ``PATH-NAME`` (``cas.db-blake3``).
    """
    function = url.digest_function_for(SQLiteBlobStore)  # before the database is touched
    timeout, fsync = _options(url)
    path = database_path(url)
    if function != SHA256:
        path = f"{path}-{function.name}"
    db = SQLiteDatabase(path, timeout=timeout, fsync=fsync)
    return Store(SQLiteBlobStore(db, function), SQLiteRefStore(db), url=db.url)
