"""The module casframe loads through this package's entry point: it registers ``sqlite://``.

casframe imports it when it first needs its plugins (``casframe plugins``, the first
``open_store``) and calls :func:`casframe_register_backends` each time it resolves a URL. The
factory is given as a ``"module:attribute"`` string, so :mod:`casframe_sqlite.store` is imported
only when a ``sqlite://`` store is opened.
"""

from __future__ import annotations

from casframe import BackendRegistry, hookimpl

__all__ = ["casframe_register_backends"]


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    registry.add(
        "sqlite",
        "casframe_sqlite.store:open_sqlite_store",
        description="one SQLite database file holding blobs and refs",
    )
