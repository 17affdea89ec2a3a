"""The ``file://`` backend against the shipped conformance suite, as a plugin author runs it."""

import pytest

from casframe.testing.conformance import StoreConformance


class TestLocalStore(StoreConformance):
    digest_functions = ("sha256", "blake3", "sha512")

    @pytest.fixture
    def store(self, local_store):
        return local_store
