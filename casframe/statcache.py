"""Remembered digests of imported files, so that an unchanged file is not read and hashed again.

An import records, for each regular file it reads, what ``fstat`` said about the file just
before reading it — device, inode, size, modification and change time in nanoseconds — with
the digest of the content it read. The next import of the same directory ``lstat``s each file
and, when all five values match a recorded entry, takes the recorded digest instead of reading
the file. Any write to a file changes its change time (which no user can set back), so a
changed file never matches.

What this cache must never do:

* Replace the store's existence check. The import still asks the store about every digest
  (``find_missing``, batched) and reads the file again when its blob is missing there, for
  instance because a prune removed it since.
* Trust a "racy" file: one whose modification or change time is within
  :data:`TIMESTAMP_WINDOW_NS` of the start of the import that read it. File systems keep time
  stamps in steps (a clock tick on Linux, 1 s on ext3 and HFS+, 2 s on FAT), so such a file
  could still change after it was read without its time stamps changing; its entry is not
  recorded, and the next import reads it again.
* Be trusted when it cannot be read back intact: a file with another format, a wrong
  checksum, or cut short is an empty cache, and the next save replaces it.

Where it lives: one file per imported directory (named after a hash of its real path) in
``$CASFRAME_STAT_CACHE`` or else the ``stat-cache`` folder of the user cache directory. Not
in the store: a digest depends only on the file's content, and the store is asked anyway, so
one entry serves every store the directory is imported into; and the user's own cache
directory cannot be written by the other users of a shared store. A save writes a new file
and renames it over the old one, so an interrupted import leaves the previous cache (or
none), never half of one. The file holds only the entries of the latest import, so it stays
the size of the tree (72 bytes a file); files of directories not imported for
:data:`MAX_AGE_S`, and the oldest beyond :data:`MAX_FILES`, are removed at each save.

``CASFRAME_STAT_CACHE=off`` (or ``import_directory(..., stat_cache=False)``, or
``casframe import --no-stat-cache``) switches it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
from typing import NamedTuple

from casframe.digestfunctions import SHA256, DigestFunction
from casframe.userdirs import cache_folder

__all__ = [
    "MAX_AGE_S",
    "MAX_FILES",
    "STAT_CACHE_ENV",
    "TIMESTAMP_WINDOW_NS",
    "FileStat",
    "StatCache",
    "default_directory",
    "open_stat_cache",
]

#: Environment variable: a directory for the cache files, or ``off`` to disable the cache.
STAT_CACHE_ENV = "CASFRAME_STAT_CACHE"

#: A file whose modification or change time is this close to (or after) the start of the import
#: is not recorded. 2 s covers the coarsest common time stamps (FAT); finer ones lose nothing
#: but a re-read of files written in the last two seconds before an import.
TIMESTAMP_WINDOW_NS = 2_000_000_000

#: Cache files of directories not imported for this long are removed at the next save.
MAX_AGE_S = 30 * 86400
#: At most this many cache files are kept (the least recently saved go first).
MAX_FILES = 256
# A temp file this old is the leftover of a killed save, not one in progress.
_STALE_TEMP_S = 3600

_MAGIC = b"casframe stat cache\n"
_VERSION = 1
_HEADER = struct.Struct("<20sII")  # magic, version, entry count
# An entry is its key, then the raw sha256 of the content. Kept packed in memory too: a dict
# of bytes loads and saves in a few milliseconds for 20,000 files, and packing the key of a
# looked-up file costs less than building a tuple of five integers.
_KEY = struct.Struct("<QQQqq")  # st_ino, st_dev, st_size, st_mtime_ns, st_ctime_ns
_pack = _KEY.pack
_CHECKSUM = 32  # sha256 of everything before it
_SUFFIX = ".stat"


def default_directory() -> str | None:
    """Where cache files go: ``$CASFRAME_STAT_CACHE``, else the user cache directory.

    ``None`` when the variable says ``off``.
    """
    return cache_folder(STAT_CACHE_ENV, "stat-cache")


class FileStat(NamedTuple):
    """What the cache keeps of a file's ``fstat``, as it crosses a pipe from a helper process."""

    st_ino: int
    st_dev: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        # tuple.__new__: the generated __new__ would be one more Python call per file.
        return tuple.__new__(cls, (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns,
                                   st.st_ctime_ns))


