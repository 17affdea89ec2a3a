"""Prometheus metrics of a casframe server, with ``prometheus_client``.

:class:`ServerMetrics` is a call sink (:mod:`casframe.server.observe`): it counts every call
under the names go-grpc-prometheus made the convention (``grpc_server_handled_total`` and
friends, which Grafana dashboards for Buildbarn and bazel-remote already chart), and casframe's
own: bytes in and out, blobs and bytes stored and served, the hit counts of FindMissingBlobs
and GetActionResult, streams in flight and, over a ``cache://`` store, its local hits and
misses. :func:`serve_metrics` exposes them over HTTP for Prometheus to scrape.

Several server processes add up: when ``PROMETHEUS_MULTIPROC_DIR`` was set before this module
was first imported, each process's values are kept in files there and the exposition sums them
(``casframe serve`` sets it up when it starts worker processes; see :func:`multiprocess_dir`).
The counters, the histogram and the streams gauge are kept by :class:`_Values` (plain numbers
under one lock per call, copied into files of prometheus_client's multiprocess format when
there are several processes).

Imported only by the server when metrics are asked for: ``casframe --help`` and other
commands never load prometheus_client. This module must never expose a server path, a store
URL or anything a client sent as a label: labels take only method names, status codes and
fixed words, so a hostile client cannot grow the number of series.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import mmap
import os
import threading
from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, multiprocess, values
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.utils import floatToGoString

from casframe.errors import ConfigError
from casframe.server.counts import ContentCounts
from casframe.server.interceptors import UNCOUNTED_STREAMS
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

_READ = "/google.bytestream.ByteStream/Read"
_OK = grpc.StatusCode.OK


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
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, f"{_FILES['gauge']}_casframe-{pid}.db"))


def _grpc_type(call: CallRecord) -> str:
    if call.request_streaming:
        return "bidi_stream" if call.response_streaming else "client_stream"
    return "server_stream" if call.response_streaming else "unary"


#: The files of :class:`_Values` by kind of value, named as prometheus_client names its own
#: (the streams gauge sums the live processes' values, as ``multiprocess_mode="livesum"``).
_FILES = {"counter": "counter", "histogram": "histogram", "gauge": "gauge_livesum"}


class _Values:
    """The values of this process's call counters and histograms: plain floats, changed
    under one lock per call (:meth:`add` with :attr:`lock` held) and read by a scrape of
    :class:`_Collector`. With several processes (:func:`multiprocess_dir`) each value is also
    written to this process's own files there, in prometheus_client's multiprocess format,
    before the call's answer leaves, so the scrape that adds the processes up counts it.

    prometheus_client's own values do the same, but each update of one costs a lock, a
    ``getpid`` system call and five Python calls: eight of them a call were most of what
    metrics cost a server.
    """

    def __init__(self, folder: str | None) -> None:
        self.lock = threading.Lock()
        self.numbers: list[float] = []
        self._folder = folder
        self._pid = os.getpid()
        self._files: dict[str, MmapedDict] = {}
        # Each value's kind and name, and where it is in its file's memory map seen as
        # doubles (one value written as one 8-byte store: never half a value for a scrape to
        # read; the timestamp after it stays 0). The map is replaced when its file grows, so
        # the places of that file are found again then.
        self._keys: list[tuple[str, str]] = []  # (kind, key) of each value
        self._places: list[tuple[memoryview[float], int]] = []
        self._maps: dict[str, mmap.mmap] = {}
        self._views: dict[str, memoryview[float]] = {}

    def new(self, kind: str, key: str) -> int:
        """A new value of ``kind`` (``counter``, ``histogram``, ``gauge``) named ``key`` (what
        prometheus_client's files call it); hold :attr:`lock`. Returns its index."""
        start = 0.0
        if self._folder is not None:
            file = self._files.get(kind)
            if file is None:
                # Not the file prometheus_client keeps this process's own values in (the
                # streams gauge's): each file has a single writer.
                path = os.path.join(self._folder, f"{_FILES[kind]}_casframe-{self._pid}.db")
                file = self._files[kind] = MmapedDict(path)
            start = file.read_value(key)[0]  # adds the key to the file
            self._keys.append((kind, key))
            if self._maps.get(kind) is not file._m:  # noqa: SLF001 - a first value, or grown
                self._maps[kind] = file._m  # noqa: SLF001
                self._views[kind] = memoryview(file._m).cast("d")  # noqa: SLF001
                self._places = [self._place(*known) for known in self._keys]
            else:
                self._places.append(self._place(kind, key))
        self.numbers.append(start)
        return len(self.numbers) - 1

    def add(self, index: int, amount: float) -> None:
        """Add ``amount`` to value ``index``; hold :attr:`lock`."""
        numbers = self.numbers
        value = numbers[index] = numbers[index] + amount
        if self._places:
            view, where = self._places[index]
            view[where] = value

    def add_all(self, changes: list[tuple[int, float]]) -> None:
        """Add each ``(index, amount)`` of ``changes``, all under :attr:`lock` (taken here):
        one call of a method and one loop for all of a call's values."""
        with self.lock:
            numbers, places = self.numbers, self._places
            if places:
                for index, amount in changes:
                    value = numbers[index] = numbers[index] + amount
                    view, where = places[index]
                    view[where] = value
            else:
                for index, amount in changes:
                    numbers[index] += amount

    def add_one(self, index: int) -> None:
        """Add 1 to value ``index`` (taking :attr:`lock`): :meth:`add_all` of one change,
        without the list."""
        with self.lock:
            numbers = self.numbers
            value = numbers[index] = numbers[index] + 1.0
            if self._places:
                view, where = self._places[index]
                view[where] = value

    def _place(self, kind: str, key: str) -> tuple[memoryview[float], int]:
        """Where value ``key`` of the ``kind`` file is: its map seen as doubles, and the index
        of the value there (prometheus_client's format: each value a double at a multiple of
        8 bytes, then a timestamp double)."""
        position = self._files[kind]._positions[key]  # noqa: SLF001 - the format's offsets
        assert position % 8 == 0, "prometheus_client's values are 8-byte aligned"
        return self._views[kind], position // 8


class _Family:
    """A counter or histogram family of series (one per set of label values) in
    :class:`_Values`; what a scrape of this process shows of it is :meth:`metric`."""

    def __init__(self, values: _Values, kind: str, name: str, documentation: str,
                 labelnames: tuple[str, ...] = (), buckets: tuple[float, ...] = ()) -> None:
        self.values, self.kind, self.name = values, kind, name
        self.documentation, self.labelnames = documentation, labelnames
        self.bounds = (*buckets, math.inf)
        self._les = tuple(floatToGoString(bound) for bound in self.bounds)
        self.series: dict[tuple[str, ...], int] = {}

    def child(self, *labelvalues: str) -> int:
        """The index of the series' value (of a histogram: of its sum, the buckets' counts
        following it), made on first use."""
        index = self.series.get(labelvalues)
        if index is not None:
            return index
        with self.values.lock:
            index = self.series.get(labelvalues)
            if index is None:
                index = self._new(labelvalues)
                self.series[labelvalues] = index
        return index

    def _new(self, labelvalues: tuple[str, ...]) -> int:
        # Named as prometheus_client's own values name them in its files.
        name, new, doc = self.name, self.values.new, self.documentation
        labelnames, values = list(self.labelnames), list(labelvalues)
        if self.kind == "counter":
            return new("counter", mmap_key(name, name + "_total", labelnames, values, doc))
        if self.kind == "gauge":
            return new("gauge", mmap_key(name, name, labelnames, values, doc))
        index = new("histogram", mmap_key(name, name + "_sum", labelnames, values, doc))
        for le in self._les:
            new("histogram", mmap_key(name, name + "_bucket", [*labelnames, "le"],
                                      [*values, le], doc))
        return index

    def observe(self, index: int, amount: float) -> None:
        """Count ``amount`` in histogram series ``index``; hold the values' lock."""
        self.values.add(index, amount)
        self.values.add(self.bucket(index, amount), 1.0)

    def bucket(self, index: int, amount: float) -> int:
        """The index of the bucket of histogram series ``index`` that counts ``amount``."""
        return index + 1 + bisect.bisect_left(self.bounds, amount)

    def metric(self) -> Metric:
        """This process's series; hold the values' lock."""
        numbers = self.values.numbers
        family: Metric
        if self.kind in ("counter", "gauge"):
            shown = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
            family = shown(self.name, self.documentation, labels=self.labelnames)
            for labelvalues, index in self.series.items():
                family.add_metric(labelvalues, numbers[index])
            return family
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labelvalues, index in self.series.items():
            total, buckets = 0.0, []
            for offset, le in enumerate(self._les, start=index + 1):
                total += numbers[offset]
                buckets.append((le, total))
            family.add_metric(labelvalues, buckets, numbers[index])
        return family


class _Collector:
    """Shows the families of :class:`_Values` in a registry (this process's own values)."""

    def __init__(self, families: list[_Family]) -> None:
        self._families = families

    def describe(self) -> list[Metric]:
        return [Metric(family.name, family.documentation, family.kind)
                for family in self._families]

    def collect(self) -> list[Metric]:
        if not self._families:
            return []
        with self._families[0].values.lock:
            return [family.metric() for family in self._families]


class _MethodSeries:
    """The value indexes of one method's series, found once (looking them up by labels on
    every call costs more than counting)."""

    def __init__(self, metrics: ServerMetrics, call: CallRecord) -> None:
        kind, service, name = _grpc_type(call), call.service, call.name
        self.labels = (kind, service, name)
        self.started = metrics.started.child(kind, service, name)
        self.seconds = metrics.handling_seconds.child(kind, service, name)
        self.bytes_received = metrics.bytes_received.child(service, name)
        self.bytes_sent = metrics.bytes_sent.child(service, name)
        self.stream = call.streaming and call.method not in UNCOUNTED_STREAMS
        self.read = call.method == _READ
        self.bounds = metrics.handling_seconds.bounds
        self._handled = metrics.handled
        # By the code's id: status codes are enum members, one object each, whose hash is
        # a Python method.
        self.by_code: dict[int, int] = {}

    def handled(self, code: grpc.StatusCode) -> int:
        index = self.by_code.get(id(code))
        if index is None:
            index = self.by_code[id(code)] = self._handled.child(*self.labels, code.name)
        return index


class ServerMetrics:
    """The metrics of one server process, registered in ``registry`` (a fresh one by
    default). ``store`` is the served store: over a ``cache://`` store, its hit counts are
    followed as calls end. Made in the process that serves (its values are this process's:
    see :class:`_Values`)."""

    def __init__(self, store: Store | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.values = numbers = _Values(multiprocess_dir())
        method = ("grpc_type", "grpc_service", "grpc_method")
        families = [
            started := _Family(numbers, "counter", "grpc_server_started",
                               "RPCs started on the server.", method),
            handled := _Family(numbers, "counter", "grpc_server_handled",
                               "RPCs completed on the server, whatever their status.",
                               (*method, "grpc_code")),
            seconds := _Family(numbers, "histogram", "grpc_server_handling_seconds",
                               "Time from the call's start to its answer being handed to gRPC.",
                               method, LATENCY_BUCKETS),
            received := _Family(numbers, "counter", "casframe_server_received_bytes",
                                "Serialized bytes of request messages received.",
                                ("grpc_service", "grpc_method")),
            sent := _Family(numbers, "counter", "casframe_server_sent_bytes",
                            "Serialized bytes of response messages sent.",
                            ("grpc_service", "grpc_method")),
            blobs_stored := _Family(
                numbers, "counter", "casframe_cas_blobs_stored",
                "Blobs uploaded and accepted (BatchUpdateBlobs entries, completed ByteStream "
                "Writes), including ones the store already held."),
            bytes_stored := _Family(numbers, "counter", "casframe_cas_stored_bytes",
                                    "Bytes of the blobs counted in "
                                    "casframe_cas_blobs_stored_total."),
            blobs_served := _Family(
                numbers, "counter", "casframe_cas_blobs_served",
                "Blobs sent to clients (BatchReadBlobs entries, completed ByteStream Reads)."),
            bytes_served := _Family(numbers, "counter", "casframe_cas_served_bytes",
                                    "Blob bytes sent to clients."),
            find_missing := _Family(
                numbers, "counter", "casframe_cas_find_missing_digests",
                "Digests asked about in FindMissingBlobs, by result (present or missing).",
                ("result",)),
            action_cache := _Family(
                numbers, "counter", "casframe_action_cache_lookups",
                "GetActionResult calls by result: hit (OK) or miss (NOT_FOUND).", ("result",)),
            cache_reads := _Family(
                numbers, "counter", "casframe_cache_reads",
                "Blob reads of a cache:// store by result: hit (served by its local store) or "
                "miss (fetched from its remote).", ("result",)),
            cache_filled := _Family(
                numbers, "counter", "casframe_cache_filled_bytes",
                "Bytes a cache:// store copied from its remote into its local store."),
            in_flight := _Family(
                numbers, "gauge", "casframe_server_streams_in_flight",
                "Streaming calls in progress (ByteStream Read and Write, GetTree)."),
        ]
        self.started, self.handled, self.handling_seconds = started, handled, seconds
        self.bytes_received, self.bytes_sent = received, sent
        served = (blobs_served.child(), bytes_served.child())
        self._blobs_served, self._bytes_served = served
        #: Where the services count what their calls stored and served (given to them by
        #: the server: :func:`casframe.server.counts.content_counts_of`).
        self.content_counts: ContentCounts = _Counts(
            numbers, (blobs_stored.child(), bytes_stored.child()), served,
            (find_missing.child("present"), find_missing.child("missing")),
            (action_cache.child("hit"), action_cache.child("miss")),
        )
        self._in_flight = in_flight.child()
        registry.register(_Collector(families))
        self.cache_hits, self.cache_misses = cache_reads.child("hit"), cache_reads.child("miss")
        self.cache_filled_bytes = cache_filled.child()
        self._methods: dict[str, _MethodSeries] = {}
        follower = _CacheFollower(store, self) if store is not None else None
        self._cache = follower if follower is not None and follower.active else None

    def _series(self, call: CallRecord) -> _MethodSeries:
        series = self._methods.get(call.method)
        if series is None:
            series = self._methods[call.method] = _MethodSeries(self, call)
        return series

    # -- CallSink --------------------------------------------------------------------------

    def enabled(self) -> bool:
        return True

    # Each call's values change in one add_all (one lock, one loop), from a list made here:
    # the calls of a method each, and the lock, were most of what counting a call cost.

    def call_started(self, call: CallRecord) -> None:
        series = self._methods.get(call.method) or self._series(call)
        if series.stream:
            self.values.add_all([(series.started, 1.0), (self._in_flight, 1.0)])
        else:
            self.values.add_one(series.started)

    def call_ended(self, call: CallRecord) -> None:
        code = call.code
        assert code is not None
        series = self._methods.get(call.method) or self._series(call)
        handled = series.by_code.get(id(code))
        if handled is None:
            handled = series.handled(code)
        duration, seconds = call.duration, series.seconds
        changes = [(handled, 1.0), (seconds, duration),
                   (seconds + 1 + bisect.bisect_left(series.bounds, duration), 1.0)]
        if call.bytes_in:
            changes.append((series.bytes_received, call.bytes_in))
        if call.bytes_out:
            changes.append((series.bytes_sent, call.bytes_out))
        if series.stream:
            changes.append((self._in_flight, -1.0))
        if series.read and code is _OK:  # a completed Read: its chunks are the blob's bytes
            changes.append((self._blobs_served, 1.0))
            changes.append((self._bytes_served, call.raw_bytes_out))
        self.values.add_all(changes)
        if self._cache is not None:
            self._cache.follow()


class _Counts(ContentCounts):
    """What the services count of their calls' content (:mod:`casframe.server.counts`), added
    to :class:`_Values` as they count it, before their answer leaves."""

    def __init__(self, values: _Values, stored: tuple[int, int], served: tuple[int, int],
                 found: tuple[int, int], lookups: tuple[int, int]) -> None:
        # Each a pair of value indexes: (blobs, bytes), (present, missing), (hit, miss).
        self._values = values
        self._stored, self._served, self._found = stored, served, found
        self._hit, self._miss = lookups

    def blobs_stored(self, count: int, size: int) -> None:
        blobs, size_index = self._stored
        self._values.add_all([(blobs, count), (size_index, size)])

    def blobs_served(self, count: int, size: int) -> None:
        blobs, size_index = self._served
        self._values.add_all([(blobs, count), (size_index, size)])

    def digests_found(self, asked: int, missing: int) -> None:
        present, absent = self._found
        self._values.add_all([(present, asked - missing), (absent, missing)])

    def action_lookup(self, hit: bool) -> None:
        self._values.add_one(self._hit if hit else self._miss)


class _CacheFollower:
    """Carries a ``cache://`` store's own counts (``CacheBlobStore.stats``) into the cache
    counters as calls end: counters that add up across processes, unlike a collector that
    reads one process's store at scrape time."""

    def __init__(self, store: Store, metrics: ServerMetrics) -> None:
        self._blobs = store.blobs
        self._values = metrics.values
        self._hits, self._misses = metrics.cache_hits, metrics.cache_misses
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
            changes = [(a - b) for a, b in zip(counts, self._seen, strict=True)]
            self._seen = counts
        with self._values.lock:
            for index, change in zip((self._hits, self._misses, self._filled), changes,
                                     strict=True):
                if change > 0:
                    self._values.add(index, change)


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
