"""The conformance suite against casframe's own ``memory://`` backend, shipped in the package
so that an installed casframe can check itself, without its source tree::

    pip install pytest
    python -m pytest --pyargs casframe.testing.test_memory

Also the smallest example of a backend's test module: one subclass and one fixture.
"""

from __future__ import annotations

import pytest

from casframe import Store
from casframe.testing.conformance import StoreConformance

__all__ = ["TestMemoryStore"]


class TestMemoryStore(StoreConformance):
    digest_functions = ("sha256", "blake3")

    @pytest.fixture
    def store(self, memory_store: Store) -> Store:
        return memory_store
