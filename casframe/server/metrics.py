"""Prometheus metrics of a casframe server, with ``prometheus_client``.

:class:`ServerMetrics` is a call sink (:mod:`casframe.server.observe`): it counts every call
under the names go-grpc-prometheus made the convention (``grpc_server_handled_total`` and
friends, which Grafana dashboards for Buildbarn and bazel-remote already chart), and casframe's
own: bytes in and out, blobs and bytes stored and served, the hit counts of FindMissingBlobs
and GetActionResult, streams in flight and, over a ``cache://`` store, its local hits and
misses. :func:`serve_metrics` exposes them over HTTP for Prometheus to scrape.

Several server processes add up: when ``PROMETHEUS_MULTIPROC_DIR`` was set before this module
was first imported, prometheus_client keeps each process's values in files there and the
exposition sums them (``casframe serve`` sets it up; see :func:`multiprocess_dir`).

Imported only by the server when metrics are asked for: ``casframe --help`` and other
commands never load prometheus_client. This module must never expose a server path, a store
URL or anything a client sent as a label: labels take only method names, status codes and
fixed words, so a hostile client cannot grow the number of series.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import start_http_server

from casframe.errors import ConfigError
from casframe.server.interceptors import UNCOUNTED_STREAMS
from casframe.server.names import parse_write_resource
from casframe.server.observe import CallRecord
from casframe.store import Store

__all__ = [
    "LATENCY_BUCKETS",
    "ServerMetrics",
    "exposition_registry",
    "multiprocess_dir",
    "process_exited",
    "serve_metrics",
]

#: Upper bounds (seconds) of the latency histogram's buckets: from a FindMissingBlobs answered
#: from memory (~1 ms) to a multi-GiB ByteStream transfer (minutes).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_FIND_MISSING = _CAS + "FindMissingBlobs"
_BATCH_UPDATE = _CAS + "BatchUpdateBlobs"
_BATCH_READ = _CAS + "BatchReadBlobs"
_GET_ACTION_RESULT = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult"
_READ = "/google.bytestream.ByteStream/Read"
_WRITE = "/google.bytestream.ByteStream/Write"

_OK = grpc.StatusCode.OK
_NOT_FOUND = grpc.StatusCode.NOT_FOUND


def multiprocess_dir() -> str | None:
    """The directory where this process's values are kept for other processes to add up, or
    None when prometheus_client counts in this process's memory alone (it decides once, when
    first imported, from ``PROMETHEUS_MULTIPROC_DIR``)."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def process_exited(pid: int) -> None:
    """Drop the in-flight gauges of a server process that ended (its counters still count):
    called by whoever started it, and by a server for itself as it stops."""
    folder = multiprocess_dir()
    if folder is not None:
        multiprocess.mark_process_dead(pid, folder)


def _grpc_type(call: CallRecord) -> str:
    if call.request_streaming:
        return "bidi_stream" if call.response_streaming else "client_stream"
    return "server_stream" if call.response_streaming else "unary"


class _MethodSeries:
    """The series of one method, bound once (``labels()`` on every call costs a lock and a
    dictionary look-up per metric)."""

    def __init__(self, metrics: ServerMetrics, call: CallRecord) -> None:
        kind, service, name = _grpc_type(call), call.service, call.name
        self.labels = (kind, service, name)
        self.started = metrics.started.labels(kind, service, name)
        self.seconds = metrics.handling_seconds.labels(kind, service, name)
        self.bytes_received = metrics.bytes_received.labels(service, name)
        self.bytes_sent = metrics.bytes_sent.labels(service, name)
        self._handled = metrics.handled
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self.labels, code.name)
        return child


