"""Real ``casframe serve`` processes on loopback, and clients that stall them.

:func:`serve_process` runs the server on a free port (:func:`rss_bytes` reads its memory from
``/proc``); :func:`stalled_streams` runs this file as a separate client process that opens many
ByteStream streams and then stalls them (writers stop sending, readers stop reading), so the
test process stays free to play the well-behaved client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2_grpc

from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.buildstream.v2 import buildstream_pb2_grpc as bs_grpc
from casframe._protos.google.bytestream import bytestream_pb2_grpc as byte_grpc

__all__ = ["raise_fd_limit", "rss_bytes", "serve_process", "stalled_streams"]

# Hang guard for a process to start or to report: far above any real start-up.
_START_TIMEOUT = 120.0


class ClientStubs:
    """A stub of every service ``casframe serve`` offers, on one channel."""

    def attach_stubs(self, channel: grpc.Channel) -> None:
        self.caps = re_grpc.CapabilitiesStub(channel)
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.ac = re_grpc.ActionCacheStub(channel)
        self.bytestream = byte_grpc.ByteStreamStub(channel)
        self.fetch = ra_grpc.FetchStub(channel)
        self.push = ra_grpc.PushStub(channel)
        self.refs = bs_grpc.ReferenceStorageStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


def raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft limit of open files to ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, from ``/proc``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _read_line(process: subprocess.Popen[str], what: str) -> str:
    """The next line the process prints, or a failure naming ``what`` it never said."""
    assert process.stdout is not None
    with _alarm(_START_TIMEOUT, f"{what}: no answer in {_START_TIMEOUT:g} s"):
        line = process.stdout.readline()
    if not line:
        raise AssertionError(f"{what}: the process ended (exit code {process.wait()})")
    return line


@contextlib.contextmanager
def _alarm(seconds: float, message: str) -> Iterator[None]:
    import signal

    def expired(signum: int, frame: object) -> None:
        raise AssertionError(message)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def serve_process(
    store_url: str,
    *options: str,
    stderr: int | IO[str] = subprocess.PIPE,
    env: dict[str, str] | None = None,
    announces: str | None = None,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``python -m casframe.server STORE_URL --listen 127.0.0.1:0 OPTIONS``: yields the process
    and its port once it says it is serving (``announces``: the store's URL as it says it,
    when that differs from ``store_url``); kills it if it is still running at the end.

    One process serves (``--workers 1``, so the process is the server whose memory and limits
    a test measures) unless ``OPTIONS`` say ``--workers``. ``env`` replaces the environment it
    inherits.
    """
    raise_fd_limit(8192)  # inherited: the server holds a socket per client connection
    workers = () if "--workers" in options else ("--workers", "1")
    process = subprocess.Popen(
        [sys.executable, "-m", "casframe.server", store_url, "--listen", "127.0.0.1:0",
         *workers, *options],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = _read_line(process, "casframe serve")
        assert line.startswith(f"casframe: serving {announces or store_url} on 127.0.0.1:"), line
        yield process, int(line.strip().rpartition(":")[2])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def stalled_streams(
    port: int, *, writes: int, reads: int, read_digest: tuple[str, int], channels: int = 8
) -> Iterator[subprocess.Popen[str]]:
    """A client process with ``writes`` ByteStream Writes that sent one chunk and stopped, and
    ``reads`` Reads of ``read_digest`` (hash, size) that took one chunk and stopped reading.

    Yields once every stream is under way at the server (each Write's chunk was sent, each
    Read's first chunk arrived); the streams stay stalled until the block ends.
    """
    process = subprocess.Popen(
        [sys.executable, __file__, str(port), str(writes), str(reads), read_digest[0],
         str(read_digest[1]), str(channels)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = _read_line(process, "the stalling client")
        assert line == f"stalled {writes} writes and {reads} reads\n", line
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- the stalling client process (this file run as a script) -----------------------------------


async def _stall(port: int, writes: int, reads: int, hash_: str, size: int, channels: int) -> None:
    import grpc

    from casframe._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

    options = [
        # No window growth: a stream that is not read stays blocked at the server.
        ("grpc.http2.bdp_probe", 0),
        # A connection of its own for each channel, not one shared by all of them.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
              for _ in range(channels)]
    stubs = [bytestream_pb2_grpc.ByteStreamStub(channel) for channel in opened]
    calls = []

    async def stall_write(index: int) -> None:
        call = stubs[index % channels].Write()
        calls.append(call)
        resource_name = f"uploads/stall-{index}/blobs/{'ab' * 32}/{1 << 20}"
        await call.write(bytestream_pb2.WriteRequest(
            resource_name=resource_name, write_offset=0, data=b"x" * 1024))

    async def stall_read(index: int) -> None:
        call = stubs[index % channels].Read(
            bytestream_pb2.ReadRequest(resource_name=f"blobs/{hash_}/{size}"))
        calls.append(call)
        await call.read()  # the first chunk: the server is streaming this Read

    await asyncio.gather(*(stall_write(i) for i in range(writes)),
                         *(stall_read(i) for i in range(reads)))
    print(f"stalled {writes} writes and {reads} reads", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until told
    for call in calls:
        call.cancel()
    for channel in opened:
        await channel.close()


if __name__ == "__main__":
    port_, writes_, reads_, hash_arg, size_, channels_ = sys.argv[1:7]
    raise_fd_limit(8192)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(_stall(int(port_), int(writes_), int(reads_), hash_arg, int(size_),
                       int(channels_)))
