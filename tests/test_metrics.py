"""Prometheus metrics of the server: what each kind of call counts, read from the registry of
an in-process server, and ``casframe serve --metrics-listen`` scraped over HTTP, one process
and two adding up through a shared multiprocess directory.

The real Prometheus server scraping a Bazel build is in ``test_prometheus.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import pytest
import zstandard
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_helpers import metric_value, scrape
from server_processes import ClientStubs, serve_process

from casframe import Digest, Store, open_store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.server import Server
from casframe.server.metrics import LATENCY_BUCKETS, ServerMetrics
from casframe.testing import random_bytes

MiB = 1 << 20
CAS = "build.bazel.remote.execution.v2.ContentAddressableStorage"
AC = "build.bazel.remote.execution.v2.ActionCache"
BYTESTREAM = "google.bytestream.ByteStream"


class Metered(ClientStubs):
    """An in-process server with metrics, a client of it, and its metric values."""

    def __init__(self, store: Store) -> None:
        self.metrics = ServerMetrics(store)
        self.server = Server(store, call_sinks=[self.metrics])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.start()}")
        self.attach_stubs(self.channel)

    def value(self, name: str, **labels: str) -> float | None:
        registry: CollectorRegistry = self.metrics.registry
        return registry.get_sample_value(name, labels)

    def handled(self, service: str, method: str, code: str) -> float | None:
        return self.value(
            "grpc_server_handled_total", grpc_service=service, grpc_method=method,
            grpc_code=code, grpc_type="unary",
        )

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)


@pytest.fixture
def metered() -> Iterator[Callable[[Store], Metered]]:
    started: list[Metered] = []

    def factory(store: Store) -> Metered:
        started.append(Metered(store))
        return started[-1]

    try:
        yield factory
    finally:
        for server in started:
            server.close()


def _upload(client: Metered, *blobs: bytes) -> list[re_pb2.Digest]:
    request = re_pb2.BatchUpdateBlobsRequest()
    for data in blobs:
        request.requests.add(digest=Digest.of_bytes(data).to_proto(), data=data)
    client.cas.BatchUpdateBlobs(request)
    return [Digest.of_bytes(data).to_proto() for data in blobs]


def test_calls_are_counted_by_service_method_and_status_code(
    memory_store: Store, metered: Callable[[Store], Metered]
) -> None:
    client = metered(memory_store)
    client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    with pytest.raises(grpc.RpcError):
        client.ac.GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=Digest.of_bytes(b"no such action").to_proto()))
    with pytest.raises(grpc.RpcError):
        client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="unserved"))

    caps = "build.bazel.remote.execution.v2.Capabilities"
    assert client.handled(caps, "GetCapabilities", "OK") == 2
    assert client.handled(caps, "GetCapabilities", "INVALID_ARGUMENT") == 1
    assert client.handled(AC, "GetActionResult", "NOT_FOUND") == 1
    labels = {"grpc_service": caps, "grpc_method": "GetCapabilities", "grpc_type": "unary"}
    assert client.value("grpc_server_started_total", **labels) == 3
    assert client.value("grpc_server_handling_seconds_count", **labels) == 3
    assert client.value("grpc_server_handling_seconds_bucket", le="+Inf", **labels) == 3
    # GetCapabilities requests are empty messages; the answers are not.
    sent = client.value("casframe_server_sent_bytes_total", grpc_service=caps,
                        grpc_method="GetCapabilities")
    assert sent is not None and sent > 0


def test_find_missing_blobs_and_action_cache_count_hits_and_misses(
    memory_store: Store, metered: Callable[[Store], Metered]
) -> None:
    client = metered(memory_store)
    stored = _upload(client, b"present")
    absent = [Digest.of_bytes(b"absent %d" % i).to_proto() for i in range(3)]
    client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=stored + absent))
    assert client.value("casframe_cas_find_missing_digests_total", result="present") == 1
    assert client.value("casframe_cas_find_missing_digests_total", result="missing") == 3

    action = Digest.of_bytes(b"an action").to_proto()
    client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=re_pb2.ActionResult(exit_code=0)))
    client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    with pytest.raises(grpc.RpcError):
        client.ac.GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=Digest.of_bytes(b"another action").to_proto()))
    assert client.value("casframe_action_cache_lookups_total", result="hit") == 2
    assert client.value("casframe_action_cache_lookups_total", result="miss") == 1


def test_blobs_and_bytes_stored_and_served_through_batches_and_bytestream(
    memory_store: Store, metered: Callable[[Store], Metered]
) -> None:
    client = metered(memory_store)
    small = [b"first blob", b"second, longer blob"]
    digests = _upload(client, *small)
    big = random_bytes(3 * MiB + 5)
    big_digest = Digest.of_bytes(big)
    resource = f"uploads/0/blobs/{big_digest.hash}/{big_digest.size}"
    chunks = [big[i:i + MiB] for i in range(0, len(big), MiB)]
    client.bytestream.Write(iter([
        byte_pb2.WriteRequest(resource_name=resource if i == 0 else "", write_offset=i * MiB,
                              data=chunk, finish_write=i == len(chunks) - 1)
        for i, chunk in enumerate(chunks)
    ]))
    assert client.value("casframe_cas_blobs_stored_total") == 3
    assert client.value("casframe_cas_stored_bytes_total") == sum(map(len, small)) + len(big)

    client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    read = b"".join(r.data for r in client.bytestream.Read(byte_pb2.ReadRequest(
        resource_name=f"blobs/{big_digest.hash}/{big_digest.size}")))
    assert read == big
    assert client.value("casframe_cas_blobs_served_total") == 3
    assert client.value("casframe_cas_served_bytes_total") == sum(map(len, small)) + len(big)
    received = client.value("casframe_server_received_bytes_total", grpc_service=BYTESTREAM,
                            grpc_method="Write")
    assert received is not None and received >= len(big)
    assert client.value("grpc_server_handled_total", grpc_service=BYTESTREAM,
                        grpc_method="Write", grpc_type="client_stream", grpc_code="OK") == 1


def test_only_the_blobs_a_call_stored_or_served_are_counted(
    memory_store: Store, metered: Callable[[Store], Metered]
) -> None:
    client = metered(memory_store)
    good, other = b"a good blob", b"another blob"
    wrong = re_pb2.BatchUpdateBlobsRequest()
    wrong.requests.add(digest=Digest.of_bytes(good).to_proto(), data=good)
    wrong.requests.add(digest=Digest.of_bytes(b"not this").to_proto(), data=b"something else")
    client.cas.BatchUpdateBlobs(wrong)
    assert client.value("casframe_cas_blobs_stored_total") == 1
    assert client.value("casframe_cas_stored_bytes_total") == len(good)

    # A Write of a blob already stored counts; one closed before finish_write does not.
    held = Digest.of_bytes(good)
    client.bytestream.Write(iter([byte_pb2.WriteRequest(
        resource_name=f"uploads/1/blobs/{held.hash}/{held.size}", data=good,
        finish_write=True)]))
    half = Digest.of_bytes(other)
    client.bytestream.Write(iter([byte_pb2.WriteRequest(
        resource_name=f"uploads/2/blobs/{half.hash}/{half.size}", data=other[:4])]))
    assert client.value("casframe_cas_blobs_stored_total") == 2
    assert client.value("casframe_cas_stored_bytes_total") == 2 * len(good)

    missing = Digest.of_bytes(b"never stored").to_proto()
    reply = client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[held.to_proto(), missing, held.to_proto()]))
    assert [entry.status.code for entry in reply.responses] == [0, 5, 0]
    assert client.value("casframe_cas_blobs_served_total") == 2
    assert client.value("casframe_cas_served_bytes_total") == 2 * len(good)


def test_a_compressed_write_counts_the_blob_it_stored_by_its_own_size(
    memory_store: Store, metered: Callable[[Store], Metered]
) -> None:
    client = metered(memory_store)
    blob = b"compressible " * 500
    digest = Digest.of_bytes(blob)
    packed = zstandard.ZstdCompressor().compress(blob)
    name = f"uploads/1/compressed-blobs/zstd/{digest.hash}/{digest.size}"
    chunks = [packed[: len(packed) // 2], packed[len(packed) // 2 :]]
    client.bytestream.Write(iter([
        byte_pb2.WriteRequest(resource_name=name, data=chunks[0]),
        byte_pb2.WriteRequest(write_offset=len(chunks[0]), data=chunks[1], finish_write=True),
    ]))
    assert memory_store.contains(digest)
    assert client.value("casframe_cas_blobs_stored_total") == 1
    assert client.value("casframe_cas_stored_bytes_total") == digest.size


def test_latency_histogram_shows_what_prometheus_clients_own_shows() -> None:
    """The server keeps its histogram's counts itself (one lock a call instead of one per
    value): the same observations give the same samples as prometheus_client's Histogram,
    a duration equal to a bucket's bound counted in that bucket."""
    metrics = ServerMetrics()
    labels = ("unary", "some.Service", "Method")
    reference = Histogram(
        "grpc_server_handling_seconds", "reference", ["grpc_type", "grpc_service", "grpc_method"],
        buckets=LATENCY_BUCKETS, registry=CollectorRegistry(),
    )
    series = metrics.handling_seconds.child(*labels)
    for amount in (0.0, 0.0005, 0.001, 0.0011, 0.3, 60.0, 299.9, 300.0, 301.0, 1e6):
        with metrics.values.lock:
            metrics.handling_seconds.observe(series, amount)
        reference.labels(*labels).observe(amount)

    def samples(families: Iterable[Metric]) -> list[tuple[str, list[tuple[str, str]], float]]:
        return sorted(
            (sample.name, sorted(sample.labels.items()), sample.value)
            for family in families for sample in family.samples
            if not sample.name.endswith("_created")
        )

    ours = samples(family for family in metrics.registry.collect()
                   if family.name == "grpc_server_handling_seconds")
    assert ours == samples(reference.collect())
    assert len(ours) == len(LATENCY_BUCKETS) + 3  # the buckets, +Inf, _count and _sum


