"""What the hostile suites share: tmpfs mounts, ``casframe serve`` in a process of its own, and
a process that may not write a store of another user.

Mounting needs root, as the suite has wherever it runs (CI included); a test that cannot mount
fails, it is never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from server_processes import ClientStubs

# Run a command as root without any capability: it then has exactly the rights of uid 0 on
# files, and none on files of another user (no CAP_DAC_OVERRIDE, no CAP_FOWNER). Unlike a
# switch to another uid, the interpreter and the checkout stay readable wherever they live.
WITHOUT_PRIVILEGES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
# The owner given to a store that the unprivileged process must not be able to write.
OTHER_UID = OTHER_GID = 65534  # nobody

# A hang guard only: a server prints its address within a second or two.
_START_TIMEOUT = 60.0


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (``mount -o size=``) mounted at ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    """Remount ``path`` ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill_up(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system is full; return that file."""
    filler = folder / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC, nothing else
    # Smaller writes may still find room in a partly used block: fill those too.
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return filler


@dataclass
class ServerProcess(ClientStubs):
    """``casframe serve`` running in a process of its own, with a channel and every stub."""

    process: subprocess.Popen[str]
    address: str

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.attach_stubs(self.channel)

    def stop(self) -> str:
        """Stop the server; return what it logged."""
        self.channel.close()
        self.process.terminate()
        try:
            _, log = self.process.communicate(timeout=_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, log = self.process.communicate()
        return log


@contextmanager
def serve_process(
    store_url: str, *options: str, prefix: Sequence[str] = ()
) -> Iterator[ServerProcess]:
    """Run ``casframe serve STORE_URL OPTIONS`` on a free loopback port for the block.

    ``prefix`` runs it through another command (:data:`WITHOUT_PRIVILEGES`).
    """
    command = [*prefix, sys.executable, "-m", "casframe.server", store_url,
               "--listen", "127.0.0.1:0", *options]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        if " on " not in line:
            process.kill()
            _, log = process.communicate(timeout=_START_TIMEOUT)
            raise AssertionError(f"casframe serve did not start: {line!r} {log}")
        server = ServerProcess(process, line.rsplit(" on ", 1)[1].strip())
        try:
            yield server
        finally:
            server.stop()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
