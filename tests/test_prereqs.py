"""``scripts/test-prereqs``: one explicit, idempotent step installs the tests' peers, and the
tests themselves install nothing.

The script runs here with stand-ins for ``id``, ``sudo``, ``dpkg-query`` and ``apt-get`` first
on PATH, each recording how it was called, so that what it would do to the machine is seen
without doing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import prereqs
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test-prereqs"

_STAND_IN = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
{body}
"""


class Machine:
    """A copy of the script with one part, run against stand-in system commands."""

    def __init__(self, root: Path, *, uid: int, sudo: bool, installed: set[str]) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        scripts = root / "scripts"
        (scripts / "test-prereqs.d").mkdir(parents=True)
        shutil.copy(SCRIPT, scripts / "test-prereqs")
        (scripts / "test-prereqs.d" / "10-debian.sh").write_text(
            "prereqs_apt_install bazel-bootstrap awscli\n"
        )
        self.calls = root / "calls"
        self.calls.touch()
        status = " ".join(sorted(installed))
        self._stand_in("id", f"echo {uid}")
        self._stand_in(
            "dpkg-query",
            # The last argument is the package; "installed" ones answer like dpkg does.
            f'for p in {status}; do eval last=\\${{$#}}; [ "$p" = "$last" ] && '
            "printf 'install ok installed' && exit 0; done; exit 1",
        )
        self._stand_in("apt-get", "exit 0")
        self._stand_in("sudo", "exit 0" if sudo else "exit 1")

    def _stand_in(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(_STAND_IN.format(body=body))
        path.chmod(0o755)

    def run(self) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "CALLS": str(self.calls),
            "CASFRAME_PREREQS": str(self.root / "prereqs"),
        }
        return subprocess.run(
            ["bash", str(self.root / "scripts" / "test-prereqs")],
            env=env, capture_output=True, text=True, timeout=120,
        )

    def commands(self, name: str) -> list[str]:
        return [c for c in self.calls.read_text().splitlines() if c.split()[0] == name]


def test_nothing_is_installed_when_everything_is_there(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=0, sudo=False, installed={"bazel-bootstrap", "awscli"})
    result = machine.run()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert machine.commands("apt-get") == []
    assert (tmp_path / "prereqs").is_dir()  # the documented cache place exists


def test_a_missing_package_is_installed_waiting_for_the_package_lock(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=0, sudo=False, installed={"bazel-bootstrap"})
    result = machine.run()
    assert result.returncode == 0, result.stderr
    assert "installing Debian packages: awscli" in result.stderr
    lock = "-q -o DPkg::Lock::Timeout=600"
    assert machine.commands("apt-get") == [
        f"apt-get {lock} update",
        f"apt-get {lock} install -y --no-install-recommends awscli",
    ]
    assert machine.commands("sudo") == []


def test_a_user_goes_through_sudo(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=1000, sudo=True, installed=set())
    result = machine.run()
    assert result.returncode == 0, result.stderr
    sudo = machine.commands("sudo")
    assert sudo[0] == "sudo -n true"
    assert any("apt-get" in c and "install" in c and "bazel-bootstrap awscli" in c for c in sudo)


def test_without_root_or_sudo_it_says_what_it_needs(tmp_path: Path) -> None:
    machine = Machine(tmp_path, uid=1000, sudo=False, installed={"awscli"})
    result = machine.run()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "test-prereqs: installing bazel-bootstrap needs root or password-less sudo (sudo -n); "
        "run scripts/test-prereqs as root, or install it yourself: apt-get install "
        "bazel-bootstrap"
    )
    assert machine.commands("apt-get") == []


def test_a_missing_tool_names_the_command_that_installs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        prereqs.tool("casframe-no-such-tool", "casframe-no-such-package")
    assert str(failed.value) == (
        "casframe-no-such-tool (Debian's casframe-no-such-package) is missing: "
        "run scripts/test-prereqs (or make prereqs) to install it"
    )


def test_a_missing_tool_in_ci_is_a_broken_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        prereqs.tool("casframe-no-such-tool", "casframe-no-such-package")
    assert str(failed.value) == (
        "casframe-no-such-tool (Debian's casframe-no-such-package) is missing on this CI "
        "machine: its set-up must run scripts/test-prereqs before the tests"
    )

