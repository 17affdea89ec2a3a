"""``casframe serve --workers N``: real worker processes sharing one port on loopback.

A plugin installed for the test (a module and its ``.dist-info`` on ``PYTHONPATH``, found
through the ``casframe`` entry point as any plugin is) tags every unary answer with the worker
that gave it (``worker_index`` and pid, in trailing metadata): so the tests see which worker a
connection reached, and that a plugin's interceptors run in every worker. Each new channel is a
connection of its own; the kernel spreads connections over the workers, so the tests open
connections until they have reached every worker they need (a bounded number: a hang guard).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_processes import serve_process
from test_server_tls import Pki, pki  # noqa: F401 - the module-scoped fixture

from casframe import Digest, open_store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.google.bytestream import bytestream_pb2
from casframe._protos.google.bytestream import bytestream_pb2_grpc as byte_grpc
from casframe.errors import ConfigError
from casframe.server import ServerSettings

# Connections opened to find every worker: the chance that the kernel sends all of them to
# the same one of two workers is 2**-199.
MAX_CONNECTIONS = 200
HANG_GUARD = 120.0  # seconds; never the thing asserted
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
TAG = "casframe-test-worker"

WORKER_TAG_PLUGIN = '''
import os

import grpc

from casframe import hookimpl


class TagWorker(grpc.ServerInterceptor):
    def __init__(self, index):
        self.tag = (("casframe-test-worker", f"{index} {os.getpid()}"),)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        def tagged(request, context):
            context.set_trailing_metadata(self.tag)
            return behavior(request, context)

        return handler._replace(unary_unary=tagged)


@hookimpl
def casframe_server_interceptors(config):
    if os.environ.get("WORKERTAG_MISBEHAVE"):
        return ["not an interceptor"]
    return [TagWorker(config.worker_index)]
'''


@pytest.fixture
def tag_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker-tagging plugin, installed for the server processes this test starts."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "casframe_workertag.py").write_text(WORKER_TAG_PLUGIN, encoding="utf-8")
    info = site / "casframe_workertag-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: casframe-workertag\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[casframe]\nworkertag = casframe_workertag\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(site), os.environ.get("PYTHONPATH")])))


class Log:
    """The lines a process writes on stderr, collected by a thread as they come."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._collect, args=(stream,), daemon=True)
        self._thread.start()

    def _collect(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # end of output
            self._changed.notify_all()

    def wait_for(self, wanted: Callable[[str], bool], what: str) -> str:
        """The first line ``wanted`` accepts (waiting for it, up to the hang guard)."""
        deadline = time.monotonic() + HANG_GUARD
        with self._changed:
            while True:
                for line in self.lines:
                    if wanted(line):
                        return line
                left = deadline - time.monotonic()
                assert left > 0, f"no log line {what} in {HANG_GUARD:g} s:\n" + self.text()
                self._changed.wait(left)

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


def worker_of(channel: grpc.Channel) -> tuple[int, int]:
    """(worker index, pid) of the worker serving ``channel``'s connection."""
    _, call = re_grpc.CapabilitiesStub(channel).GetCapabilities.with_call(
        re_pb2.GetCapabilitiesRequest(), timeout=HANG_GUARD)
    (tag,) = [value for key, value in call.trailing_metadata() if key == TAG]
    index, pid = tag.split()
    return int(index), int(pid)


@contextlib.contextmanager
def one_per_worker(
    open_channel: Callable[[], grpc.Channel], workers: int
) -> Iterator[dict[int, tuple[grpc.Channel, int]]]:
    """Open connections until one reached each worker: {index: (channel, pid)}."""
    found: dict[int, tuple[grpc.Channel, int]] = {}
    spare = []
    try:
        for _ in range(MAX_CONNECTIONS):
            channel = open_channel()
            index, pid = worker_of(channel)
            if index in found:
                spare.append(channel)
            else:
                found[index] = (channel, pid)
            if len(found) == workers:
                break
        assert sorted(found) == list(range(workers)), (
            f"{MAX_CONNECTIONS} connections reached only workers {sorted(found)}")
        yield found
    finally:
        for channel in [*spare, *(channel for channel, _ in found.values())]:
            channel.close()


def plain(port: int) -> Callable[[], grpc.Channel]:
    return lambda: grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return {int(child) for child in listing.read().split()}


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:\tZ") for line in status)
    except FileNotFoundError:
        return False


def serving_pids(log: Log, workers: int) -> list[int]:
    """The worker pids, in worker order, from the supervisor's line once all serve."""
    line = log.wait_for(lambda line: f"{workers} workers serving on" in line, "of serving")
    return [int(pid) for pid in line.rpartition("(pids ")[2].rstrip(")").split(", ")]


def batch_update(channel: grpc.Channel, data: bytes) -> re_pb2.BatchUpdateBlobsResponse:
    digest = Digest.of_bytes(data)
    return re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(requests=[re_pb2.BatchUpdateBlobsRequest.Request(
            digest=digest.to_proto(), data=data)]), timeout=HANG_GUARD)


