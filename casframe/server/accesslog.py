"""The access log: one JSON line per call the server answered (``casframe serve
--access-log PATH|-``).

:class:`AccessLog` is a call sink (:mod:`casframe.server.observe`). A call that ends puts its
record in a queue; a thread of the log's own turns records into JSON and writes them through a
logging handler, so a slow disk never holds the event loop or a call's thread. A file is
written by :class:`~logging.handlers.WatchedFileHandler`, so logrotate can move it away (a new
file is opened at the next write).

The fields are documented in docs/server.md. This module must never write a secret or a
server-side location: no request metadata (authorization headers, tokens), no store URL or
path, no Remote Asset URI (they may carry credentials); only names and digests the client
sent, counts and the status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from casframe.server.names import parse_read_resource, parse_write_resource
from casframe.server.observe import CallRecord

__all__ = ["AccessLog", "access_fields"]

_BYTESTREAM = "/google.bytestream.ByteStream/"
# One encoder for every line: json.dumps with options would build a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


# The request field naming what a call concerned, by method name: a digest, or a list whose
# length is logged as ``blobs``. Remote Asset Fetch is left out: its URIs may hold credentials.
_DIGEST_FIELDS = {
    "GetActionResult": "action_digest",
    "UpdateActionResult": "action_digest",
    "GetTree": "root_digest",
    "PushBlob": "blob_digest",
    "PushDirectory": "root_directory_digest",
    "UpdateReference": "digest",
}
_LIST_FIELDS = {
    "FindMissingBlobs": "blob_digests",
    "BatchReadBlobs": "digests",
    "BatchUpdateBlobs": "requests",
}


def _resource(call: CallRecord) -> tuple[str, str | None, int | None]:
    """The instance name, the digest or resource the call concerned (or None) and how many
    blobs it named (batch calls; else None), from its request."""
    request = call.request
    if request is None:  # refused before any request arrived
        return "", None, None
    name = call.name
    if call.method.startswith(_BYTESTREAM):
        resource = request.resource_name
        try:
            parsed = (
                parse_read_resource(resource) if name == "Read"
                else parse_write_resource(resource)
            )
        except Exception:  # noqa: BLE001 - a bad name is still logged, as sent
            return "", resource, None
        return parsed.instance, resource, None
    instance = getattr(request, "instance_name", "")
    if name in _DIGEST_FIELDS:
        digest = getattr(request, _DIGEST_FIELDS[name])
        return instance, f"{digest.hash}/{digest.size_bytes}", None
    if name in _LIST_FIELDS:
        return instance, None, len(getattr(request, _LIST_FIELDS[name]))
    if name == "GetReference":  # BuildStream's ReferenceStorage
        return instance, request.key, None
    return instance, None, None


def access_fields(call: CallRecord) -> dict[str, Any]:
    """The fields of ``call``'s access-log line (docs/server.md lists them), ``time`` still
    as seconds since the epoch: :func:`_line` writes it out. Nothing of the call's messages is
    kept, so a queue of these holds no blob."""
    assert call.code is not None
    instance, resource, blobs = _resource(call)
    fields: dict[str, Any] = {
        "time": call.time,
        "peer": call.peer,
        "instance": instance,
        "method": call.method,
        "status": call.code.name,
        "duration_ms": round(call.duration * 1000, 3),
        "bytes_in": call.bytes_in,
        "bytes_out": call.bytes_out,
    }
    if resource is not None:
        fields["resource"] = resource
    if blobs is not None:
        fields["blobs"] = blobs
    return fields


def _line(fields: dict[str, Any]) -> str:
    """One JSON line, with ``time`` in UTC, ISO 8601, to the millisecond."""
    moment = datetime.fromtimestamp(fields["time"], UTC).isoformat(timespec="milliseconds")
    fields["time"] = moment.replace("+00:00", "Z")
    return _ENCODER.encode(fields)


class _Lines(logging.Formatter):
    """The record's message is the finished text (several JSON lines at once)."""

    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


# Calls written at most in one write: bounds the text held at once while a backlog drains.
_BATCH = 512
# Seconds the writer waits after a line arrives for more to write with it. Each wake-up of
# the writer takes the interpreter lock from the calls; a line reaches the file this much later.
_LINGER = 0.05
_STOP = object()


class AccessLog:
    """A call sink writing one JSON line per call to ``target``: a file path (appended to,
    created if missing) or ``-`` for standard error. Use :meth:`open` as a context manager;
    closing writes every queued line.

    A call only puts its fields in a queue; the writer thread makes the JSON and hands
    whatever has queued up to the logging handler as one write, so a busy server writes in
    batches rather than a line per call. While the file cannot take them, lines wait in
    memory (a few hundred bytes each).
    """

    def __init__(self, target: str) -> None:
        self.target = target
        handler: logging.Handler
        if target == "-":
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
        handler.setFormatter(_Lines())
        self._handler = handler
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write, name="casframe-access-log", daemon=True
        )

    @classmethod
    @contextlib.contextmanager
    def open(cls, target: str) -> Iterator[AccessLog]:
        access_log = cls(target)
        access_log._writer.start()
        try:
            yield access_log
        finally:
            access_log.close()

    def close(self) -> None:
        """Write what is queued, then close the file."""
        if self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join()
        self._handler.close()

    def _write(self) -> None:
        while True:
            calls = [self._queue.get()]
            if calls[0] is not _STOP:
                # Let a busy server's lines gather: one wake-up and one write for many calls.
                time.sleep(_LINGER)
            while len(calls) < _BATCH and not self._queue.empty():
                calls.append(self._queue.get())
            stop = any(fields is _STOP for fields in calls)
            lines = [_line(fields) for fields in calls if fields is not _STOP]
            if lines:
                self._handler.handle(logging.makeLogRecord({"msg": "\n".join(lines)}))
            if stop:
                return

    def enabled(self) -> bool:
        return True

    def call_started(self, call: CallRecord) -> None:
        pass

    def call_ended(self, call: CallRecord) -> None:
        self._queue.put(access_fields(call))
