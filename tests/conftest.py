"""Fixtures casframe's own tests need: peers outside Python (Bazel, the AWS CLI), installed
beforehand by ``scripts/test-prereqs`` (see ``prereqs.py``), and an
environment that keeps the command line's user directories inside the test's tmp_path.

Store fixtures come from the shipped pytest plugin (``casframe.testing.plugin``, loaded through
its ``pytest11`` entry point), used exactly as a third-party backend's tests would use them.
"""

from collections.abc import Iterator
from pathlib import Path

import prereqs
import pytest


@pytest.fixture(scope="session")
def bazel() -> str:
    """Bazel, a real REAPI client (Debian's bazel-bootstrap)."""
    return prereqs.tool("bazel", "bazel-bootstrap")


@pytest.fixture(scope="session")
def aws_cli() -> str:
    """The AWS CLI, to check that S3 tools and casframe read each other's layout."""
    return prereqs.tool("aws", "awscli")


@pytest.fixture(scope="session")
def prometheus() -> str:
    """The Prometheus server (Debian's prometheus), to scrape ``casframe serve``."""
    return prereqs.tool("prometheus", "prometheus")


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' checker of configurations and rules (in Debian's prometheus)."""
    return prereqs.tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def pushgateway() -> str:
    """Prometheus' Pushgateway (Debian's prometheus-pushgateway), for batch-job metrics."""
    return prereqs.tool("prometheus-pushgateway", "prometheus-pushgateway")


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every user directory into tmp_path so nothing is read or written outside it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CASFRAME_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("CASFRAME_CONFIG", raising=False)
    monkeypatch.delenv("CASFRAME_STAT_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _stat_cache_in_the_session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Imports keep their stat cache, and commands the entry points they found, in the
    session's temp folder, not in the user's cache.

    Session-scoped, so that it also covers imports made by module- and session-scoped
    fixtures; subprocesses inherit it.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASFRAME_STAT_CACHE", str(tmp_path_factory.mktemp("stat-cache")))
        patch.setenv("CASFRAME_ENTRY_POINT_CACHE", str(tmp_path_factory.mktemp("entry-points")))
        yield