def batch_read(channel: grpc.Channel, data: bytes) -> bytes:
    response = re_grpc.ContentAddressableStorageStub(channel).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[Digest.of_bytes(data).to_proto()]),
        timeout=HANG_GUARD)
    (answer,) = response.responses
    assert answer.status.code == grpc.StatusCode.OK.value[0], answer.status
    return bytes(answer.data)


def casframe_serve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run([CASFRAME, "serve", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD, env=env)


CASFRAME = str(Path(sys.executable).with_name("casframe"))  # the console script


# -- the tests -----------------------------------------------------------------------------------


def test_connections_reach_every_worker_and_each_runs_the_plugins_interceptors(
    tag_plugin: None, store_url: str
) -> None:
    with serve_process(store_url, "--workers", "2") as (process, port), \
            one_per_worker(plain(port), 2) as found:
        pids = {pid for _, pid in found.values()}
        assert len(pids) == 2 and pids == children(process.pid)
        # One store behind both: what one worker accepts, the other serves.
        data = b"written through worker 0"
        (answer,) = batch_update(found[0][0], data).responses
        assert answer.status.code == 0
        assert batch_read(found[1][0], data) == data


def test_sigterm_lets_the_calls_in_progress_in_every_worker_finish(
    tag_plugin: None, store_url: str
) -> None:
    contents = {index: f"upload {index} ".encode() * 40_000 for index in range(2)}
    with serve_process(store_url, "--workers", "2") as (process, port), \
            one_per_worker(plain(port), 2) as found:
        log = Log(process.stderr)
        writes = {}
        for index, (channel, _) in found.items():
            data, digest = contents[index], Digest.of_bytes(contents[index])
            resource = f"uploads/drain-{index}/blobs/{digest.hash}/{digest.size}"
            requests: queue.Queue[bytestream_pb2.WriteRequest | None] = queue.Queue()
            requests.put(bytestream_pb2.WriteRequest(
                resource_name=resource, write_offset=0, data=data[:1000]))
            stub = byte_grpc.ByteStreamStub(channel)
            writes[index] = (requests, stub.Write.future(iter(requests.get, None),
                                                         timeout=HANG_GUARD), resource)
            # The worker holds the upload: the first chunk has arrived.
            deadline = time.monotonic() + HANG_GUARD
            while True:
                try:
                    status = stub.QueryWriteStatus(bytestream_pb2.QueryWriteStatusRequest(
                        resource_name=resource), timeout=HANG_GUARD)
                    if status.committed_size == 1000:
                        break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                assert time.monotonic() < deadline, "the first chunk never arrived"
                time.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        for index, (_, pid) in found.items():
            log.wait_for(lambda line, i=index, p=pid: f"worker {i} (pid {p}): stopping" in line,
                         f"of worker {index} stopping")
        # Both workers are stopping; each finishes the upload it has under way (within the
        # workers' 10 s grace: the rest of each upload is 40 KB, sent at once).
        for index, (requests, _, resource) in writes.items():
            data = contents[index]
            requests.put(bytestream_pb2.WriteRequest(
                resource_name=resource, write_offset=1000, data=data[1000:], finish_write=True))
            requests.put(None)
        for index, (_, future, _) in writes.items():
            assert future.result(timeout=HANG_GUARD).committed_size == len(contents[index])
        assert process.wait(timeout=HANG_GUARD) == 0
        log.wait_for(lambda line: "all 2 workers stopped" in line, "of the end")
        assert process.stdout is not None and process.stdout.read() == ""
    assert "Traceback" not in log.text()
    with open_store(store_url) as store:
        for data in contents.values():
            assert store.read_bytes(Digest.of_bytes(data)) == data


def test_a_worker_that_dies_is_reported_and_started_again_with_a_back_off(
    tag_plugin: None, store_url: str
) -> None:
    with serve_process(store_url, "--workers", "2") as (process, port):
        log = Log(process.stderr)
        first, other = serving_pids(log, 2)
        os.kill(first, signal.SIGKILL)
        log.wait_for(lambda line: line.endswith(
            f"worker 0 (pid {first}) was killed by SIGKILL; starting it again in 0.5 s"),
            "reporting the death")
        line = log.wait_for(lambda line: "worker 0 restarted (pid " in line, "of the restart")
        second = int(line.rpartition("(pid ")[2].rstrip(")"))
        # Dying again soon after its start: the wait before the next start doubles.
        os.kill(second, signal.SIGKILL)
        log.wait_for(lambda line: line.endswith(
            f"worker 0 (pid {second}) was killed by SIGKILL; starting it again in 1 s"),
            "reporting the second death")
        line = log.wait_for(lambda line: "worker 0 restarted (pid " in line and
                            f"(pid {second})" not in line, "of the second restart")
        third = int(line.rpartition("(pid ")[2].rstrip(")"))
        assert children(process.pid) == {third, other}
        with one_per_worker(plain(port), 2) as found:
            assert {index: pid for index, (_, pid) in found.items()} == {0: third, 1: other}


def test_killing_the_supervisor_leaves_no_worker_running(store_url: str) -> None:
    with serve_process(store_url, "--workers", "2") as (process, _):
        workers = children(process.pid)
        assert len(workers) == 2
        process.kill()
        process.wait()
        deadline = time.monotonic() + HANG_GUARD
        while any(running(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.1)


def test_read_only_in_every_worker(tag_plugin: None, store_url: str) -> None:
    stored = b"stored before serving"
    with open_store(store_url) as store:
        store.put_bytes(stored)
    with serve_process(store_url, "--workers", "2", "--read-only") as (_, port), \
            one_per_worker(plain(port), 2) as found:
        for channel, _ in found.values():
            with pytest.raises(grpc.RpcError) as refused:
                batch_update(channel, b"a write")
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert refused.value.details() == "this server is read-only"
            assert batch_read(channel, stored) == stored


def test_tls_and_mutual_tls_in_every_worker(
    tag_plugin: None, store_url: str, pki: Pki, tmp_path: Path  # noqa: F811
) -> None:
    files = {"cert": pki.server.cert, "key": pki.server.key, "ca": pki.ca}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)

    def secure(with_certificate: bool) -> Callable[[], grpc.Channel]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca,
            private_key=pki.client.key if with_certificate else None,
            certificate_chain=pki.client.cert if with_certificate else None,
        )
        return lambda: grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                                           options=OWN_CONNECTION)

    with serve_process(store_url, "--workers", "2", "--tls-cert", str(tmp_path / "cert.pem"),
                       "--tls-key", str(tmp_path / "key.pem"),
                       "--tls-client-ca", str(tmp_path / "ca.pem")) as (_, port):
        with one_per_worker(secure(True), 2):
            pass
        # Without a client certificate, no connection gets an answer, whichever worker it
        # reached (20 connections all reach the same one of two workers once in 2**19).
        for _ in range(20):
            with secure(False)() as channel, pytest.raises(grpc.RpcError) as refused:
                worker_of(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                pytest.raises(grpc.RpcError) as plaintext:
            worker_of(channel)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_port_in_use_is_refused_even_to_another_casframe_serve_with_workers(
    tmp_path: Path, store_url: str
) -> None:
    with serve_process(store_url, "--workers", "2") as (_, port):
        for workers in ("2", "1"):
            result = casframe_serve(str(tmp_path / "other"), "--listen", f"127.0.0.1:{port}",
                                    "--workers", workers)
            assert result.returncode == 1
            assert result.stderr.splitlines() == [
                f"casframe: error: 127.0.0.1:{port}: cannot listen (Address already in use)"]
            assert result.stdout == ""


def test_a_memory_store_is_served_by_one_process(tmp_path: Path) -> None:
    result = casframe_serve("memory://", "--listen", "127.0.0.1:0", "--workers", "2")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "casframe: error: --workers 2: a memory:// store lives in one process, so each worker "
        "would serve its own; use --workers 1"]
    with serve_process("memory://", "--workers", "1") as (process, _):
        assert children(process.pid) == set()


