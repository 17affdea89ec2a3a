"""The backend's limits (:class:`~casframe.BlobLimits`): well formed, and what the core holds
to when it drives the backend."""

from __future__ import annotations

import dataclasses

from casframe import BlobLimits, Capability, RefCapability, Store
from casframe.testing.conformance.base import ConformanceBase, digest_of


class LimitsConformance(ConformanceBase):
    """Declarations and limits: what the core goes by before it calls the backend."""

    def test_declarations_are_well_formed(self, store: Store) -> None:
        """What the suite (and the core) go by: capabilities of each part, and the limits."""
        blobs, refs = store.blobs.capabilities, store.refs.capabilities
        assert isinstance(blobs, frozenset) and all(isinstance(c, Capability) for c in blobs), (
            "BlobStore.capabilities must be a frozenset of casframe.Capability"
        )
        assert isinstance(refs, frozenset) and all(isinstance(c, RefCapability) for c in refs), (
            "RefStore.capabilities must be a frozenset of casframe.RefCapability"
        )
        for capability in (*Capability, *RefCapability):
            declared = capability in (refs if isinstance(capability, RefCapability) else blobs)
            assert store.has(capability) == declared
        assert isinstance(store.blobs.limits, BlobLimits), "BlobStore.limits is a BlobLimits"

    def test_find_missing_is_split_to_max_batch_digests(self, store: Store) -> None:
        """The core never passes more digests to one call than ``max_batch_digests``."""
        stored = [store.put_bytes(b"batched %d" % i) for i in range(10)]
        absent = [digest_of(store, b"absent %d" % i) for i in range(15)]
        blobs = store.blobs
        shadowed = dict(vars(blobs))
        limits, find_missing_blobs = blobs.limits, blobs.find_missing_blobs
        sizes: list[int] = []

        def counted(digests):
            sizes.append(len(digests))
            return find_missing_blobs(digests)

        blobs.limits = dataclasses.replace(limits, max_batch_digests=7)
        blobs.find_missing_blobs = counted  # type: ignore[method-assign]
        try:
            assert store.find_missing(stored + absent) == set(absent)
        finally:
            for name in ("limits", "find_missing_blobs"):
                if name in shadowed:
                    setattr(blobs, name, shadowed[name])
                else:
                    delattr(blobs, name)
        assert sorted(sizes) == [4, 7, 7, 7]
        assert blobs.limits == limits
