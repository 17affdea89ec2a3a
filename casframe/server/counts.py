"""What the services count of a call's content, as they learn it: blobs stored and served and
their bytes, FindMissingBlobs' present and missing digests, GetActionResult's hits and misses.

A service holds these numbers as Python ints at the point it knows them (how many entries of a
batch it answered with OK, the digest of the Write it just committed), so it hands them to a
:class:`ContentCounts` the server gives it rather than leaving a call sink to read them back
from the call's messages. :data:`NO_COUNTS` is the shared do-nothing one of a server without
metrics; :class:`casframe.server.metrics.ServerMetrics` offers the counting one as its
``content_counts``. A service counts before its answer leaves, and only what succeeded, so a
client that has its answer finds it counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["NO_COUNTS", "ContentCounts", "content_counts_of"]


class ContentCounts:
    """The counts a service reports (each method may be called from any thread). This base
    counts nothing: :data:`NO_COUNTS`."""

    def blobs_stored(self, count: int, size: int) -> None:
        """``count`` blobs of ``size`` bytes in all were uploaded and accepted (including ones
        the store already held)."""

    def blobs_served(self, count: int, size: int) -> None:
        """``count`` blobs of ``size`` bytes in all were sent to a client."""

    def digests_found(self, asked: int, missing: int) -> None:
        """A FindMissingBlobs call asked about ``asked`` digests, ``missing`` of them not
        stored."""

    def action_lookup(self, hit: bool) -> None:
        """A GetActionResult call found its result (``hit``) or answered NOT_FOUND."""


#: The counts of a server without metrics: one call of an empty method per count.
NO_COUNTS = ContentCounts()


def content_counts_of(sinks: Iterable[Any]) -> ContentCounts:
    """The counts of the first call sink that offers ``content_counts`` (the metrics), else
    :data:`NO_COUNTS`."""
    for sink in sinks:
        counts = getattr(sink, "content_counts", None)
        if isinstance(counts, ContentCounts):
            return counts
    return NO_COUNTS
