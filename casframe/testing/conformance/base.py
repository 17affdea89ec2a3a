"""What every conformance mixin shares: the fixtures, ``known_gaps``, capability checks and
the digest functions the suite runs under."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import pytest

from casframe import (
    SHA256,
    Capability,
    Digest,
    RefCapability,
    Store,
    open_store,
)

MakeTree = Callable[..., Path]

# The parameter each test of a suite with several ``digest_functions`` runs once per value of.
_FUNCTION_PARAMETER = "conformance_digest_function"


def digest_of(store: Store, data: bytes | bytearray | memoryview) -> Digest:
    """The digest of ``data`` under ``store``'s digest function."""
    return Digest.of_bytes(data, store.digest_function)


def digest_of_stream(store: Store, stream: BinaryIO) -> Digest:
    """The digest of the rest of ``stream`` under ``store``'s digest function."""
    return Digest.of_stream(stream, store.digest_function)


def empty_of(store: Store) -> Digest:
    """The empty blob's digest under ``store``'s digest function."""
    return Digest.empty(store.digest_function)


class ConformanceBase:
    """Fixtures and switches shared by every conformance mixin."""

    #: ``{"test_name": "reason"}`` for single tests expected to fail (strict xfail).
    known_gaps: ClassVar[Mapping[str, str]] = {}
    #: Seconds between distinguishable blob mtimes (S3's LastModified has one-second steps).
    mtime_resolution: ClassVar[float] = 0.0
    #: The digest functions every test runs under, each on the store the ``store`` fixture
    #: returns opened with it (``Store.with_digest_function``; ``second_store`` likewise).
    #: A backend that declares more than SHA-256 in ``BlobStore.digest_functions`` names one
    #: more here, such as ``("sha256", "blake3")``.
    digest_functions: ClassVar[tuple[str, ...]] = (SHA256.name,)

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

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run every test once per digest function of :attr:`digest_functions` (only when
        there are several: a suite of SHA-256 alone keeps its tests' names)."""
        if len(self.digest_functions) > 1:
            metafunc.parametrize(_FUNCTION_PARAMETER, self.digest_functions, indirect=True)

    @pytest.fixture
    def conformance_digest_function(self, request: pytest.FixtureRequest) -> str:
        """The digest function this test runs under."""
        return str(getattr(request, "param", SHA256.name))

    @pytest.fixture(autouse=True)
    def _casframe_digest_function(
        self, request: pytest.FixtureRequest, conformance_digest_function: str
    ) -> None:
        # Set up before the test's own arguments: the ``store`` (and ``second_store``) the
        # test receives are the backend's, opened with this test's function.
        if conformance_digest_function == SHA256.name:
            return
        funcargs = request.node.funcargs
        for name in ("store", "second_store"):
            if name in request.fixturenames:
                plain = request.getfixturevalue(name)
                funcargs[name] = plain.with_digest_function(conformance_digest_function)

    @pytest.fixture(autouse=True)
    def _casframe_known_gap(self, request: pytest.FixtureRequest) -> None:
        node = request.node
        function = getattr(getattr(node, "callspec", None), "params", {}).get(_FUNCTION_PARAMETER)
        if function is not None:
            # A known gap is the backend's whatever the function: named without it.
            node_name = node.name.replace(f"-{function}]", "]").replace(f"[{function}]", "")
        else:
            node_name = node.name
        reason = self.known_gaps.get(node_name)
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
