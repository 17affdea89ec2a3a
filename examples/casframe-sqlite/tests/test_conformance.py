"""The ``sqlite://`` backend against casframe's shipped conformance suite."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
from casframe import Digest, Store
from casframe.testing.conformance import StoreConformance

from casframe_sqlite.store import SQLiteBlobStore


class TestSQLiteStore(StoreConformance):
    digest_functions = ("sha256", "blake3")  # the second in a database file of its own

    @pytest.fixture
    def store(self, sqlite_store: Store) -> Store:
        return sqlite_store

    def corrupt_blob(self, store: Store, digest: Digest, data: bytes) -> None:
        """Replace the blob's stored chunks with ``data``, through a connection of our own."""
        assert isinstance(store.blobs, SQLiteBlobStore)
        with closing(sqlite3.connect(store.blobs.db.path)) as conn, conn:
            (blob_id,) = conn.execute(
                "SELECT id FROM blobs WHERE hash = ? AND size = ?", (digest.hash, digest.size)
            ).fetchone()
            conn.execute("DELETE FROM chunks WHERE blob_id = ?", (blob_id,))
            conn.execute(
                "INSERT INTO chunks (blob_id, start, data) VALUES (?, 0, ?)", (blob_id, data)
            )
