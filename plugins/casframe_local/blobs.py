"""The ``file://`` backend's blob store, :class:`LocalBlobStore`: reads, verified writes and the
fast paths (batch reads and writes, freshening, hardlinks, kernel copies)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO, cast

from casframe import (
    DIGEST_FUNCTIONS,
    SHA256,
    BlobLimits,
    BlobWriter,
    Capability,
    CasframeError,
    CorruptBlobError,
    Digest,
    DigestFunction,
    UnsupportedOperationError,
    layout,
)
from casframe.layout import object_name
from casframe.lazy import lazy_module

from ._copy import CopiedStream, KernelCopy
from ._files import CANNOT_WRITE, fsync_dir, make_folders, temp_name
from .maintenance import LocalBlobMaintenance

if TYPE_CHECKING:
    import urllib.parse as urlparse
else:
    urlparse = lazy_module("urllib.parse")  # off the start-up path of every command

__all__ = ["LocalBlobStore"]

_OBJECT_MODE = 0o444  # read-only, so a hardlinked checkout cannot edit the store by accident
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# O_NONBLOCK: opening a stray FIFO named like an object must not wait for a writer (it has no
# effect on regular files).
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
_COPY_CHUNK = 1 << 20
_CHECK_SIZE_ABOVE = 1 << 20  # read_blobs compares the object's size first above this
_PREALLOCATE_FROM = 1 << 20  # files copied into the store from this size are preallocated
# Opening an object's path fails so when it is absent, when a stray folder stands where it
# would be, or when a stray file stands where its fan-out folder would be.
_NOT_AN_OBJECT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _open_folder(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _preallocate(fd: int, size: int) -> int:
    """Reserve ``size`` bytes for the new file ``fd`` (made that long) before a large copy
    into it: the copy then fills reserved blocks instead of allocating them as it goes, a
    quarter less kernel time on ext4. Returns the size reserved, 0 when it was not (a small
    file, or a file system that refuses)."""
    if size < _PREALLOCATE_FROM:
        return 0
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        return 0  # no room (the copy will say so) or no support: copy without it
    return size


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _LocalWriter(BlobWriter):
    """An upload into a temp file; with ``copy``, one that a kernel copy fills (its thread
    ends before the temp file is published or closed)."""

    def __init__(
        self, store: LocalBlobStore, fd: int, temp: str, copy: KernelCopy | None = None
    ) -> None:
        self._store = store
        self._fd: int | None = fd
        self._temp = temp
        self._copy = copy

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "write after commit or abort"
        _write_all(self._fd, data)

    def commit(self, digest: Digest) -> None:
        assert self._fd is not None, "commit after commit or abort"
        if self._copy is not None:
            self._copy.finish()  # raises the copy's error; the caller then aborts
            if self._copy.copied != digest.size:
                raise CorruptBlobError(digest, f"the copy holds {self._copy.copied} bytes")
        fd, self._fd = self._fd, None
        try:
            self._store.publish(fd, self._temp, digest)
        except BaseException:
            if self._temp:  # a named temp file (no O_TMPFILE): not left behind for prune
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._temp)
            raise
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            if self._copy is not None:
                self._copy.stop()  # before the close: its thread writes into this file
            os.close(self._fd)
            self._fd = None
            if self._temp:
                try:
                    os.unlink(self._temp)
                except FileNotFoundError:
                    pass


class LocalBlobStore(LocalBlobMaintenance):
    capabilities = frozenset(
        {
            Capability.LIST,
            Capability.DELETE,
            Capability.TOUCH,
            Capability.LOCAL_PATH,
            Capability.COPY_FILE,
        }
    )
    limits = BlobLimits(max_concurrency=2)  # local disk and hashing: one thread per core
    # Each function's blobs in their own folder (casframe.layout.function_folder).
    digest_functions = frozenset(DIGEST_FUNCTIONS)

    def __init__(
        self, root: str, *, fsync: bool = False, function: DigestFunction = SHA256
    ) -> None:
        #: The location's root; the blobs are in ``root`` (its folder for ``function``).
        self.location = root
        self.digest_function = function
        folder = layout.function_folder(function)
        root = os.path.join(root, folder) if folder else root
        self.root = root
        self.objdir = os.path.join(root, layout.OBJECTS)
        self.tmpdir = os.path.join(root, layout.TMP)
        self.fsync = fsync
        make_folders(self.objdir, self.tmpdir)
        # A store on a read-only mount may lack tmp/ (copied without it): it is read, never
        # written, and a write fails as any write there would.
        self._tmpfd = _open_folder(self.tmpdir) if os.path.isdir(self.tmpdir) else -1
        self._objfd = _open_folder(self.objdir)

    def close(self) -> None:
        for name in ("_tmpfd", "_objfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def describe(self) -> str:
        return f"file://{self.root}"

    def worker_spec(self) -> tuple[str, str]:
        url = f"file://{urlparse.quote(os.fsencode(self.location))}"
        query = [] if self.digest_function == SHA256 else [
            f"digest_function={self.digest_function.name}"
        ]
        query += ["fsync=true"] if self.fsync else []
        return "casframe_local.store:open_local_store", url + "?" * bool(query) + "&".join(query)

    # Uploads go to an unnamed file (O_TMPFILE) that is linked into objects/ once verified:
    # nothing to clean up after a crash, and one link instead of create + rename. Where the
    # file system lacks O_TMPFILE, a named file in tmp/ is renamed into place instead.

    @functools.cached_property
    def _anonymous(self) -> bool:
        # Probed at the first write, not on opening: a store that is only read (a read-only
        # server's) never gets even an unnamed file.
        return self._probe_anonymous_temp()

    def _probe_anonymous_temp(self) -> bool:
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag or not os.path.isdir("/proc/self/fd"):
            return False
        try:
            fd = os.open(self.tmpdir, flag | os.O_RDWR | os.O_CLOEXEC, _OBJECT_MODE)
        except OSError:
            return False
        os.close(fd)
        return True

    def open_temp(self) -> tuple[int, str]:
        """A new file for an upload: ``(fd, temp path or "" when it has no name)``."""
        if self._anonymous:
            return os.open(self.tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, _OBJECT_MODE), ""
        temp = temp_name(self.tmpdir)
        return os.open(temp, _CREATE, _OBJECT_MODE), temp

    def publish(self, fd: int, temp: str, digest: Digest) -> None:
        """Make a finished upload visible as ``digest``; an intact existing object wins."""
        if not self.fsync:
            self._publish(fd, temp, digest)
            return
        os.fsync(fd)
        named, made_folder = self._publish(fd, temp, digest)
        # A new name is durable only once its folder is (and a new folder, once its parent is).
        if named:
            fsync_dir(os.path.dirname(self.object_path(digest)))
        if made_folder:
            fsync_dir(self.objdir)

    def _publish(self, fd: int, temp: str, digest: Digest) -> tuple[bool, bool]:
        """Whether a new name was made for the object, and whether its fan-out folder was."""
        try:
            return self._link_into_place(fd, temp, digest)
        except (IsADirectoryError, NotADirectoryError) as exc:
            # A stray entry holds the object's place: it is not ours to remove.
            where = (
                layout.object_key(digest)
                if isinstance(exc, IsADirectoryError)
                else f"{layout.OBJECTS}/{digest.hash[:2]}"
            )
            what = "a directory" if isinstance(exc, IsADirectoryError) else "not a directory"
            raise CasframeError(
                f"cannot store blob {digest} in file://{self.root}: {where} is {what}, "
                "a stray entry in the object's place; move it away"
            ) from None

    def _link_into_place(self, fd: int, temp: str, digest: Digest) -> tuple[bool, bool]:
        if not temp:
            # The usual case, one call per new object: an unnamed file linked into place,
            # relative to objects/ (a shorter path walk); anything else takes the loop below.
            try:
                os.link(f"/proc/self/fd/{fd}", object_name(digest[0]),
                        src_dir_fd=self._tmpfd, dst_dir_fd=self._objfd)
                return True, False
            except (FileNotFoundError, FileExistsError):
                pass  # no fan-out folder yet, or an object in the way: the loop sees to it
        target = self.object_path(digest)
        made_folder = False
        for _ in range(3):
            try:
                if temp:
                    if self._keep_existing(target, digest):
                        os.unlink(temp)  # renaming over it would free an inode for nothing
                        return False, made_folder
                    os.rename(temp, target)
                else:
                    os.link(  # relative to objects/: a shorter path walk
                        f"/proc/self/fd/{fd}",
                        layout.object_name(digest.hash),
                        src_dir_fd=self._tmpfd,
                        dst_dir_fd=self._objfd,
                    )
                return True, made_folder
            except FileNotFoundError:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                made_folder = True
            except FileExistsError:
                if self._keep_existing(target, digest):
                    return False, made_folder
                # A damaged object (wrong size), or one this user may not freshen (another
                # user's, in a shared store), is in the way: put ours in its place, atomically.
                named = os.path.basename(temp_name(self.tmpdir))
                tmpfd = self._tmpfd  # by directory fds: linkat then follows /proc/self/fd
                os.link(f"/proc/self/fd/{fd}", named, src_dir_fd=tmpfd, dst_dir_fd=tmpfd)
                try:
                    os.rename(named, target, src_dir_fd=tmpfd)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(named, dir_fd=tmpfd)
                    raise
                return True, made_folder
        raise OSError(errno.EAGAIN, f"could not store object {digest} in {self.root}")

    @staticmethod
    def _keep_existing(path: str, digest: Digest) -> bool:
        """Whether an intact object is at ``path``; if so, freshen it and keep it.

        The touch renews prune's grace period for the writer that stored the blob again. An
        object pruned between the stat and the touch is not there, and one this user may not
        touch (read-only and another user's) is not freshened: ours is published instead.
        """
        try:
            if os.stat(path).st_size != digest.size:
                return False
            os.utime(path)
        except (FileNotFoundError, PermissionError):
            return False
        return True

    # -- primitives -------------------------------------------------------------------------

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        missing = set()
        stat_, objfd, regular = os.stat, self._objfd, stat.S_ISREG
        for digest in digests:
            hash_ = digest[0]
            try:
                st = stat_(object_name(hash_), dir_fd=objfd, follow_symlinks=False)
                if st.st_size == digest[1] and regular(st.st_mode):  # not a stray folder
                    continue
            except _NOT_AN_OBJECT:
                pass
            missing.add(digest)
        return missing

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        try:
            fd = os.open(self.object_path(digest), _READ)
        except _NOT_AN_OBJECT:  # absent, or a stray folder where the object would be
            raise self._not_found(digest) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a stray folder, FIFO or device: not the blob
            os.close(fd)
            raise self._not_found(digest)
        stream = open(fd, "rb")  # noqa: SIM115 - returned to caller
        size = st.st_size
        if size != digest.size:
            try:
                # Identity is (hash, size): an intact object of another size is not this blob.
                # (A 0-byte object under any hash but the empty one is damaged, never a blob.)
                function = self.digest_function
                if size and Digest.of_stream(stream, function) == Digest(digest.hash, size):
                    raise self._not_found(digest)
            finally:
                stream.close()
            raise CorruptBlobError(digest, f"stored object has {size} bytes")
        if offset:
            stream.seek(offset)
        return stream

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        return _LocalWriter(self, *self.open_temp())

    # -- fast paths ---------------------------------------------------------------------------

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        # Three system calls a blob, without a file object: batch reads of small blobs are
        # what a server answering BatchReadBlobs and a push of many small files spend on.
        for digest in digests:
            try:
                fd = os.open(object_name(digest.hash), _READ, dir_fd=self._objfd)
            except _NOT_AN_OBJECT:
                raise self._not_found(digest) from None
            try:
                wanted = digest.size + 1  # one byte more: is the object longer?
                if wanted > _CHECK_SIZE_ABOVE and os.fstat(fd).st_size != digest.size:
                    # os.read allocates what it is asked for: a damaged Directory naming a
                    # stored hash with a huge size must not ask for terabytes.
                    data = b""
                else:
                    data = os.read(fd, wanted)
                    while len(data) < wanted and (more := os.read(fd, wanted - len(data))):
                        data += more
            except IsADirectoryError:  # a stray folder where the object would be
                raise self._not_found(digest) from None
            finally:
                os.close(fd)
            if len(data) != digest.size:
                # Another size than the digest says: open_blob tells missing from corrupt.
                with self.open_blob(digest) as stream:
                    data = stream.read()
            yield digest, data

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        for digest, data in blobs:
            fd, temp = self.open_temp()
            try:
                written = os.write(fd, data)
                if written != len(data):
                    _write_all(fd, memoryview(data)[written:])
                self.publish(fd, temp, digest)
            except BaseException:
                if temp:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
                raise
            finally:
                os.close(fd)

    def freshen_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        # Touch first, then check: two system calls for a present blob, one for a missing one.
        missing = set()
        objfd = self._objfd
        utime, stat = os.utime, os.stat
        for digest in digests:
            hash_ = digest[0]
            path = f"{hash_[:2]}/{hash_[2:]}"  # object_name(), without a call per blob
            try:
                try:
                    utime(path, dir_fd=objfd)
                except FileNotFoundError:
                    raise
                except OSError:  # another user's object, a read-only store: see _freshen
                    self._freshen(utime, path, objfd, digest)
                if stat(path, dir_fd=objfd).st_size == digest[1]:
                    continue
            except FileNotFoundError:
                pass
            missing.add(digest)
        return missing

    def _freshen(
        self, utime: Callable[..., None], path: str, objfd: int, digest: Digest
    ) -> None:
        """Touch one object, or renew it when it is another user's.

        A store this process may not write at all (a read-only mount, a user without write
        access to ``tmp/``) keeps its times: asking which blobs are there is a read, and works.
        """
        try:
            try:
                utime(path, dir_fd=objfd)
            except PermissionError:
                self._renew(digest)
        except OSError as exc:
            if exc.errno not in CANNOT_WRITE:
                raise

    def _renew(self, digest: Digest) -> None:
        """Freshen an object this user may not touch, by putting a copy of it in its place.

        In a store shared by several users, objects are read-only and their owner's, so
        ``utime`` is refused (EPERM). A copy of this user's (made in the kernel, verified by
        size) renews prune's grace period just as well. Raises FileNotFoundError when the
        object is gone, and leaves a damaged one (wrong size) for the caller to find.
        """
        hash_ = digest.hash
        source = os.open(object_name(hash_), _READ, dir_fd=self._objfd)
        try:
            if os.fstat(source).st_size != digest.size:
                return
            try:
                upload, stored = self.begin_write_copy(source)
                stored.close()
            except UnsupportedOperationError:  # no copy in the kernel here: through user space
                upload = self.begin_write()
                try:
                    while chunk := os.read(source, _COPY_CHUNK):
                        upload.write(chunk)
                except BaseException:
                    upload.abort()
                    raise
            try:
                upload.commit(digest)  # publish replaces an object it may not freshen
            except BaseException:
                upload.abort()
                raise
        finally:
            os.close(source)

    def begin_write_copy(self, fd: int) -> tuple[BlobWriter, BinaryIO]:
        """Copy by ``copy_file_range`` into a new temp object (in the kernel, no user copy):
        the first window here, the rest on a thread while the core hashes what is there
        (:mod:`._copy`)."""
        start = os.lseek(fd, 0, os.SEEK_CUR)
        temp_fd, temp = self.open_temp()
        copy = None
        try:
            reserved = _preallocate(temp_fd, os.fstat(fd).st_size - start)
            copy = KernelCopy(fd, start, temp_fd, reserved, self.describe())
            copy.begin()
            stored = CopiedStream(os.dup(temp_fd), copy)
        except BaseException:
            _LocalWriter(self, temp_fd, temp, copy).abort()
            raise
        return _LocalWriter(self, temp_fd, temp, copy), cast(BinaryIO, stored)

    # -- capabilities ------------------------------------------------------------------------

    def local_path(self, digest: Digest) -> str:
        path = self.object_path(digest)
        try:
            st = os.stat(path, follow_symlinks=False)
        except _NOT_AN_OBJECT:
            raise self._not_found(digest) from None
        if not stat.S_ISREG(st.st_mode):  # a stray folder or link: not the blob
            raise self._not_found(digest)
        size = st.st_size
        if size != digest.size:
            raise CorruptBlobError(digest, f"stored object has {size} bytes")
        return path

    def link_blobs(self, dir_fd: int, links: Iterable[tuple[str, Digest]]) -> None:
        # Paths relative to the objects folder and the destination folder: no walk down the
        # store's absolute path twice per link. The size check stays (a truncated object is
        # refused, as local_path refuses it); it costs a fraction of the link.
        objfd = self._objfd
        stat_, link, regular = os.stat, os.link, stat.S_ISREG
        for name, digest in links:
            hash_ = digest[0]
            rel = f"{hash_[:2]}/{hash_[2:]}"  # object_name(hash_), without a call per file
            try:
                st = stat_(rel, dir_fd=objfd, follow_symlinks=False)
            except _NOT_AN_OBJECT:
                raise self._not_found(digest) from None
            if not regular(st.st_mode):  # a stray folder, link or FIFO: not the blob
                raise self._not_found(digest)
            size = st.st_size
            if size != digest[1]:
                raise CorruptBlobError(digest, f"stored object has {size} bytes")
            link(rel, name, src_dir_fd=objfd, dst_dir_fd=dir_fd, follow_symlinks=False)

    def touch_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        absent = []
        utime = os.utime
        objfd = self._objfd
        for digest in digests:
            try:
                self._freshen(utime, object_name(digest.hash), objfd, digest)
            except FileNotFoundError:
                absent.append(digest)
        return absent
