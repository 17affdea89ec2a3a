"""The ``memory://`` backend against the shipped conformance suite, as a plugin author runs it.

Also here: a backend with nothing but the primitives (every capability missing, of blobs and of
refs), and checks of the suite's own switches (``known_gaps``, and that it follows what a backend
declares).
"""

import io
import threading

import pytest

from casframe import BlobStore, BlobWriter, Digest, RefNotFoundError, RefStore, Store
from casframe.testing.conformance import StoreConformance

# The suite against memory:// as casframe ships it (pytest --pyargs casframe.testing.test_memory).
from casframe.testing.test_memory import TestMemoryStore  # noqa: F401

pytest_plugins = ["pytester"]

# -- a backend that has nothing but the primitives ----------------------------------------------


class _DictWriter(BlobWriter):
    def __init__(self, store):
        self._store = store
        self._buffer = io.BytesIO()

    def write(self, data):
        self._buffer.write(data)

    def commit(self, digest):
        with self._store.lock:
            self._store.blobs.setdefault(digest, self._buffer.getvalue())

    def abort(self):
        self._buffer = io.BytesIO()


class PrimitivesOnlyBlobStore(BlobStore):
    """The three abstract primitives and nothing else: every optional capability is missing."""

    def __init__(self):
        self.lock = threading.Lock()
        self.blobs: dict[Digest, bytes] = {}

    def find_missing_blobs(self, digests):
        with self.lock:
            return {d for d in digests if d not in self.blobs}

    def open_blob(self, digest, offset=0):
        with self.lock:
            data = self.blobs.get(digest)
        if data is None:
            raise self._not_found(digest)
        stream = io.BytesIO(data)
        stream.seek(offset)
        return stream

    def begin_write(self, size_hint=None):
        return _DictWriter(self)


class PrimitivesOnlyRefStore(RefStore):
    """``get_ref`` and ``set_ref`` and nothing else: it can neither list nor delete refs."""

    def __init__(self):
        self.refs: dict[str, Digest] = {}

    def get_ref(self, name, *, touch=True):
        try:
            return self.refs[name]
        except KeyError:
            raise RefNotFoundError(name, "primitives-only://") from None

    def set_ref(self, name, digest):
        self.refs[name] = digest


# Without a listing, the default conflicting_ref sees the refs named like a folder of a name,
# not those under it: a backend that cannot list overrides it, or its storage refuses in set_ref.
_UNSEEN_BELOW = "conflicting_ref cannot see refs under a name without listing them"


class TestPrimitivesOnlyBackend(StoreConformance):
    known_gaps = {
        "test_a_ref_never_shadows_another['a/b'-'a']": _UNSEEN_BELOW,
        "test_a_ref_never_shadows_another['x/y/z/w'-'x/y']": _UNSEEN_BELOW,
        "test_a_ref_never_shadows_another['x/y'-'x']": _UNSEEN_BELOW,
    }

    @pytest.fixture
    def store(self):
        return Store(PrimitivesOnlyBlobStore(), PrimitivesOnlyRefStore(), url="primitives-only://")


SIZE_BLIND_SUITE = '''
import pytest
from casframe import Store
from casframe.testing.conformance import BlobConformance
from casframe_memory.store import MemoryBlobStore, MemoryRefStore


class SizeBlindBlobStore(MemoryBlobStore):
    """Broken on purpose: a known hash counts as present whatever the size asked for."""

    def find_missing_blobs(self, digests):
        hashes = {d.hash for d in self.blobs}
        return {d for d in digests if d.hash not in hashes}


class TestSizeBlind(BlobConformance):
    known_gaps = %r

    @pytest.fixture
    def store(self):
        return Store(SizeBlindBlobStore(), MemoryRefStore())
'''


def test_known_gap_turns_one_failing_test_into_an_expected_failure(pytester):
    pytester.makepyfile(
        test_gap=SIZE_BLIND_SUITE % {"test_wrong_size_means_missing": "ignores sizes"}
    )
    result = pytester.runpytest("-k", "wrong_size_means_missing or round_trip", "-rxX")
    result.assert_outcomes(passed=4, xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*test_wrong_size_means_missing*known gap: ignores sizes*"])


def test_known_gap_is_strict_when_the_test_passes(pytester):
    pytester.makepyfile(
        test_gap=SIZE_BLIND_SUITE % {"test_put_bytes_round_trip[1]": "claimed, not real"}
    )
    result = pytester.runpytest("-k", "round_trip")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*XPASS(strict)*known gap: claimed, not real*"])


def test_a_failure_without_a_known_gap_fails(pytester):
    pytester.makepyfile(test_gap=SIZE_BLIND_SUITE % {})
    result = pytester.runpytest("-k", "wrong_size_means_missing")
    result.assert_outcomes(failed=1)


def test_known_gap_naming_no_test_is_an_error(pytester):
    pytester.makepyfile(test_gap=SIZE_BLIND_SUITE % {"test_no_such_thing": "typo"})
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*known_gaps names no test of the suite*test_no_such_thing*"])


UNDECLARED_SUITE = '''
import pytest
from casframe import Capability, Store
from casframe.testing.conformance import BlobConformance
from casframe_memory.store import MemoryBlobStore, MemoryRefStore


class ListsWithoutSayingSo(MemoryBlobStore):
    """Broken on purpose: it can touch blobs, but does not declare it."""

    capabilities = frozenset({Capability.LIST, Capability.DELETE})


class ClaimsLocalPaths(MemoryBlobStore):
    """Broken on purpose: it declares local paths it cannot give."""

    capabilities = MemoryBlobStore.capabilities | {Capability.LOCAL_PATH}


class TestUndeclared(BlobConformance):
    @pytest.fixture
    def store(self):
        return Store(ListsWithoutSayingSo(), MemoryRefStore())


class TestOverclaimed(BlobConformance):
    @pytest.fixture
    def store(self):
        return Store(ClaimsLocalPaths(), MemoryRefStore())
'''


def test_the_suite_holds_a_backend_to_what_it_declares(pytester):
    pytester.makepyfile(test_declared=UNDECLARED_SUITE)
    result = pytester.runpytest("-k", "capability_touch or capability_local_path", "-rf")
    # An undeclared capability that works, and a declared one that does not, both fail.
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "FAILED *TestUndeclared::test_capability_touch*",
        "FAILED *TestOverclaimed::test_capability_local_path*",
    ])
    out = result.stdout.str()
    assert "DID NOT RAISE UnsupportedOperationError" in out
    assert "cannot give local files: it does not declare the local-path capability" in out


def test_missing_capabilities_is_refused_naming_what_to_do(pytester):
    pytester.makepyfile(
        test_old=(SIZE_BLIND_SUITE % {}).replace(
            "known_gaps = {}", "missing_capabilities = frozenset({Capability.LOCAL_PATH})"
        ).replace("from casframe import Store", "from casframe import Capability, Store")
    )
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*TestSizeBlind.missing_capabilities is no longer read: the suite follows the "
        "capabilities the backend declares*delete the line*"
    ])