def test_a_worker_that_cannot_start_stops_the_command_with_its_error(
    tag_plugin: None, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERTAG_MISBEHAVE", "1")
    result = casframe_serve(store_url, "--listen", "127.0.0.1:0", "--workers", "2")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "casframe: error: plugin 'workertag' returned 'not an interceptor' from "
        "casframe_server_interceptors; expected grpc.ServerInterceptor or "
        "grpc.aio.ServerInterceptor instances")
    assert "Traceback" not in result.stderr


def test_the_worker_index_is_checked() -> None:
    assert ServerSettings(worker_index=1, worker_count=2).worker_index == 1
    with pytest.raises(ConfigError, match=r"^worker index 2 is not between 0 and 1 "
                                          r"\(worker count 2\)$"):
        ServerSettings(worker_index=2, worker_count=2)


def test_more_workers_than_cores_start_with_a_warning(store_url: str) -> None:
    cores = len(os.sched_getaffinity(0))
    with serve_process(store_url, "--workers", str(cores + 1)) as (process, _):
        log = Log(process.stderr)
        serving_pids(log, cores + 1)
        assert len(children(process.pid)) == cores + 1
        assert any(line.endswith(
            f"{cores + 1} worker processes on {cores} cores: --workers counts processes; "
            "the threads of each are --threads") for line in log.lines), log.text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_GUARD) == 0
