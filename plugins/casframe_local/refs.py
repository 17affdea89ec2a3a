"""The ``file://`` backend's ref store, :class:`LocalRefStore`: one file per ref under
``refs/heads``, replaced atomically, its mtime the ref's last access."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from casframe import (
    Digest,
    RefCapability,
    RefConflictError,
    RefInfo,
    RefNotFoundError,
    RefStore,
    layout,
)

from ._files import CANNOT_WRITE, fsync_dir, make_folders, temp_name

__all__ = ["LocalRefStore"]


class LocalRefStore(RefStore):
    capabilities = frozenset({RefCapability.LIST, RefCapability.DELETE})

    def __init__(self, root: str, *, fsync: bool = False) -> None:
        self.root = root
        self.refdir = os.path.join(root, layout.REFS)
        self.tmpdir = os.path.join(root, layout.TMP)
        self.fsync = fsync
        make_folders(self.refdir, self.tmpdir)

    def _path(self, name: str) -> str:
        return os.path.join(self.refdir, *name.split("/"))

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise RefNotFoundError(name, f"file://{self.root}") from None
        if touch:
            try:
                os.utime(path)
            except FileNotFoundError:
                pass  # deleted since it was read: that reading was the access
            except OSError as exc:
                # A read-only mount, or another user's ref: reading still works, and only the
                # LRU order misses this use.
                if exc.errno not in CANNOT_WRITE:
                    raise
        return self._parse(name, data)

    def _parse(self, name: str, data: bytes) -> Digest:
        return layout.decode_ref(data, name, f"file://{self.root}")

    def conflicting_ref(self, name: str) -> str | None:
        # A few stats: is one of the name's folders a file, or is the name a folder with a
        # ref somewhere below it?
        segments = name.split("/")
        path = self.refdir
        for end, segment in enumerate(segments[:-1], 1):
            path = os.path.join(path, segment)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return "/".join(segments[:end])
            except FileNotFoundError:
                return None  # no such folder: nothing can be below the name either
        return self._first_ref_under(name)

    def _first_ref_under(self, name: str) -> str | None:
        top = self._path(name)
        for dirpath, _, filenames in os.walk(top):
            if filenames:
                rel = os.path.relpath(os.path.join(dirpath, filenames[0]), self.refdir)
                return rel.replace(os.sep, "/")
        return None

    def set_ref(self, name: str, digest: Digest) -> None:
        path = self._path(name)
        temp = temp_name(self.tmpdir)
        try:
            self._write_temp(temp, digest)
            self._rename_into_place(name, temp, path)
        except BaseException:
            # A full disk, a conflict, an interrupt: the temp file never outlives the call.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def _write_temp(self, temp: str, digest: Digest) -> None:
        with open(temp, "wb") as f:
            f.write(layout.encode_ref(digest))
            f.flush()  # a full disk fails here, inside the with, not in a close at exit
            if self.fsync:
                os.fsync(f.fileno())

    def _rename_into_place(self, name: str, temp: str, path: str) -> None:
        for _ in range(10):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rename(temp, path)
                if self.fsync:  # the ref's folder and those above it, which may be new
                    folder = os.path.dirname(path)
                    while True:
                        fsync_dir(folder)
                        if folder == self.refdir:
                            break
                        folder = os.path.dirname(folder)
                return
            except FileNotFoundError:
                continue  # a concurrent delete removed the parent folder; make it again
            except (NotADirectoryError, FileExistsError, IsADirectoryError):
                # Set concurrently with the core's check, or a folder left empty by a
                # concurrent delete: name the ref in the way, or clear the empty folder.
                existing = self.conflicting_ref(name)
                if existing is not None:
                    raise RefConflictError(name, existing) from None
                self._remove_empty_folders(path)
        raise OSError(errno.EAGAIN, f"could not set ref {name!r}: its folder kept changing")

    def _remove_empty_folders(self, top: str) -> None:
        if not os.path.isdir(top) or os.path.islink(top):
            return
        for dirpath, _, _ in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):  # not empty (a ref set meanwhile), or gone
                os.rmdir(dirpath)

    def delete_ref(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise RefNotFoundError(name, f"file://{self.root}") from None
        # Remove folders the deletion emptied, up to refs/heads itself.
        parent = os.path.dirname(path)
        while parent != self.refdir:
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        for dirpath, _, filenames in os.walk(self.refdir):
            rel = os.path.relpath(dirpath, self.refdir)
            for filename in filenames:
                name = filename if rel == "." else f"{rel}/{filename}".replace(os.sep, "/")
                if not name.startswith(prefix):
                    continue
                path = os.path.join(dirpath, filename)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                    accessed = os.stat(path).st_mtime
                except FileNotFoundError:
                    continue  # deleted meanwhile
                # A damaged ref (an empty file after a power cut, say) is an error, not
                # skipped: a prune that did not see it would delete the tree it holds.
                yield RefInfo(name, self._parse(name, data), accessed)