def test_streams_in_flight_counts_a_read_until_it_ends(
    memory_store: Store, metered: Callable[[Store], Metered]
) -> None:
    client = metered(memory_store)
    data = random_bytes(4 * MiB)
    digest = memory_store.put_bytes(data)
    assert client.value("casframe_server_streams_in_flight") == 0
    responses = client.bytestream.Read(
        byte_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}"))
    first = next(responses)
    assert first.data
    assert client.value("casframe_server_streams_in_flight") == 1
    assert len(first.data) + sum(len(r.data) for r in responses) == len(data)
    assert client.value("casframe_server_streams_in_flight") == 0
    # A load balancer's health Watch lasts as long as it watches: not a stream of the limit.
    watch = client.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert client.value("casframe_server_streams_in_flight") == 0
    watch.cancel()


def test_cache_store_reads_count_local_hits_and_remote_misses(
    tmp_path: Path, metered: Callable[[Store], Metered]
) -> None:
    remote = open_store(f"file://{tmp_path}/remote")
    digest = remote.put_bytes(b"only on the remote at first")
    remote.close()
    cache = open_store(f"cache://?local=file://{tmp_path}/local&remote=file://{tmp_path}/remote")
    try:
        client = metered(cache)
        request = re_pb2.BatchReadBlobsRequest(digests=[digest.to_proto()])
        client.cas.BatchReadBlobs(request)  # fetched from the remote into local
        client.cas.BatchReadBlobs(request)  # served by local
        client.cas.BatchReadBlobs(request)
        assert client.value("casframe_cache_reads_total", result="miss") == 1
        assert client.value("casframe_cache_reads_total", result="hit") == 2
        assert client.value("casframe_cache_filled_bytes_total") == digest.size
    finally:
        cache.close()


