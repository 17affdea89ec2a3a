"""Checks on the generated protocol code in casframe/_protos.

* the committed generated tree matches what protos/generate.py produces now;
* field numbers and service/method names agree with the published wire
  contracts;
* serialization of a small Directory is byte-exact.
"""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2
from casframe._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from casframe._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from casframe._protos.build.bazel.semver import semver_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2, buildstream_pb2_grpc
from casframe._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR = REPO_ROOT / "protos" / "generate.py"
COMMITTED = REPO_ROOT / "casframe" / "_protos"
STALE = "casframe/_protos is stale: run `python protos/generate.py`"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _numbers(message_class) -> dict[str, int]:
    return {f.name: f.number for f in message_class.DESCRIPTOR.fields}


def _methods(file_module, service: str) -> list[str]:
    return [m.name for m in file_module.DESCRIPTOR.services_by_name[service].methods]


# --------------------------------------------------------------------------
# Staleness
# --------------------------------------------------------------------------


def test_generated_code_is_up_to_date(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{STALE}\n(generator failed)\n{proc.stdout}{proc.stderr}"

    fresh = _tree(out)
    committed = _tree(COMMITTED)
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    changed = sorted(k for k in set(fresh) & set(committed) if fresh[k] != committed[k])
    assert not (missing or extra or changed), (
        f"{STALE}\nmissing: {missing}\nextra: {extra}\ndiffering: {changed}"
    )


# --------------------------------------------------------------------------
# Wire contract: field numbers
# --------------------------------------------------------------------------


def test_digest_and_tree_field_numbers():
    assert _numbers(re_pb2.Digest) == {"hash": 1, "size_bytes": 2}
    assert _numbers(re_pb2.Directory) == {
        "files": 1,
        "directories": 2,
        "symlinks": 3,
        "node_properties": 5,
    }
    assert _numbers(re_pb2.FileNode) == {
        "name": 1,
        "digest": 2,
        "is_executable": 4,
        "node_properties": 6,
    }
    assert _numbers(re_pb2.DirectoryNode) == {"name": 1, "digest": 2}
    assert _numbers(re_pb2.SymlinkNode) == {"name": 1, "target": 2, "node_properties": 4}
    assert _numbers(re_pb2.NodeProperties) == {"properties": 1, "mtime": 2, "unix_mode": 3}
    assert _numbers(re_pb2.Tree) == {"root": 1, "children": 2}


def test_action_result_field_numbers():
    assert _numbers(re_pb2.ActionResult) == {
        "output_files": 2,
        "output_directories": 3,
        "exit_code": 4,
        "stdout_raw": 5,
        "stdout_digest": 6,
        "stderr_raw": 7,
        "stderr_digest": 8,
        "execution_metadata": 9,
        "output_file_symlinks": 10,
        "output_directory_symlinks": 11,
        "output_symlinks": 12,
    }
    assert _numbers(re_pb2.OutputFile) == {
        "path": 1,
        "digest": 2,
        "is_executable": 4,
        "contents": 5,
        "node_properties": 7,
    }
    assert _numbers(re_pb2.OutputDirectory) == {
        "path": 1,
        "tree_digest": 3,
        "is_topologically_sorted": 4,
        "root_directory_digest": 5,
    }
    assert _numbers(re_pb2.Action) == {
        "command_digest": 1,
        "input_root_digest": 2,
        "timeout": 6,
        "do_not_cache": 7,
        "salt": 9,
        "platform": 10,
    }


def test_cas_request_field_numbers():
    assert _numbers(re_pb2.FindMissingBlobsRequest) == {
        "instance_name": 1,
        "blob_digests": 2,
        "digest_function": 3,
    }
    assert _numbers(re_pb2.FindMissingBlobsResponse) == {"missing_blob_digests": 2}
    assert _numbers(re_pb2.BatchUpdateBlobsRequest) == {
        "instance_name": 1,
        "requests": 2,
        "digest_function": 5,
    }
    assert _numbers(re_pb2.BatchReadBlobsResponse.Response) == {
        "digest": 1,
        "data": 2,
        "status": 3,
        "compressor": 4,
    }
    assert _numbers(semver_pb2.SemVer) == {"major": 1, "minor": 2, "patch": 3, "prerelease": 4}


def test_enum_values():
    assert re_pb2.DigestFunction.SHA256 == 1
    assert re_pb2.DigestFunction.BLAKE3 == 9
    assert re_pb2.Compressor.ZSTD == 1
    assert re_pb2.SymlinkAbsolutePathStrategy.ALLOWED == 2


def test_bytestream_field_numbers():
    assert _numbers(bytestream_pb2.WriteRequest) == {
        "resource_name": 1,
        "write_offset": 2,
        "finish_write": 3,
        "data": 10,
    }
    assert _numbers(bytestream_pb2.ReadRequest) == {
        "resource_name": 1,
        "read_offset": 2,
        "read_limit": 3,
    }
    assert _numbers(bytestream_pb2.ReadResponse) == {"data": 10}
    assert _numbers(bytestream_pb2.QueryWriteStatusResponse) == {
        "committed_size": 1,
        "complete": 2,
    }


# --------------------------------------------------------------------------
# Wire contract: services
# --------------------------------------------------------------------------


def test_service_names_and_methods():
    caps = re_pb2.DESCRIPTOR.services_by_name["Capabilities"]
    assert caps.full_name == "build.bazel.remote.execution.v2.Capabilities"
    assert _methods(re_pb2, "Capabilities") == ["GetCapabilities"]
    assert _methods(re_pb2, "ContentAddressableStorage") == [
        "FindMissingBlobs",
        "BatchUpdateBlobs",
        "BatchReadBlobs",
        "GetTree",
    ]
    assert _methods(re_pb2, "ActionCache") == ["GetActionResult", "UpdateActionResult"]

    assert bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name == (
        "google.bytestream.ByteStream"
    )
    assert _methods(bytestream_pb2, "ByteStream") == ["Read", "Write", "QueryWriteStatus"]

    refs = buildstream_pb2.DESCRIPTOR.services_by_name["ReferenceStorage"]
    assert refs.full_name == "buildstream.v2.ReferenceStorage"
    assert _methods(buildstream_pb2, "ReferenceStorage") == [
        "GetReference",
        "UpdateReference",
        "Status",
    ]

    assert _methods(remote_asset_pb2, "Fetch") == ["FetchBlob", "FetchDirectory"]
    assert _methods(remote_asset_pb2, "Push") == ["PushBlob", "PushDirectory"]
    assert remote_asset_pb2.DESCRIPTOR.package == "build.bazel.remote.asset.v1"


def test_grpc_modules_expose_stubs_and_servicers():
    assert hasattr(re_grpc, "ContentAddressableStorageStub")
    assert hasattr(re_grpc, "add_ActionCacheServicer_to_server")
    assert hasattr(re_grpc, "CapabilitiesServicer")
    assert hasattr(bytestream_pb2_grpc, "ByteStreamStub")
    assert hasattr(buildstream_pb2_grpc, "add_ReferenceStorageServicer_to_server")


# --------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------


def test_empty_directory_serializes_to_nothing():
    assert re_pb2.Directory().SerializeToString() == b""
    assert re_pb2.Directory().SerializeToString(deterministic=True) == b""


def test_directory_with_one_file_is_byte_exact():
    content = b"abc"
    sha = hashlib.sha256(content).hexdigest()  # 64 ASCII characters
    directory = re_pb2.Directory(
        files=[
            re_pb2.FileNode(
                name="foo",
                digest=re_pb2.Digest(hash=sha, size_bytes=len(content)),
                is_executable=True,
            )
        ]
    )

    # Digest:   0x0a = field 1 (hash), length-delimited; 0x40 = 64 bytes
    #           0x10 = field 2 (size_bytes), varint;      0x03
    digest = b"\x0a\x40" + sha.encode("ascii") + b"\x10\x03"  # 68 bytes
    # FileNode: 0x0a = field 1 (name), 3 bytes "foo"
    #           0x12 = field 2 (digest), 0x44 = 68 bytes
    #           0x20 = field 4 (is_executable), varint 1
    file_node = b"\x0a\x03foo" + b"\x12\x44" + digest + b"\x20\x01"  # 77 bytes
    # Directory: 0x0a = field 1 (files), 0x4d = 77 bytes
    expected = b"\x0a\x4d" + file_node

    assert len(digest) == 0x44
    assert len(file_node) == 0x4D
    assert directory.SerializeToString(deterministic=True) == expected
    assert re_pb2.Directory.FromString(expected) == directory


def test_messages_live_in_casframe_namespace():
    module = "casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2"
    assert re_pb2.Digest.__module__ == module
    digest = re_pb2.Digest(hash="00" * 32, size_bytes=0)
    assert pickle.loads(pickle.dumps(digest)) == digest