class ServerMetrics:
    """The metrics of one server process, registered in ``registry`` (a fresh one by
    default). ``store`` is the served store: over a ``cache://`` store, its hit counts are
    followed as calls end."""

    def __init__(self, store: Store | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        method = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", method, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, whatever their status.",
            [*method, "grpc_code"], registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the call's start to its answer being handed to gRPC.",
            method, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.bytes_received = Counter(
            "casframe_server_received_bytes", "Serialized bytes of request messages received.",
            ["grpc_service", "grpc_method"], registry=registry,
        )
        self.bytes_sent = Counter(
            "casframe_server_sent_bytes", "Serialized bytes of response messages sent.",
            ["grpc_service", "grpc_method"], registry=registry,
        )
        self.streams_in_flight = Gauge(
            "casframe_server_streams_in_flight",
            "Streaming calls in progress (ByteStream Read and Write, GetTree).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.blobs_stored = Counter(
            "casframe_cas_blobs_stored",
            "Blobs uploaded and accepted (BatchUpdateBlobs entries, completed ByteStream "
            "Writes), including ones the store already held.", registry=registry,
        )
        self.bytes_stored = Counter(
            "casframe_cas_stored_bytes", "Bytes of the blobs counted in "
            "casframe_cas_blobs_stored_total.", registry=registry,
        )
        self.blobs_served = Counter(
            "casframe_cas_blobs_served",
            "Blobs sent to clients (BatchReadBlobs entries, completed ByteStream Reads).",
            registry=registry,
        )
        self.bytes_served = Counter(
            "casframe_cas_served_bytes", "Blob bytes sent to clients.", registry=registry
        )
        self.find_missing = Counter(
            "casframe_cas_find_missing_digests",
            "Digests asked about in FindMissingBlobs, by result (present or missing).",
            ["result"], registry=registry,
        )
        self.action_cache = Counter(
            "casframe_action_cache_lookups",
            "GetActionResult calls by result: hit (OK) or miss (NOT_FOUND).",
            ["result"], registry=registry,
        )
        self.cache_reads = Counter(
            "casframe_cache_reads",
            "Blob reads of a cache:// store by result: hit (served by its local store) or "
            "miss (fetched from its remote).", ["result"], registry=registry,
        )
        self.cache_filled_bytes = Counter(
            "casframe_cache_filled_bytes",
            "Bytes a cache:// store copied from its remote into its local store.",
            registry=registry,
        )
        self._present = self.find_missing.labels("present")
        self._missing = self.find_missing.labels("missing")
        self._hits = self.action_cache.labels("hit")
        self._misses = self.action_cache.labels("miss")
        self._methods: dict[str, _MethodSeries] = {}
        self._cache = _CacheFollower(store, self) if store is not None else None

    def _series(self, call: CallRecord) -> _MethodSeries:
        series = self._methods.get(call.method)
        if series is None:
            series = self._methods[call.method] = _MethodSeries(self, call)
        return series

    # -- CallSink --------------------------------------------------------------------------

    def enabled(self) -> bool:
        return True

    def call_started(self, call: CallRecord) -> None:
        self._series(call).started.inc()
        if call.streaming and call.method not in UNCOUNTED_STREAMS:
            self.streams_in_flight.inc()

    def call_ended(self, call: CallRecord) -> None:
        assert call.code is not None
        series = self._series(call)
        series.handled(call.code).inc()
        series.seconds.observe(call.duration)
        if call.bytes_in:
            series.bytes_received.inc(call.bytes_in)
        if call.bytes_out:
            series.bytes_sent.inc(call.bytes_out)
        if call.streaming and call.method not in UNCOUNTED_STREAMS:
            self.streams_in_flight.dec()
        self._count_content(call)
        if self._cache is not None:
            self._cache.follow()

    def _count_content(self, call: CallRecord) -> None:
        """The counters that need to look into a call's messages."""
        method, code = call.method, call.code
        if method == _GET_ACTION_RESULT:
            if code == _OK:
                self._hits.inc()
            elif code == _NOT_FOUND:
                self._misses.inc()
            return
        if code != _OK:
            return
        if method == _FIND_MISSING:
            asked = len(call.request.blob_digests)
            missing = len(call.response.missing_blob_digests)
            self._present.inc(asked - missing)
            self._missing.inc(missing)
        elif method == _READ:
            self.blobs_served.inc()
            self.bytes_served.inc(call.raw_bytes_out)
        elif method == _WRITE:
            size = parse_write_resource(call.request.resource_name).digest.size
            if call.response.committed_size == size:  # not a half-closed, resumable stream
                self.blobs_stored.inc()
                self.bytes_stored.inc(size)
        elif method in (_BATCH_UPDATE, _BATCH_READ):
            count = size = 0
            for entry in call.response.responses:
                if not entry.status.code:
                    count += 1
                    size += entry.digest.size_bytes  # verified: the blob's own size
            if method == _BATCH_UPDATE:
                self.blobs_stored.inc(count)
                self.bytes_stored.inc(size)
            else:
                self.blobs_served.inc(count)
                self.bytes_served.inc(size)


class _CacheFollower:
    """Carries a ``cache://`` store's own counts (``CacheBlobStore.stats``) into the cache
    counters as calls end: counters that add up across processes, unlike a collector that
    reads one process's store at scrape time."""

    def __init__(self, store: Store, metrics: ServerMetrics) -> None:
        self._blobs = store.blobs
        self._hits = metrics.cache_reads.labels("hit")
        self._misses = metrics.cache_reads.labels("miss")
        self._filled = metrics.cache_filled_bytes
        self._lock = threading.Lock()
        self._seen = (0, 0, 0)
        self.active = self._counts() is not None

    def _counts(self) -> tuple[int, int, int] | None:
        stats = getattr(self._blobs, "stats", None)
        try:
            return (int(stats.hits), int(stats.misses), int(stats.bytes_filled))  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            return None

    def follow(self) -> None:
        if not self.active:
            return
        counts = self._counts()
        if counts is None:
            return
        with self._lock:
            hits, misses, filled = (a - b for a, b in zip(counts, self._seen, strict=True))
            self._seen = counts
        if hits > 0:
            self._hits.inc(hits)
        if misses > 0:
            self._misses.inc(misses)
        if filled > 0:
            self._filled.inc(filled)


def exposition_registry(metrics: ServerMetrics | None = None) -> CollectorRegistry:
    """What a scrape shows: with several processes, the sum of all of them (read from
    :func:`multiprocess_dir`), else ``metrics``' own registry."""
    if multiprocess_dir() is None:
        if metrics is None:
            raise ConfigError("metrics of other processes need PROMETHEUS_MULTIPROC_DIR")
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


@contextlib.contextmanager
def serve_metrics(listen: str, metrics: ServerMetrics | None = None) -> Iterator[str]:
    """Serve ``/metrics`` over HTTP on ``listen`` (``HOST:PORT``, port 0 picks a free one)
    while the block runs; yields the URL to scrape."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        raise ConfigError(f"metrics need a HOST:PORT to listen on, not {listen!r}")
    try:
        httpd, thread = start_http_server(
            int(port), addr=host, registry=exposition_registry(metrics)
        )
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot listen for metrics ({exc.strerror or exc})", listen
        ) from None
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{httpd.server_port}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