# -- casframe serve --metrics-listen ----------------------------------------------------------


def _metrics_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("casframe: metrics on http://127.0.0.1:"), line
    return line.split()[-1]


def _capabilities(port: int, times: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = ClientStubs()
        client.attach_stubs(channel)
        for _ in range(times):
            client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())


def _handled_capabilities(exposition: str) -> float | None:
    return metric_value(
        exposition, "grpc_server_handled_total", grpc_method="GetCapabilities", grpc_code="OK"
    )


def test_one_serving_process_keeps_its_metrics_in_memory(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with serve_process(
        f"file://{tmp_path}/store", "--workers", "1", "--metrics-listen", "127.0.0.1:0",
        env={**env, "TMPDIR": str(temp)},
    ) as (process, port):
        url = _metrics_url(process)
        _capabilities(port, 2)
        exposition = scrape(url)
        assert _handled_capabilities(exposition) == 2
        assert metric_value(exposition, "casframe_server_streams_in_flight") == 0
        assert metric_value(exposition, "casframe_cache_reads_total", result="hit") == 0
        assert "_created" not in exposition  # the same series as with several processes
        assert list(temp.iterdir()) == []  # no files to add up


def test_serve_exposes_metrics_over_http_and_cleans_up_its_folder(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with serve_process(
        f"file://{tmp_path}/store", "--workers", "2", "--metrics-listen", "127.0.0.1:0",
        env={**env, "TMPDIR": str(temp)},
    ) as (process, port):
        url = _metrics_url(process)
        assert url.endswith("/metrics")
        _capabilities(port, 3)
        exposition = scrape(url)
        assert _handled_capabilities(exposition) == 3
        assert metric_value(exposition, "casframe_server_streams_in_flight") == 0
        # The values are kept in a folder of the server's own while it runs ...
        assert [p.name.startswith("casframe-metrics-") for p in temp.iterdir()] == [True]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    assert list(temp.iterdir()) == []  # ... and removed when it stops


def test_two_server_processes_sharing_a_multiprocess_folder_add_up(tmp_path: Path) -> None:
    shared = tmp_path / "multiproc"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    store = f"file://{tmp_path}/store"
    with serve_process(store, "--metrics-listen", "127.0.0.1:0", env=env) as (first, port1):
        url = _metrics_url(first)
        with serve_process(store, "--metrics-listen", "127.0.0.1:0", env=env) as (second, port2):
            _metrics_url(second)
            _capabilities(port1, 2)
            _capabilities(port2, 3)
            exposition = scrape(url)
            assert _handled_capabilities(exposition) == 5
            method = {"grpc_method": "GetCapabilities"}
            assert metric_value(exposition, "grpc_server_started_total", **method) == 5
            assert metric_value(exposition, "grpc_server_handling_seconds_count", **method) == 5
            assert metric_value(
                exposition, "grpc_server_handling_seconds_bucket", le="+Inf", **method) == 5
            assert metric_value(exposition, "grpc_server_handling_seconds_sum", **method) > 0
            sent = metric_value(exposition, "casframe_server_sent_bytes_total", **method)
            assert sent is not None and sent > 0
            # Series a server starts with, at zero until a call counts in them.
            assert metric_value(
                exposition, "casframe_action_cache_lookups_total", result="hit") == 0
            assert metric_value(exposition, "casframe_cas_blobs_stored_total") == 0
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=120) == 0
        # What a stopped process counted still counts.
        _capabilities(port1, 1)
        assert _handled_capabilities(scrape(url)) == 6
    assert any(shared.iterdir())  # a folder the user gave is the user's to clear


def test_a_multiprocess_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [sys.executable, "-m", "casframe.server", f"file://{tmp_path}/store", "--listen",
         "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(missing)},
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"casframe serve: error: PROMETHEUS_MULTIPROC_DIR is '{missing}', which is not a "
        "folder: create it (empty), or unset it and casframe serve makes one of its own\n"
    )


def test_metrics_listen_refuses_a_bad_address_and_a_taken_port(tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "casframe.server", f"file://{tmp_path}/store",
             "--listen", "127.0.0.1:0"]
    bad = subprocess.run([*serve, "--metrics-listen", "localhost"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "Invalid value for '--metrics-listen'" in bad.stderr
    assert "is not HOST:PORT" in bad.stderr
    with serve_process(f"file://{tmp_path}/store", "--metrics-listen", "127.0.0.1:0") as (
        process, _
    ):
        taken = _metrics_url(process).rsplit(":", 1)[1].split("/")[0]
        clash = subprocess.run([*serve, "--metrics-listen", f"127.0.0.1:{taken}"],
                               capture_output=True, text=True, timeout=120)
    assert clash.returncode == 1
    assert "casframe serve: error: " in clash.stderr
    assert "cannot listen for metrics (Address already in use)" in clash.stderr, clash.stderr
    assert f"127.0.0.1:{taken}" in clash.stderr


def test_worker_processes_count_into_one_scrape_and_one_access_log(tmp_path: Path) -> None:
    """``--workers 2``: each worker counts and logs its own calls; the supervisor serves the
    sum. Connections go to whichever worker the kernel picks, so only the sums are asserted."""
    log = tmp_path / "access.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with serve_process(
        f"file://{tmp_path}/store", "--workers", "2", "--metrics-listen", "127.0.0.1:0",
        "--access-log", str(log), env=env,
    ) as (process, port):
        url = _metrics_url(process)
        for _ in range(10):  # a channel each: new connections, spread over the workers
            _capabilities(port, 3)
        assert _handled_capabilities(scrape(url)) == 30
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["method"] for entry in lines].count(
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
    ) == 30
