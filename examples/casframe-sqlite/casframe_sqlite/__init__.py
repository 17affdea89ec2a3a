"""casframe-sqlite: a casframe backend keeping a whole store in one SQLite database file.

Installing this package registers the ``sqlite://`` URL scheme with casframe through the
``casframe`` entry-point group (:mod:`casframe_sqlite.plugin`); the backend itself is
:mod:`casframe_sqlite.store`. Nothing is imported here, so that casframe listing its plugins
does not load the backend.
"""

__version__ = "0.1.0"
