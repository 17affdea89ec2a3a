"""What every conformance mixin shares: the fixtures, ``known_gaps`` and capability checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from casframe import (
    Capability,
    Digest,
    RefCapability,
    Store,
    open_store,
)

MakeTree = Callable[..., Path]


class ConformanceBase:
    """Fixtures and switches shared by every conformance mixin."""

    #: ``{"test_name": "reason"}`` for single tests expected to fail (strict xfail).
    known_gaps: ClassVar[Mapping[str, str]] = {}
    #: Seconds between distinguishable blob mtimes (S3's LastModified has one-second steps).
    mtime_resolution: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(
            name for name in cls.known_gaps
            if not name.startswith("test_") or not callable(getattr(cls, name.split("[")[0], None))
        )
        if unknown:
            raise TypeError(f"{cls.__name__}.known_gaps names no test of the suite: {unknown}")
        if "missing_capabilities" in vars(cls):
            raise TypeError(
                f"{cls.__name__}.missing_capabilities is no longer read: the suite follows the "
                "capabilities the backend declares (BlobStore.capabilities and "
                "RefStore.capabilities); delete the line"
            )

    @pytest.fixture
    def store(self) -> Store:
        """The backend under test: override to return a fresh, empty store."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a `store` fixture returning a fresh, empty Store"
        )

    @pytest.fixture
    def second_store(self) -> Iterator[Store]:
        """Another store, the peer of transfer tests (default: a fresh ``memory://``)."""
        other = open_store("memory://")
        try:
            yield other
        finally:
            other.close()

    @pytest.fixture(autouse=True)
    def _casframe_known_gap(self, request: pytest.FixtureRequest) -> None:
        node = request.node
        reason = self.known_gaps.get(node.name)
        if reason is None:
            reason = self.known_gaps.get(getattr(node, "originalname", node.name))
        if reason is not None:
            request.applymarker(pytest.mark.xfail(reason=f"known gap: {reason}", strict=True))

    def lacks(self, store: Store, capability: Capability | RefCapability) -> bool:
        """Whether ``store``'s backend does not declare ``capability``."""
        return not store.has(capability)

    def corrupt_blob(self, store: Store, digest: Digest, data: bytes) -> None:
        """Replace what ``store`` holds for ``digest`` with ``data``, behind its back.

        The default writes over the local file (capability ``local-path``) or replaces the
        bytes in a ``blobs`` dict (``memory://``). Override it for other backends; if yours
        cannot do it, list the corruption tests in ``known_gaps``.
        """
        if store.has(Capability.LOCAL_PATH):
            path = store.blobs.local_path(digest)
            os.chmod(path, 0o644)
            with open(path, "wb") as f:
                f.write(data)
            return
        table = getattr(store.blobs, "blobs", None)
        if isinstance(table, dict) and digest in table:
            old = table[digest]
            table[digest] = (data, *old[1:]) if isinstance(old, tuple) else data
            return
        raise NotImplementedError(
            f"cannot corrupt a blob of {store.url}: override corrupt_blob(store, digest, data) "
            f"in {type(self).__name__} or list this test in known_gaps"
        )
