"""The listing and maintenance side of the ``file://`` blob store: what ``fsck``, ``prune`` and
``clean-temp`` walk and remove (:class:`LocalBlobMaintenance`, the base of
:class:`casframe_local.blobs.LocalBlobStore`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator

from casframe import BlobInfo, BlobStore, Digest, StrayEntry, layout
from casframe.layout import is_fanout, is_object_file_name

__all__ = ["LocalBlobMaintenance"]


def _kind(path: str) -> str:
    """What a stray entry is, for fsck's warning."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "an entry removed meanwhile"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"



class LocalBlobMaintenance(BlobStore):
    """Listing, stray detection, deletion and temp cleaning over a store's folders."""

    root: str
    objdir: str
    tmpdir: str

    def object_path(self, digest: Digest) -> str:
        return os.path.join(self.root, layout.object_key(digest))

    def iter_blob_stats(
        self, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, int, float]]:
        for fanout in sorted(os.listdir(self.objdir)):
            if not is_fanout(fanout):
                continue
            try:
                scanner = os.scandir(os.path.join(self.objdir, fanout))
            except NotADirectoryError:
                continue  # a stray file named like a folder
            with scanner as entries:
                for entry in entries:
                    rest = entry.name
                    if not is_object_file_name(rest, self.digest_function.hex_length):
                        continue  # a stray file, not an object
                    hash_ = fanout + rest
                    if skip is not None and skip(hash_):
                        continue  # before the stat: that is the point of skip
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while listing
                    if not stat.S_ISREG(st.st_mode):
                        continue  # a folder or a link named like an object: a stray
                    # A 0-byte object under another hash than the empty blob's was emptied by
                    # a crash (written without fsync): listed, so fsck and prune deal with it.
                    yield hash_, st.st_size, st.st_mtime

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for hash_, size, mtime in self.iter_blob_stats():
            if size or hash_ == self.digest_function.empty_hash:  # an emptied object is no blob
                yield BlobInfo(Digest(hash_, size), mtime)

    def iter_strays(self) -> Iterator[StrayEntry]:
        for fanout in sorted(os.listdir(self.objdir)):
            folder = os.path.join(self.objdir, fanout)
            shaped = is_fanout(fanout)
            if not shaped or os.path.islink(folder) or not os.path.isdir(folder):
                yield StrayEntry(
                    f"{layout.OBJECTS}/{fanout}", f"{_kind(folder)}, not a fan-out folder"
                )
                continue
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    rest = entry.name
                    name = f"{layout.OBJECTS}/{fanout}/{rest}"
                    if not is_object_file_name(rest, self.digest_function.hex_length):
                        yield StrayEntry(name, f"{_kind(entry.path)} whose name is not a hash")
                    elif not entry.is_file(follow_symlinks=False):
                        yield StrayEntry(name, f"{_kind(entry.path)}, not an object")

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> list[Digest]:
        deleted = []
        for digest in digests:
            path = self.object_path(digest)
            try:
                # The stat-to-unlink window is microseconds, where prune's listing-to-delete
                # window would be the whole run.
                if older_than is not None and os.stat(path).st_mtime >= older_than:
                    continue  # touched or stored again since it was listed
                os.unlink(path)
                deleted.append(digest)
            except FileNotFoundError:
                pass
        return deleted

    def clean_temp(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove files in ``tmp/`` last modified before ``older_than``.

        Left there by writers killed between creating and renaming them: ref updates, and
        uploads where the file system lacks ``O_TMPFILE``. A live writer's file is modified at
        every chunk it writes, so it stays younger than any sensible grace period.
        """
        count = size = 0
        with os.scandir(self.tmpdir) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if st.st_mtime >= older_than:
                        continue
                    if not dry_run:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # committed or aborted meanwhile
                count += 1
                size += st.st_size
        return count, size
