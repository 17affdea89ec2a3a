"""Bazel as a real REAPI client: a small genrule workspace, a build, and what Bazel reports.

Shared by the tests that point Bazel at ``casframe serve`` (``test_bazel.py``,
``test_ops_recipe.py``). The ``bazel`` fixture (``conftest.py``) gives the executable.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prereqs import PREREQS

__all__ = [
    "ACTIONS", "BUILD_FILE", "build", "process_summary", "startup_options", "write_workspace"
]

# Bazel's own user root (its unpacked install base, shared by every build) lives with the
# other prerequisites, not in ~/.cache/bazel; each build still gets an output base of its own.
USER_ROOT = PREREQS / "bazel"


def startup_options(output_base: Path) -> list[str]:
    """Bazel's startup options for a batch build in a fresh ``output_base``."""
    return ["--batch", f"--output_user_root={USER_ROOT}", f"--output_base={output_base}"]

BUILD_FILE = """\
genrule(name = "greeting", outs = ["greeting.txt"], cmd = "echo hello from bazel > $@")
genrule(
    name = "twice",
    srcs = [":greeting"],
    outs = ["twice.txt"],
    cmd = "cat $(location :greeting) $(location :greeting) > $@",
)
genrule(
    name = "count",
    srcs = [":twice"],
    outs = ["count.txt"],
    cmd = "wc -c < $(location :twice) > $@",
)
genrule(
    name = "tool",
    outs = ["tool.sh"],
    cmd = "printf '#!/bin/sh\\\\necho tool\\\\n' > $@ && chmod +x $@",
    executable = True,
)
"""

ACTIONS = 4  # one per genrule above


def write_workspace(path: Path) -> Path:
    """Create the workspace (``WORKSPACE`` and ``BUILD``) at ``path``, which must not exist."""
    path.mkdir()
    (path / "WORKSPACE").write_text("")
    (path / "BUILD").write_text(BUILD_FILE)
    return path


def build(bazel: str, workspace: Path, output_base: Path, cache_url: str | None = None) -> str:
    """Build every target of ``workspace`` in a batch-mode Bazel whose output base is
    ``output_base`` (a new one is a fresh output base); return Bazel's log (stderr).

    ``cache_url`` is passed as ``--remote_cache``; without it, the workspace's ``.bazelrc``
    must name the cache.
    """
    remote = [f"--remote_cache={cache_url}"] if cache_url is not None else []
    result = subprocess.run(
        [
            bazel,
            *startup_options(output_base),
            "build",
            "//:all",
            *remote,
            "--remote_timeout=60",
            "--noshow_progress",
            "--spawn_strategy=local",
        ],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def process_summary(log: str) -> str:
    """What Bazel's log says about where the build's processes ran, e.g.
    ``4 remote cache hit`` or ``1 internal, 4 local``."""
    match = re.search(r"INFO: (\d+) process(?:es)?: ([^\n]*)", log)
    assert match, log[-2000:]
    return match.group(2)
