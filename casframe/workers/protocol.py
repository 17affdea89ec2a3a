"""The pipe protocol between casframe and its helper processes.

A message is an 8-byte little-endian length followed by that many bytes of pickle. Both ends
are casframe itself, started by the same interpreter, so pickle is a trusted format here; it
is never read from anywhere else. The parent sends ``(task, payload)``; the helper answers
each request, in order, with ``(True, result)`` or ``(False, error)``.

An error crosses the pipe as a plain description (:func:`describe_error`) and is raised again
in the parent as the same type with the same message (:func:`rebuild_error`): casframe's own
errors keep their attributes, ``OSError`` keeps its ``errno`` and file names. Any other
exception, which would be a bug, arrives as a :class:`~casframe.errors.WorkerError` naming
its type. What this module must never do: import anything that runs tasks, or raise in the
parent an exception class that the helper named but that is not casframe's or Python's own.
"""

from __future__ import annotations

import builtins
import pickle
import struct
from typing import IO, Any

from casframe import errors
from casframe.errors import WorkerError

__all__ = ["ErrorInfo", "describe_error", "read_message", "rebuild_error", "write_message"]

_LENGTH = struct.Struct("<Q")

#: ``(module, class name, message, attributes, OSError arguments or None)``
ErrorInfo = tuple[str, str, str, dict[str, Any], tuple[Any, ...] | None]


def write_message(stream: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_message(stream: IO[bytes]) -> Any:
    """The next message, or raise :class:`EOFError` when the other end has closed the pipe
    (between messages or in the middle of one)."""
    header = _read_exactly(stream, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(_read_exactly(stream, length))


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError("pipe closed")
    return data


def describe_error(exc: BaseException) -> ErrorInfo:
    """What the parent needs to raise ``exc`` again: type, message and attributes."""
    cls = type(exc)
    oserror = None
    if isinstance(exc, OSError):
        oserror = (exc.errno, exc.strerror, exc.filename, None, exc.filename2)
    attributes = {}
    for name, value in vars(exc).items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - an attribute that cannot cross is left behind
            continue
        attributes[name] = value
    return cls.__module__, cls.__qualname__, str(exc), attributes, oserror


def rebuild_error(info: ErrorInfo) -> BaseException:
    """The exception :func:`describe_error` described, as an instance of the same class when
    that class is casframe's or one of Python's built-in ones."""
    module, name, message, attributes, oserror = info
    cls = _known_class(module, name)
    if cls is None:
        return WorkerError(f"helper process failed: {name}: {message}")
    if oserror is not None and issubclass(cls, OSError):
        errno_, strerror, filename, _, filename2 = oserror
        if errno_ is None:
            exc: BaseException = cls(message)
        else:
            exc = cls(errno_, strerror, filename, None, filename2)
    else:
        exc = cls.__new__(cls)
        BaseException.__init__(exc, message)
    for key, value in attributes.items():
        try:
            setattr(exc, key, value)
        except AttributeError:
            continue
    return exc


def _known_class(module: str, name: str) -> type[BaseException] | None:
    namespace = {"builtins": builtins, "casframe.errors": errors}.get(module)
    cls = getattr(namespace, name, None) if namespace is not None else None
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls
    return None
