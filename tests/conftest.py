"""Fixtures for peers outside Python that casframe's own tests need (Bazel).

Store fixtures come from the shipped pytest plugin (``casframe.testing.plugin``, loaded through
its ``pytest11`` entry point), used exactly as a third-party backend's tests would use them.
"""

import os
import shutil
import subprocess

import pytest


def _install_bazel() -> str:
    found = shutil.which("bazel")
    if found:
        return found
    command = ["apt-get", "install", "-y", "-q", "bazel-bootstrap"]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run([*command[:-4], "update", "-q"], env=env, capture_output=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    found = shutil.which("bazel")
    if result.returncode != 0 or not found:
        pytest.fail(
            "could not install Debian's bazel-bootstrap for the Bazel tests:\n"
            f"{update.stderr!r}\n{result.stdout}\n{result.stderr}"
        )
    return found


@pytest.fixture(scope="session")
def bazel() -> str:
    return _install_bazel()
