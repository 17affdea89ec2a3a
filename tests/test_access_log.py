"""The access log: one JSON line per call, with the documented fields, no secrets and no server
paths, written by a thread of its own so that a stuck file never holds a call."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_processes import ClientStubs, serve_process

from casframe import Digest, Store, open_store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.server import Server
from casframe.server.accesslog import AccessLog

FIELDS = {"time", "peer", "instance", "method", "status", "duration_ms", "bytes_in", "bytes_out"}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SECRET = "Bearer s3cr3t-t0ken"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_call_is_one_json_line_with_the_documented_fields(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    log_path = tmp_path / "access.log"
    metadata = (("authorization", SECRET), ("x-api-key", "k3y-value"))
    blob = b"logged blob"
    digest = Digest.of_bytes(blob)
    with AccessLog.open(str(log_path)) as access_log, Server(
        store, instance_names=["", "main"], call_sinks=[access_log]
    ) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        client = ClientStubs()
        client.attach_stubs(channel)
        client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            instance_name="main", blob_digests=[digest.to_proto()] * 3), metadata=metadata)
        client.bytestream.Write(iter([byte_pb2.WriteRequest(
            resource_name=f"main/uploads/1/blobs/{digest.hash}/{digest.size}", data=blob,
            finish_write=True)]), metadata=metadata)
        b"".join(r.data for r in client.bytestream.Read(byte_pb2.ReadRequest(
            resource_name=f"blobs/{digest.hash}/{digest.size}")))
        with pytest.raises(grpc.RpcError):
            client.ac.GetActionResult(re_pb2.GetActionResultRequest(
                action_digest=digest.to_proto()), metadata=metadata)
    store.close()

    text = log_path.read_text()
    assert SECRET not in text and "k3y-value" not in text
    assert str(tmp_path) not in text  # no server path (the store is under tmp_path)
    lines = _lines(log_path)
    assert [line["method"] for line in lines] == [
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        "/google.bytestream.ByteStream/Write",
        "/google.bytestream.ByteStream/Read",
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
    ]
    for line in lines:
        assert FIELDS <= line.keys(), line
        assert TIME.match(line["time"]), line
        assert line["peer"].startswith("ipv4:127.0.0.1:") or line["peer"].startswith("ipv6:")
        assert line["duration_ms"] >= 0
    find, write, read, action = lines
    assert (find["instance"], find["status"], find["blobs"]) == ("main", "OK", 3)
    assert find["bytes_in"] > 0 and find["bytes_out"] > 0
    resource = f"main/uploads/1/blobs/{digest.hash}/{digest.size}"
    assert (write["instance"], write["resource"], write["status"]) == ("main", resource, "OK")
    assert write["bytes_in"] >= len(blob)
    assert (read["instance"], read["resource"]) == ("", f"blobs/{digest.hash}/{digest.size}")
    assert read["bytes_out"] >= len(blob)
    assert (action["status"], action["resource"]) == ("NOT_FOUND", str(digest))


def test_serve_access_log_to_standard_error(tmp_path: Path) -> None:
    with serve_process(f"file://{tmp_path}/store", "--access-log", "-") as (process, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = ClientStubs()
            client.attach_stubs(channel)
            client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
            with pytest.raises(grpc.RpcError):
                client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="x"))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        assert process.stderr is not None
        lines = [json.loads(line) for line in process.stderr.read().splitlines()
                 if line.startswith("{")]
    assert [(line["method"].rpartition("/")[2], line["status"], line["instance"])
            for line in lines] == [
        ("GetCapabilities", "OK", ""), ("GetCapabilities", "INVALID_ARGUMENT", "x")
    ]


def test_a_stuck_log_file_holds_no_call(tmp_path: Path, memory_store: Store) -> None:
    # A FIFO whose reader takes nothing: once its buffer (64 KiB) is full, every write to it
    # blocks. Calls must still all be answered; the lines come once the reader reads.
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    calls = 1000  # ~250 bytes a line: several times the pipe's buffer
    try:
        with AccessLog.open(str(fifo)) as access_log:
            with Server(memory_store, call_sinks=[access_log]) as server, \
                    grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                client = ClientStubs()
                client.attach_stubs(channel)
                for _ in range(calls):
                    client.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=60)
            received = bytearray()
            os.set_blocking(reader, True)

            def drain() -> None:
                while chunk := os.read(reader, 1 << 16):
                    received.extend(chunk)

            draining = threading.Thread(target=drain)
            draining.start()
        # Closing the log wrote every queued line and closed the FIFO: the reader sees its end.
        draining.join(timeout=120)
        assert not draining.is_alive()
    finally:
        os.close(reader)
    lines = received.decode().splitlines()
    assert len(lines) == calls
    assert all(json.loads(line)["status"] == "OK" for line in lines)


def test_an_access_log_that_cannot_be_opened_stops_serve_with_its_reason(tmp_path: Path) -> None:
    target = tmp_path / "no-such-folder" / "access.log"
    result = subprocess.run(
        [sys.executable, "-m", "casframe.server", f"file://{tmp_path}/store", "--listen",
         "127.0.0.1:0", "--access-log", str(target)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("casframe serve: error: ")
    assert "No such file or directory" in result.stderr and str(target) in result.stderr
    assert result.stdout == ""  # it never said it was serving
