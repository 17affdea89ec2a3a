"""Every hook through the example plugin docs/hooks.md gives for it, run as a real plugin.

Each example is loaded as a module from the page itself, registered with the plugin manager, and
exercised the way a user meets it: a store URL opened, a ``casframe`` command run, a request sent
to a running server. So the reference cannot drift from what the hooks really do, and a new hook
without a working example fails here.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_docs import hook_example, hook_names

import casframe
from casframe import InvalidNameError, PermissionDeniedError, Store, open_store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from casframe.cli import make_cli
from casframe.plugins import reset_plugin_manager
from casframe.testing import TREE_FILES
from casframe.testing.server import CasServers
from casframe.units import format_size


def load_example(hook: str) -> types.ModuleType:
    """The example plugin of ``hook`` in docs/hooks.md, as a module."""
    code = hook_example(hook)
    assert code, f"docs/hooks.md has no example plugin for {hook}"
    module = types.ModuleType(f"hooks_md_{hook}")
    exec(compile(code, f"docs/hooks.md ({hook} example)", "exec"), module.__dict__)
    return module


@pytest.fixture
def plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A plugin manager built from the default switches, and rebuilt after the test."""
    monkeypatch.delenv("CASFRAME_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("CASFRAME_BLOCK_PLUGINS", raising=False)
    reset_plugin_manager()
    try:
        yield
    finally:
        reset_plugin_manager()


# -- one check per hook -------------------------------------------------------------------------


def check_register_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **_: object) -> None:
    monkeypatch.chdir(tmp_path)
    plugin = load_example("casframe_register_backends")
    with casframe.registered_plugin(plugin, "workspace"):
        schemes = {info.name: info.schemes for info in casframe.list_plugins()}
        assert schemes["workspace"] == ("workspace",)
        with open_store("workspace://main") as store:
            digest = store.put_bytes(b"in the workspace")
        objects = tmp_path / ".cas" / "main" / "objects" / digest.hash[:2]
        assert (objects / digest.hash[2:]).read_bytes() == b"in the workspace"
        with open_store("workspace://main?fsync=true") as again:  # options reach file://
            assert again.read_bytes(digest) == b"in the workspace"
        with pytest.raises(InvalidNameError):
            open_store("workspace://../elsewhere")
    with pytest.raises(casframe.UnknownSchemeError):
        open_store("workspace://main")


def check_register_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_tree: Callable[..., Path], **_: object
) -> None:
    for variable, folder in (("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config")):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.delenv("CASFRAME_CONFIG", raising=False)
    store_path = tmp_path / "store"
    monkeypatch.setenv("CASFRAME_STORE", str(store_path))
    with open_store(f"file://{store_path}") as store:
        store.set_ref("myapp/build-1", store.import_directory(make_tree()))

    plugin = load_example("casframe_register_commands")
    runner = CliRunner()
    with casframe.registered_plugin(plugin, "treesize"):
        result = runner.invoke(make_cli(), ["tree-size", "myapp/build-1"])
        assert result.exit_code == 0, (result.stdout, result.stderr)
        size = sum(len(content) for content in TREE_FILES.values())
        assert result.stdout == f"{len(TREE_FILES)} files, {format_size(size)}\n"
        as_json = runner.invoke(make_cli(), ["tree-size", "myapp/build-1", "--json"])
        assert json.loads(as_json.stdout) == {"files": len(TREE_FILES), "bytes": size}
        assert "tree-size" in runner.invoke(make_cli(), ["--help"]).stdout
        missing = runner.invoke(make_cli(), ["tree-size", "nope"])
        assert missing.exit_code == 1
        assert missing.stderr.startswith("casframe: error: ref not found"), missing.stderr
    assert runner.invoke(make_cli(), ["tree-size", "myapp/build-1"]).exit_code == 2


def check_server_interceptors(
    monkeypatch: pytest.MonkeyPatch, memory_store: Store, cas_server: CasServers, **_: object
) -> None:
    plugin = load_example("casframe_server_interceptors")
    monkeypatch.setenv("CASFRAME_TOKENAUTH_TOKEN", "s3cr3t")
    with casframe.registered_plugin(plugin, "tokenauth"):
        guarded = cas_server(memory_store)
        mirror = cas_server(memory_store, read_only=True)
        monkeypatch.delenv("CASFRAME_TOKENAUTH_TOKEN")
        open_server = cas_server(memory_store)
    digest = memory_store.put_bytes(b"behind a token")
    request = re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()])
    read = bytestream_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")
    token = [("authorization", "Bearer s3cr3t")]

    with grpc.insecure_channel(guarded.removeprefix("grpc://")) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        for call in (
            lambda metadata: cas.FindMissingBlobs(request, metadata=metadata),
            lambda metadata: list(bytestream.Read(read, metadata=metadata)),  # a stream
        ):
            for wrong in (None, [("authorization", "Bearer guess")]):
                with pytest.raises(grpc.RpcError) as refused:
                    call(wrong)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call(token)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    with pytest.raises(PermissionDeniedError):
        open_store(guarded).close()
    for url in (mirror, open_server):  # read-only, and no token configured: no interceptor
        with open_store(url) as store:
            assert store.read_bytes(digest) == b"behind a token"


CHECKS: dict[str, Callable[..., None]] = {
    "casframe_register_backends": check_register_backends,
    "casframe_register_commands": check_register_commands,
    "casframe_server_interceptors": check_server_interceptors,
}


@pytest.mark.parametrize("hook", hook_names())
def test_the_documented_example_of_every_hook_works(
    hook: str,
    plugin_manager: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_tree: Callable[..., Path],
    memory_store: Store,
    cas_server: CasServers,
) -> None:
    assert hook in CHECKS, f"add a check of the example of {hook} (docs/hooks.md) here"
    CHECKS[hook](
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
        make_tree=make_tree,
        memory_store=memory_store,
        cas_server=cas_server,
    )


def test_there_is_a_check_for_nothing_but_hooks() -> None:
    assert set(CHECKS) <= set(hook_names()), set(CHECKS) - set(hook_names())