class StatCache:
    """The recorded digests of one imported directory, and the entries of the current import.

    An import looks files up (:meth:`lookup`) and records what it reads (:meth:`record`);
    both are safe from several threads (a dict lookup and an in-place bytearray append are
    atomic in CPython). :meth:`save` replaces the file with the entries of this import only.
    """

    def __init__(
        self, path: str, started_ns: int | None = None, function: DigestFunction = SHA256
    ) -> None:
        self.path = path
        self._entry_size = _KEY.size + function.hex_length // 2
        #: Entries of the previous import (empty when there was none or it was unreadable):
        #: packed key -> raw hash (of ``function``).
        self.known: dict[bytes, bytes] = _load(path, self._entry_size)
        #: Entries of this import, packed as in the file (key, then raw sha256): looked up and
        #: still valid, or read and not racy. A bytearray holds 20,000 of them in 1.4 MB.
        self.seen = bytearray()
        started = time.time_ns() if started_ns is None else started_ns
        self._trusted_before = started - TIMESTAMP_WINDOW_NS

    @staticmethod
    def key(st: os.stat_result | FileStat) -> bytes:
        return _KEY.pack(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def lookup(self, st: os.stat_result) -> str | None:
        """The recorded sha256 (hex) of the file ``st`` describes, if it has not changed."""
        key = _pack(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        found = self.known.get(key)
        if found is None:
            return None
        seen = self.seen
        seen += key
        seen += found
        return found.hex()

    def record(self, st: os.stat_result | FileStat, hash_: str) -> None:
        """Remember that the file ``st`` describes (before it was read) held content ``hash_``.

        Racy files (time stamps within the window before the import started, or later) are
        left out: they could change again without their time stamps changing.
        """
        limit = self._trusted_before
        if st.st_mtime_ns < limit and st.st_ctime_ns < limit:
            seen = self.seen
            seen += _pack(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            seen += bytes.fromhex(hash_)

    def save(self) -> None:
        """Replace the cache file with this import's entries; failures are ignored.

        The cache only saves work: a cache that cannot be written (read-only home directory,
        full disk) must not fail the import that was otherwise successful.
        """
        with contextlib.suppress(OSError):
            _save(self.path, self.seen, self._entry_size)
            _expire(os.path.dirname(self.path), keep=self.path)


def open_stat_cache(
    root: str, directory: str, started_ns: int | None = None, function: DigestFunction = SHA256
) -> StatCache:
    """The cache of the directory ``root`` (an absolute path) for imports hashing with
    ``function``, kept in ``directory``. Each function has its own file: a hash of one is no
    digest of another (BLAKE3's and SHA-256's are even the same length)."""
    key = os.fsencode(os.path.realpath(root))
    if function != SHA256:  # SHA-256's file keeps the name it had before other functions
        key += b"\0" + function.name.encode()
    name = hashlib.sha256(key).hexdigest()[:40] + _SUFFIX
    return StatCache(os.path.join(directory, name), started_ns, function)


def _load(path: str, entry_size: int) -> dict[bytes, bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    if len(data) < _HEADER.size + _CHECKSUM:
        return {}
    body = memoryview(data)[:-_CHECKSUM]
    magic, version, count = _HEADER.unpack_from(body)
    if (
        magic != _MAGIC
        or version != _VERSION
        or len(body) != _HEADER.size + count * entry_size
        or hashlib.sha256(body).digest() != data[-_CHECKSUM:]
    ):
        return {}
    key, end = _KEY.size, entry_size
    # A file may list a key twice (two names of one file); the entries are then the same.
    return {
        data[start : start + key]: data[start + key : start + end]
        for start in range(_HEADER.size, len(body), end)
    }


def _save(path: str, entries: bytearray, entry_size: int) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    header = _HEADER.pack(_MAGIC, _VERSION, len(entries) // entry_size)
    checksum = hashlib.sha256(header)
    checksum.update(entries)
    temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(header)
                f.write(entries)
                f.write(checksum.digest())
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _expire(directory: str, keep: str) -> None:
    """Remove cache files unused for MAX_AGE_S, the oldest beyond MAX_FILES, and stale temps."""
    now = time.time()
    caches: list[tuple[float, str]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if entry.name.endswith(".tmp"):
                if now - mtime > _STALE_TEMP_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            elif entry.name.endswith(_SUFFIX) and entry.path != keep:
                caches.append((mtime, entry.path))
    caches.sort(reverse=True)
    for index, (mtime, path) in enumerate(caches):
        if index >= MAX_FILES - 1 or now - mtime > MAX_AGE_S:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
