"""The settings of one casframe gRPC server, and the limits derived from them.

A :class:`ServerSettings` is what plugins receive as ``config`` in the
``casframe_server_interceptors`` hook, so its fields are part of the plugin API: add fields,
never rename them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from casframe.compression import DEFAULT_LEVEL, DEFAULT_MAX_WINDOW
from casframe.digest import CHUNK_SIZE
from casframe.errors import ConfigError

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_STREAM_IDLE_TIMEOUT",
    "DEFAULT_THREADS",
    "DEFAULT_WORKERS",
    "PemSource",
    "ServerSettings",
    "check_listen",
]

#: Where ``casframe serve`` listens unless told otherwise (the port Bazel users expect).
DEFAULT_LISTEN = "127.0.0.1:50051"
# gRPC's own default message limit: every client accepts replies this large without tuning.
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
# Threads for unary calls and for the store work of streams (a stream waiting on its client
# holds no thread). More than cores, because store work waits on disks and S3; 32 calls with
# 1 MiB chunks in hand stay far below the 150 MiB memory budget.
DEFAULT_THREADS = 32
#: The former name of DEFAULT_THREADS, from when ``--workers`` sized the thread pool.
DEFAULT_WORKERS = DEFAULT_THREADS
# Streaming calls (ByteStream Read and Write, GetTree) in progress at once. A stream waiting on
# its client costs a coroutine and at most about two chunks (2 MiB) of buffers, so 1,000 stalled
# streams cost the server at most ~2 GiB while ordinary calls keep being answered; a team's
# Bazel clients (each up to a few hundred parallel transfers) fit under it.
DEFAULT_MAX_STREAMS = 1000
# Seconds a stream may go without progress (no message received, or none taken by a reading
# client). Bazel's own --remote_timeout defaults to 60 s, so a healthy client never waits this
# long between two messages; a stalled one is told UNAVAILABLE, which REAPI clients retry.
DEFAULT_STREAM_IDLE_TIMEOUT = 60.0
# Room kept in a batch message for per-blob framing (~90 bytes a blob: 1 MiB covers over
# 11,000 blobs), since clients count only the blob bytes against max_batch_total_size_bytes.
_BATCH_FRAMING_BYTES = 1 << 20
# Smallest message limit accepted: a 1 MiB ByteStream chunk and its framing must fit.
_MIN_MESSAGE_BYTES = CHUNK_SIZE + (64 << 10)

# zstd's smallest window (1 KiB, window log 10) and its highest standard level.
_MIN_ZSTD_WINDOW = 1 << 10
_MAX_ZSTD_LEVEL = 19

#: A PEM certificate or key: a path to read, or the PEM bytes themselves.
PemSource = str | os.PathLike[str] | bytes

_MAX_PORT = 65535


def check_listen(listen: str) -> str:
    """``listen`` when it is ``HOST:PORT`` with a port from 0 to 65535 (or a ``unix:`` path);
    else :class:`ConfigError`. gRPC itself takes a port past 65535 and serves on another."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return listen
    host, colon, port = listen.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > _MAX_PORT:
        raise ConfigError(
            f"listen address {listen!r} is not HOST:PORT with a port from 0 to {_MAX_PORT}"
        )
    return listen


@dataclass(frozen=True)
class ServerSettings:
    """Everything that shapes one server; passed to plugins as ``config``.

    ``store_url`` is informational (the store is opened by the caller). TLS fields hold paths
    or PEM bytes; ``tls_client_ca`` switches on mutual TLS. ``upload_expiry`` (seconds) and
    ``max_partial_uploads`` bound the interrupted ByteStream uploads kept for resumption;
    ``max_streams`` the streaming calls in progress, and ``stream_idle_timeout`` (seconds) how
    long one may wait on its client. ``max_workers`` is the size of the thread pool
    (``--threads``; named after :class:`~concurrent.futures.ThreadPoolExecutor`'s argument).
    ``worker_index`` (0 to ``worker_count - 1``) says which of the processes of
    ``casframe serve --workers N`` this server is: plugins that open something of their own
    per process (a metrics port, a log file) tell the workers apart by it; a server not
    started by ``--workers`` is worker 0 of 1.
    ``zstd_max_window_bytes`` is the largest decoding window a
    zstd-compressed upload may ask for (the memory its decoder holds), ``zstd_level`` the level
    of what the server sends compressed.
    """

    store_url: str = ""
    listen: str = "127.0.0.1:0"
    instance_names: tuple[str, ...] = ("",)
    read_only: bool = False
    tls_cert: PemSource | None = None
    tls_key: PemSource | None = None
    tls_client_ca: PemSource | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_workers: int = DEFAULT_WORKERS
    upload_expiry: float = 15 * 60.0
    max_partial_uploads: int = 256
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    worker_index: int = 0
    worker_count: int = 1
    zstd_max_window_bytes: int = DEFAULT_MAX_WINDOW
    zstd_level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        check_listen(self.listen)
        if self.max_message_bytes < _MIN_MESSAGE_BYTES:
            raise ConfigError(
                f"max message size {self.max_message_bytes} is too small: "
                f"at least {_MIN_MESSAGE_BYTES} bytes"
            )
        if self.max_workers < 1:
            raise ConfigError(f"threads must be at least 1, got {self.max_workers}")
        if not 0 <= self.worker_index < self.worker_count:
            raise ConfigError(
                f"worker index {self.worker_index} is not between 0 and "
                f"{self.worker_count - 1} (worker count {self.worker_count})"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key")
        if self.upload_expiry <= 0 or self.max_partial_uploads < 1:
            raise ConfigError("upload_expiry and max_partial_uploads must be positive")
        if self.max_streams < 1:
            raise ConfigError(f"max streams must be at least 1, got {self.max_streams}")
        if self.zstd_max_window_bytes < _MIN_ZSTD_WINDOW:
            raise ConfigError(
                f"zstd max window {self.zstd_max_window_bytes} is too small: at least "
                f"{_MIN_ZSTD_WINDOW} bytes (zstd's smallest window)"
            )
        if not 1 <= self.zstd_level <= _MAX_ZSTD_LEVEL:
            raise ConfigError(
                f"zstd level must be from 1 to {_MAX_ZSTD_LEVEL}, got {self.zstd_level}"
            )
        if not self.stream_idle_timeout > 0:
            raise ConfigError(
                f"stream idle timeout must be positive, got {self.stream_idle_timeout}"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def max_batch_total_size_bytes(self) -> int:
        """The blob bytes one batch call may carry (advertised in GetCapabilities)."""
        return max(
            self.max_message_bytes // 2, self.max_message_bytes - _BATCH_FRAMING_BYTES
        )

    @property
    def read_chunk_bytes(self) -> int:
        """Payload of one ByteStream ``ReadResponse``."""
        return min(CHUNK_SIZE, self.max_message_bytes - (64 << 10))
