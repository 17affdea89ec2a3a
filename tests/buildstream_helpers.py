"""BuildStream's own clients (1.4.3, 1.6.9, 2.8.1) as users of ``casframe serve``.

The clients live in virtual environments that ``scripts/test-prereqs`` (its part
``scripts/test-prereqs.d/50-buildstream.sh``) installs under
``${CASFRAME_PREREQS:-~/.cache/casframe-prereqs}``. A missing client fails the test, never skips
it. Each :class:`Machine` is one BuildStream user: its own cache, config and data directories,
so a new machine starts with nothing cached.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from prereqs import PREREQS, missing

__all__ = [
    "GENERATIONS",
    "Machine",
    "Project",
    "bst_executable",
    "queue_counts",
    "snapshot",
    "user_config",
    "write_files",
    "write_project",
]

#: The BuildStream releases tested, by the name of their virtual environment's directory.
GENERATIONS = ("1.4.3", "1.6.9", "2.8.1")

# Generous: a hang guard only. A small element builds in seconds.
_BST_TIMEOUT = 600


def bst_executable(version: str) -> Path:
    """The ``bst`` of BuildStream ``version``; fails the test when it is not installed."""
    venv = PREREQS / f"buildstream-{version}"
    bst = venv / "bin" / "bst"
    if not (venv / ".casframe-installed").is_file() or not bst.is_file():
        missing(f"BuildStream {version} (a virtualenv at {venv})")
    return bst


def write_files(root: Path, seed: str) -> Path:
    """A small tree with what a checkout must reproduce exactly: regular and executable files,
    an empty file, a nested directory and a relative symlink. ``seed`` varies the content."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_text(f"hello from {seed}\n")
    (root / "run.sh").write_text(f"#!/bin/sh\necho {seed}\n")
    (root / "run.sh").chmod(0o755)
    (root / "sub" / "empty").write_bytes(b"")
    (root / "sub" / "deeper" / "data.bin").write_bytes(os.urandom(64 << 10))
    (root / "sub" / "link").symlink_to("../hello.txt")
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
        elif path.is_file() and not path.is_symlink() and path.name != "run.sh":
            path.chmod(0o644)
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under ``root``: its kind, its permission bits (files) and its content or
    symlink target, byte for byte."""
    entries: dict[str, tuple[str, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            entries[relative] = ("symlink", 0, os.readlink(path).encode())
        elif stat.S_ISDIR(info.st_mode):
            entries[relative] = ("dir", 0, b"")
        else:
            entries[relative] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return entries


@dataclass
class Project:
    """A BuildStream project of ``import`` elements, one per entry of ``elements``."""

    path: Path
    generation: str
    origin: Path  # where tar sources are served from (2.x)


def write_project(path: Path, generation: str, elements: dict[str, Path]) -> Project:
    """Write a project for ``generation`` whose element ``NAME.bst`` imports ``elements[NAME]``.

    1.x elements use a ``local`` source. 2.x elements use a ``tar`` source served from a
    ``file://`` origin next to the project, so that their files reach BuildStream's store only
    by fetching or pulling, and the origin can be taken away.
    """
    origin = path.parent / f"{path.name}-origin"
    (path / "elements").mkdir(parents=True)
    origin.mkdir()
    name = path.name
    if generation.startswith("1."):
        (path / "project.conf").write_text(f"name: {name}\nelement-path: elements\n")
    else:
        (path / "project.conf").write_text(
            f"name: {name}\nmin-version: 2.0\nelement-path: elements\n"
            f"aliases:\n  origin: {origin.as_uri()}/\n"
        )
    for element, files in elements.items():
        if generation.startswith("1."):
            local = path / "files" / element
            shutil.copytree(files, local, symlinks=True)
            source = f"- kind: local\n  path: files/{element}\n"
        else:
            tarball = origin / f"{element}.tar"
            with tarfile.open(tarball, "w") as archive:
                archive.add(files, arcname=element)
            digest = _sha256(tarball)
            source = f"- kind: tar\n  url: origin:{element}.tar\n  ref: {digest}\n"
        (path / "elements" / f"{element}.bst").write_text(f"kind: import\nsources:\n{source}")
    return Project(path, generation, origin)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_config(generation: str, url: str, *, push: bool = True, artifacts: bool = True,
                sources: bool = False, tls: dict[str, Path] | None = None) -> str:
    """BuildStream user configuration naming ``url`` as artifact and/or source cache.

    ``tls`` maps BuildStream's TLS keys (``server-cert``, ``client-cert``, ``client-key``) to
    PEM files, for an ``https://`` URL.
    """
    flag = "true" if push else "false"
    tls_items = sorted((tls or {}).items())
    if generation.startswith("1."):
        lines = [f"  {key}: {path}" for key, path in tls_items]
        return "\n".join(["artifacts:", f"  url: {url}", f"  push: {flag}", *lines]) + "\n"
    server = [f"  - url: {url}", f"    push: {flag}"]
    if tls_items:
        server += ["    auth:", *(f"      {key}: {path}" for key, path in tls_items)]
    text = ""
    if artifacts:
        text += "\n".join(["artifacts:", "  servers:", *server]) + "\n"
    if sources:
        text += "\n".join(["source-caches:", "  servers:", *server]) + "\n"
    return text


class Machine:
    """One BuildStream user: a client version and its own, initially empty, caches."""

    def __init__(self, root: Path, version: str) -> None:
        self.root = root
        self.version = version
        self.bst = bst_executable(version)
        root.mkdir(parents=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "BST_"))}
        env.update(
            HOME=str(self.root / "home"),
            XDG_CACHE_HOME=str(self.root / "cache"),
            XDG_CONFIG_HOME=str(self.root / "config"),
            XDG_DATA_HOME=str(self.root / "data"),
        )
        return env

    def run(self, project: Project, config: str, *args: str) -> str:
        """Run ``bst ARGS`` in ``project`` with user configuration ``config``; return the log
        (stdout and stderr), failing the test with its tail if bst fails."""
        conf = self.root / "user.conf"
        conf.write_text(config)
        result = subprocess.run(
            [str(self.bst), "--no-interactive", "--no-colors", "-c", str(conf), *args],
            cwd=project.path, env=self.env(), capture_output=True, text=True,
            timeout=_BST_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"bst {' '.join(args)} failed:\n{log[-6000:]}"
        return log

    def build(self, project: Project, config: str, element: str) -> dict[str, tuple[int, int]]:
        """Build ``element``; return its queue counts (see :func:`queue_counts`)."""
        return queue_counts(self.run(project, config, "build", f"{element}.bst"))

    def checkout(self, project: Project, config: str, element: str, dest: Path) -> Path:
        if self.version.startswith("1."):
            self.run(project, config, "checkout", f"{element}.bst", str(dest))
        else:
            self.run(project, config, "artifact", "checkout", f"{element}.bst",
                     "--directory", str(dest))
        return dest

    def wipe(self) -> None:
        """Forget everything this machine cached locally."""
        shutil.rmtree(self.root / "cache", ignore_errors=True)


_QUEUE = re.compile(r"^\s*([\w-]+) Queue:\s+processed (\d+), skipped (\d+), failed (\d+)", re.M)


def queue_counts(log: str) -> dict[str, tuple[int, int]]:
    """From bst's pipeline summary: queue name (``Pull``, ``Build``, ``Push``, ``Fetch``,
    ``Src-push``) → (processed, skipped). A failed element fails the test."""
    counts = {}
    for name, processed, skipped, failed in _QUEUE.findall(log):
        assert failed == "0", f"{name} queue failed:\n{log[-6000:]}"
        counts[name] = (int(processed), int(skipped))
    assert counts, f"no pipeline summary in bst's output:\n{log[-6000:]}"
    return counts
