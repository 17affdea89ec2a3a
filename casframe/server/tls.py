"""Checking a server's TLS certificate and key before serving with them.

grpcio accepts any certificate and key when the server starts and fails each handshake later,
so a key that does not belong to its certificate would give a server that runs and that no
client can reach. OpenSSL, through the standard library's :mod:`ssl`, loads the pair here
instead, and a bad pair is a :class:`~casframe.errors.ConfigError` that says what is wrong.

PEM bytes given as such reach OpenSSL through an anonymous in-memory file on Linux; elsewhere
through a file only its owner can read, in a private temporary folder removed at once.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from casframe.errors import ConfigError
from casframe.server.settings import PemSource

__all__ = ["check_key_pair", "read_pem"]


def read_pem(source: PemSource, what: str) -> bytes:
    """The PEM bytes of ``source`` (a path or the bytes themselves)."""
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS {what} {source}: {exc.strerror or exc}") from None


def _describe(source: PemSource, what: str) -> str:
    return f"TLS {what} (PEM bytes)" if isinstance(source, bytes) else f"TLS {what} {source}"


@contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``, in memory where the system allows."""
    if not hasattr(os, "memfd_create"):  # not Linux
        with tempfile.TemporaryDirectory(prefix="casframe-tls-") as folder:  # mode 0700
            path = os.path.join(folder, "pem")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
            yield path
        return
    fd = os.memfd_create("casframe-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def check_key_pair(cert: PemSource, key: PemSource) -> None:
    """Raise :class:`ConfigError` unless ``key`` is an unencrypted private key that belongs to
    the certificate ``cert`` (both PEM)."""
    cert_name, key_name = _describe(cert, "certificate"), _describe(key, "key")

    def refuse_password() -> bytes:
        raise ConfigError(f"{key_name} is encrypted; casframe serve needs an unencrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _in_memory_file(read_pem(cert, "certificate")) as cert_path, \
            _in_memory_file(read_pem(key, "key")) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path, password=refuse_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(
                    f"{key_name} does not match the certificate in {cert_name}: "
                    "give the private key that the certificate was issued for"
                ) from None
            raise ConfigError(
                f"cannot use {cert_name} with {key_name}: {exc.reason or exc} "
                "(both must be PEM: the certificate chain and its unencrypted private key)"
            ) from None
