"""Checks of what a REAPI server answers, before the ``grpc://`` backend uses any of it.

The server is a remote end like any other: it may be buggy, out of date or hostile. Content is
verified by the core; this module checks the rest of an answer against the request it answers
and against the client's limits — entries nobody asked for, the same entry twice, sizes that
cannot be, page tokens that lead in circles or never end — and raises
:class:`~casframe.RemoteProtocolError` naming the server and what it did. It never retries and
never calls the server itself.
"""

from __future__ import annotations

import hashlib

from casframe import Digest, InvalidDigestError, RemoteProtocolError
from casframe.reapi import remote_execution as reapi

__all__ = [
    "TreeListing",
    "answered_entry",
    "answered_missing",
    "answered_ref_digest",
    "check_capabilities",
]

# GetTree pages without a Directory that one listing may bring: a server has no reason to send
# one but the last (an empty tree), so a few are tolerated and more are a server paging forever.
EMPTY_TREE_PAGES = 8


def check_capabilities(where: str, capabilities: reapi.ServerCapabilities) -> None:
    """Refuse capabilities whose sizes cannot be (a negative batch or blob limit)."""
    cache = capabilities.cache_capabilities
    for field in ("max_batch_total_size_bytes", "max_cas_blob_size_bytes"):
        value = getattr(cache, field)
        if value < 0:
            raise RemoteProtocolError(
                f"{where} answered GetCapabilities with {field} = {value}; a size "
                "cannot be negative"
            )


def answered_missing(
    where: str, response: reapi.FindMissingBlobsResponse, asked: list[Digest]
) -> set[tuple[str, int]]:
    """The digests a FindMissingBlobs answer to ``asked`` names, each one asked for."""
    answered = response.missing_blob_digests
    if len(answered) > len(asked):
        raise RemoteProtocolError(
            f"{where} answered FindMissingBlobs of {len(asked)} digests with "
            f"{len(answered)} missing ones"
        )
    keys = {(d.hash, d.size_bytes) for d in answered}
    unasked = keys - set(asked)
    if unasked:
        hash_, size = min(unasked)
        raise RemoteProtocolError(
            f"{where} answered FindMissingBlobs with {hash_}/{size}, which was not asked for"
        )
    return keys


def answered_entry(
    where: str,
    call: str,
    answered: reapi.Digest,
    wanted: dict[tuple[str, int], Digest],
    seen: set[Digest],
) -> Digest:
    """The requested digest a batch reply entry answers for, added to ``seen``; an entry for a
    digest not requested, or a second one for the same digest, is the server's error."""
    digest = wanted.get((answered.hash, answered.size_bytes))
    if digest is None:
        raise RemoteProtocolError(
            f"{where} answered {call} with {answered.hash}/{answered.size_bytes}, "
            "which was not asked for"
        )
    if digest in seen:
        raise RemoteProtocolError(f"{where} answered {call} for {digest} more than once")
    seen.add(digest)
    return digest


def answered_ref_digest(where: str, call: str, name: str, message: reapi.Digest) -> Digest:
    """The digest a server gave for ref ``name``; an invalid one is the server's error."""
    try:
        return Digest.from_proto(message)
    except InvalidDigestError as exc:
        raise RemoteProtocolError(
            f"{where} answered {call} of ref {name} with an invalid digest: {exc}"
        ) from None


class TreeListing:
    """What one GetTree listing has brought so far, against the client's limits.

    :meth:`count` is called with each page before any of it is used; it raises when the
    listing repeats a page token, brings more than :data:`EMPTY_TREE_PAGES` empty pages, or
    more Directories or bytes than allowed, so a server paging forever is stopped within the
    memory those limits allow.
    """

    def __init__(self, where: str, root: Digest, max_directories: int, max_bytes: int) -> None:
        self._where = where
        self._root = root
        self._max_directories = max_directories
        self._max_bytes = max_bytes
        self._tokens: set[bytes] = set()  # hashes of the tokens seen: a token may be large
        self._directories = 0
        self._bytes = 0
        self._empty_pages = 0

    def _refuse(self, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"{self._where} answered GetTree of {self._root} {what}")

    def count(self, page: reapi.GetTreeResponse) -> None:
        self._directories += len(page.directories)
        if self._directories > self._max_directories:
            raise self._refuse(
                f"with more than {self._max_directories} directories (get_tree_max_directories)"
            )
        self._bytes += page.ByteSize()
        if self._bytes > self._max_bytes:
            raise self._refuse(f"with more than {self._max_bytes} bytes (get_tree_max_bytes)")
        if not page.directories:
            self._empty_pages += 1
            if self._empty_pages > EMPTY_TREE_PAGES:
                raise self._refuse(f"with more than {EMPTY_TREE_PAGES} empty pages")
        if page.next_page_token:
            token = hashlib.sha256(page.next_page_token.encode()).digest()
            if token in self._tokens:
                raise self._refuse(f"with the page token {page.next_page_token[:64]!r} again")
            self._tokens.add(token)
