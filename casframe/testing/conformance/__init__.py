"""The backend conformance suite: what every casframe store must do, as pytest classes.

A backend's test module subclasses :class:`StoreConformance` and provides a ``store`` fixture
returning a fresh, empty :class:`~casframe.Store`::

    from casframe.testing.conformance import StoreConformance

    class TestMyBackend(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            return open_store(...)

What the suite runs follows what the backend declares: a test that needs a capability the
store's ``blobs.capabilities`` (:class:`~casframe.Capability`) or ``refs.capabilities``
(:class:`~casframe.RefCapability`) lacks checks instead that using it fails with
:class:`~casframe.UnsupportedOperationError` and a message, and the tests of each capability check
that a declared one works and an undeclared one refuses, so the declaration cannot drift from the
code. A class attribute marks what is left, the backend's genuine gaps:

``known_gaps``
    ``{"test_name": "reason"}``: that single test must fail (a strict xfail), so the gap is
    documented and the suite says so the day it is fixed. A key may name one parametrized case
    (``"test_x[case]"``) or all of them (``"test_x"``).

Override :meth:`ConformanceBase.corrupt_blob` when the default cannot damage a blob stored in
your backend, and the ``second_store`` fixture to transfer to something other than a fresh
``memory://`` store. Set ``mtime_resolution`` to the step of the backend's timestamps (seconds)
so that grace-period tests wait long enough. The mixins, one module each
(:class:`LimitsConformance`, :class:`BlobConformance` with :class:`CapabilityConformance`,
:class:`RefConformance`, :class:`TreeConformance`, :class:`TransferConformance`,
:class:`MaintenanceConformance`), can also be used one by one.
"""

from __future__ import annotations

from casframe.testing.conformance.base import ConformanceBase
from casframe.testing.conformance.blobs import BlobConformance
from casframe.testing.conformance.capabilities import CapabilityConformance
from casframe.testing.conformance.limits import LimitsConformance
from casframe.testing.conformance.maintenance import MaintenanceConformance
from casframe.testing.conformance.refs import RefConformance
from casframe.testing.conformance.transfer import TransferConformance
from casframe.testing.conformance.trees import TreeConformance

__all__ = [
    "BlobConformance",
    "CapabilityConformance",
    "ConformanceBase",
    "LimitsConformance",
    "MaintenanceConformance",
    "RefConformance",
    "StoreConformance",
    "TransferConformance",
    "TreeConformance",
]


class StoreConformance(
    LimitsConformance,
    BlobConformance,
    RefConformance,
    TreeConformance,
    TransferConformance,
    MaintenanceConformance,
):
    """Everything a casframe store must do. Subclass it once per backend."""
