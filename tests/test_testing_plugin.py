"""casframe's pytest plugin as a plugin author meets it: the ``cas_server`` fixture, and what
loading the plugin costs a test run that never uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from casframe import (
    BackendUnavailableError,
    ConfigError,
    Digest,
    PermissionDeniedError,
    Store,
    open_store,
)
from casframe.testing.server import CasServers

pytest_plugins = ["pytester"]


def test_cas_server_serves_a_store_to_the_grpc_backend(
    cas_server: CasServers, memory_store: Store, make_tree
) -> None:
    url = cas_server(memory_store)
    assert re.fullmatch(r"grpc://127\.0\.0\.1:\d+", url), url
    assert cas_server.servers[url].store is memory_store
    source = make_tree()
    with open_store(url) as remote:
        root = remote.import_directory(source)
        remote.set_ref("project/main", root)
        digest = remote.put_bytes(b"through the server")
    assert memory_store.read_bytes(digest) == b"through the server"
    assert memory_store.get_ref("project/main") == root


def test_cas_server_passes_settings_to_the_server(
    cas_server: CasServers, local_store: Store
) -> None:
    stored = local_store.put_bytes(b"already here")
    url = cas_server(local_store, read_only=True, instance_names=("main", "ci"))
    assert url.endswith("/main"), url
    assert cas_server.servers[url].settings.read_only
    with open_store(url) as remote:
        assert remote.read_bytes(stored) == b"already here"
        with pytest.raises(PermissionDeniedError, match="read-only"):
            remote.put_bytes(b"refused")
    assert local_store.find_missing([Digest.of_bytes(b"refused")])


def test_cas_server_serves_several_stores_at_once(
    cas_server: CasServers, memory_store: Store, local_store: Store
) -> None:
    first, second = cas_server(memory_store), cas_server(local_store)
    assert first != second
    with open_store(first) as a, open_store(second) as b:
        digest = a.put_bytes(b"only in the first")
        assert b.find_missing([digest]) == {digest}


def test_cas_server_listens_only_on_loopback(cas_server: CasServers, memory_store: Store) -> None:
    with pytest.raises(ConfigError, match="127.0.0.1"):
        cas_server(memory_store, listen="0.0.0.0:50051")
    assert cas_server.servers == {}


def test_servers_stop_before_the_served_store_is_torn_down(pytester: pytest.Pytester) -> None:
    """Whatever order a test asks for its fixtures in, its servers stop first, and they are
    gone once the test has ended."""
    urls = pytester.path / "urls.txt"
    pytester.makeconftest(
        """
        import pytest
        from casframe import open_store

        @pytest.fixture
        def watched_store():
            store = open_store("memory://")
            yield store
            assert store.server.wait(timeout=0), "a server still runs while its store closes"
            store.close()
        """
    )
    pytester.makepyfile(
        f"""
        def serve(cas_server, store):
            url = cas_server(store)
            store.server = cas_server.servers[url]
            assert not store.server.wait(timeout=0), "the server runs during the test"
            with open({str(urls)!r}, "a") as f:
                f.write(url + "\\n")

        def test_server_first(cas_server, watched_store):
            serve(cas_server, watched_store)

        def test_store_first(watched_store, cas_server):
            serve(cas_server, watched_store)
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    for url in urls.read_text().split():
        with pytest.raises(BackendUnavailableError, match="cannot reach"):
            open_store(f"{url}?timeout=2").close()


def test_loading_the_pytest_plugin_imports_no_grpc_boto3_or_moto(tmp_path: Path) -> None:
    """pytest loads the plugin (and its fixture modules) in every run of every project that
    has casframe installed: that must not import the heavy libraries the fixtures use."""
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    code = textwrap.dedent(
        """
        import sys
        import pytest

        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]])
        plugin = ("casframe.testing.plugin", "casframe.testing.s3", "casframe.testing.server")
        absent = [name for name in plugin if name not in sys.modules]
        assert not absent, f"not loaded by pytest: {absent}"
        heavy = sorted(
            name for name in sys.modules
            if name.split(".")[0] in ("grpc", "grpc_health", "boto3", "botocore", "moto")
            or name.startswith(("casframe._protos", "casframe.server.app"))
        )
        assert not heavy, f"imported by the plugin: {heavy}"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
