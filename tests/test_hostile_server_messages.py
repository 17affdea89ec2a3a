"""What a damaged, unreadable, full or unreachable store tells the server's clients.

Every service is called, with real channels and the generated stubs, against a server whose
store is broken in one way at a time; no status a client receives (the call's own or a batch
entry's) may name the store's URL, a path on the server or the test's temporary folder. The
codes are what a client can act on: DATA_LOSS for damaged content, RESOURCE_EXHAUSTED for a
full disk, UNAVAILABLE for an unreachable backend, INTERNAL (with an incident number) for the
unexpected.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from server_processes import ClientStubs

from casframe import BackendUnavailableError, ConfigError, Digest, Store, layout, open_store
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.server import Server
from casframe.server.errors import client_message
from casframe.testing import failing_writes, random_bytes, write_files
from casframe.testing.s3 import S3TestBucket
from casframe.tree import parse_directory

TIMEOUT = 60  # a hang guard only


def dproto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


@dataclass
class Outcome:
    """What a client saw for one call: the call's code and every message it carried."""

    what: str
    code: grpc.StatusCode
    messages: list[str] = field(default_factory=list)


class Client(ClientStubs):
    """Every service of one server, each call recorded as an :class:`Outcome`."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.attach_stubs(channel)
        self.outcomes: list[Outcome] = []

    def call(self, what: str, method: Callable[..., object], request: object) -> Outcome:
        outcome = Outcome(what, grpc.StatusCode.OK)
        try:
            reply = method(request, timeout=TIMEOUT)
            if hasattr(reply, "__next__"):
                reply = list(reply)  # type: ignore[call-overload]
            outcome.messages += _reply_messages(reply)
        except grpc.RpcError as error:
            outcome.code = error.code()
            outcome.messages.append(error.details() or "")
            for key, value in error.trailing_metadata() or ():
                if key == "grpc-status-details-bin":
                    status = status_pb2.Status.FromString(value)
                    outcome.messages.append(status.message)
                    outcome.messages += [str(detail) for detail in status.details]
        self.outcomes.append(outcome)
        return outcome

    def all_services(self, names: Names) -> None:
        """One call of every method of every service, aimed at what ``names`` says is broken."""
        instance = ""
        self.call("GetCapabilities", self.caps.GetCapabilities,
                  re_pb2.GetCapabilitiesRequest(instance_name=instance))
        self.call("Health.Check", self.health.Check, health_pb2.HealthCheckRequest())
        self.call("FindMissingBlobs", self.cas.FindMissingBlobs, re_pb2.FindMissingBlobsRequest(
            blob_digests=[dproto(d) for d in names.blobs]))
        self.call("BatchReadBlobs", self.cas.BatchReadBlobs, re_pb2.BatchReadBlobsRequest(
            digests=[dproto(d) for d in names.blobs]))
        fresh = random_bytes(300, seed=7)
        self.call("BatchUpdateBlobs", self.cas.BatchUpdateBlobs, re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(
                digest=dproto(Digest.of_bytes(fresh)), data=fresh)]))
        self.call("GetTree", self.cas.GetTree, re_pb2.GetTreeRequest(
            root_digest=dproto(names.tree)))
        for digest in names.blobs:
            self.call(f"ByteStream.Read {digest}", self.bytestream.Read, byte_pb2.ReadRequest(
                resource_name=f"blobs/{digest.hash}/{digest.size}"))
        large = random_bytes(3 << 20, seed=8)
        large_digest = Digest.of_bytes(large)
        resource = f"uploads/5e1f0c3a-hostile/blobs/{large_digest.hash}/{large_digest.size}"
        self.call("ByteStream.Write", self.bytestream.Write, iter([
            byte_pb2.WriteRequest(resource_name=resource, write_offset=0,
                                  data=large[: 1 << 20]),
            byte_pb2.WriteRequest(write_offset=1 << 20, data=large[1 << 20:],
                                  finish_write=True),
        ]))
        self.call("QueryWriteStatus", self.bytestream.QueryWriteStatus,
                  byte_pb2.QueryWriteStatusRequest(resource_name=resource))
        self.call("GetActionResult", self.ac.GetActionResult, re_pb2.GetActionResultRequest(
            action_digest=dproto(names.action)))
        result = re_pb2.ActionResult(exit_code=0, stdout_digest=dproto(names.blobs[0]))
        self.call("UpdateActionResult", self.ac.UpdateActionResult,
                  re_pb2.UpdateActionResultRequest(
                      action_digest=dproto(Digest.of_bytes(b"another action")),
                      action_result=result))
        self.call("FetchBlob", self.fetch.FetchBlob, ra_pb2.FetchBlobRequest(
            uris=[names.asset_uri]))
        self.call("FetchDirectory", self.fetch.FetchDirectory, ra_pb2.FetchDirectoryRequest(
            uris=[f"casframe:ref/{names.ref}"]))
        self.call("PushBlob", self.push.PushBlob, ra_pb2.PushBlobRequest(
            uris=["https://example.com/pushed"], blob_digest=dproto(names.blobs[0])))
        self.call("PushDirectory", self.push.PushDirectory, ra_pb2.PushDirectoryRequest(
            uris=["casframe:ref/pushed"], root_directory_digest=dproto(names.tree)))
        self.call("GetReference", self.refs.GetReference, bs_pb2.GetReferenceRequest(
            key=names.ref))
        self.call("UpdateReference", self.refs.UpdateReference, bs_pb2.UpdateReferenceRequest(
            keys=["updated"], digest=dproto(names.tree)))
        self.call("ReferenceStorage.Status", self.refs.Status, bs_pb2.StatusRequest())

    def outcome(self, what: str) -> Outcome:
        return next(o for o in self.outcomes if o.what == what)


def _reply_messages(reply: object) -> list[str]:
    """Status messages inside a successful reply (batch entries, Remote Asset statuses)."""
    replies = reply if isinstance(reply, list) else [reply]
    messages = []
    for item in replies:
        for entry in getattr(item, "responses", ()):
            messages.append(entry.status.message)
        status = getattr(item, "status", None)
        if isinstance(status, status_pb2.Status):
            messages.append(status.message)
    return messages


@dataclass
class Names:
    """What a test store holds: a tree under a ref, blobs, an action result and an asset."""

    tree: Digest
    ref: str
    blobs: list[Digest]
    action: Digest
    asset_uri: str


def _populate(store: Store, tmp_path: Path) -> Names:
    source = write_files(tmp_path / "source", {
        "a.txt": b"first file", "sub/b.txt": b"second file", "sub/deeper/c.bin": b"c" * 5000,
    })
    tree = store.import_directory(source)
    store.set_ref("build/main", tree)
    blob = store.put_bytes(random_bytes(4000, seed=1))
    action = Digest.of_bytes(b"an action")
    return Names(tree, "build/main", [blob], action, "https://example.com/artifact.tar")


def _serve(store: Store, stack: ExitStack) -> Client:
    server = stack.enter_context(Server(store))
    channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    client = Client(channel)
    return client


def _record_asset_and_action(client: Client, names: Names) -> None:
    """Store an action result and a pushed asset through the server itself."""
    result = re_pb2.ActionResult(exit_code=0, stdout_digest=dproto(names.blobs[0]))
    assert client.call("setup UpdateActionResult", client.ac.UpdateActionResult,
                       re_pb2.UpdateActionResultRequest(action_digest=dproto(names.action),
                                                        action_result=result)
                       ).code == grpc.StatusCode.OK
    assert client.call("setup PushBlob", client.push.PushBlob, ra_pb2.PushBlobRequest(
        uris=[names.asset_uri], blob_digest=dproto(names.blobs[0]))).code == grpc.StatusCode.OK
    client.outcomes.clear()


def assert_nothing_leaks(client: Client, *secrets: str) -> None:
    leaks = [
        f"{o.what} ({o.code.name}): {message!r}"
        for o in client.outcomes for message in o.messages
        if any(secret in message for secret in secrets)
        or "file://" in message or "Traceback" in message
    ]
    assert not leaks, "client-facing messages name the store:\n  " + "\n  ".join(leaks)


@pytest.fixture
def private_root(tmp_path: Path) -> Path:
    return tmp_path / "private-store-location"


@pytest.fixture
def local(private_root: Path, tmp_path: Path) -> Iterator[tuple[Store, Names]]:
    with open_store(f"file://{private_root}") as store:
        yield store, _populate(store, tmp_path)


def _object_path(root: Path, digest: Digest) -> Path:
    return root / layout.object_key(digest)


def test_damaged_refs_are_data_loss_without_the_store_location(
    local: tuple[Store, Names], private_root: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, names = local
    with ExitStack() as stack:
        client = _serve(store, stack)
        _record_asset_and_action(client, names)
        # What a power cut or a stray editor leaves: every ref file the services read.
        for ref_file in (private_root / "refs" / "heads").rglob("*"):
            if ref_file.is_file():
                ref_file.write_bytes(b"\x00garbage")
        with caplog.at_level(logging.WARNING, logger="casframe.server"):
            client.all_services(names)

    assert_nothing_leaks(client, str(private_root), str(tmp_path))
    for what in ("GetReference", "FetchDirectory", "FetchBlob", "GetActionResult"):
        outcome = client.outcome(what)
        assert outcome.code == grpc.StatusCode.DATA_LOSS, (what, outcome)
        assert "is damaged in the server's store" in outcome.messages[0]
    assert "ref build/main is damaged" in client.outcome("GetReference").messages[0]
    # The operator gets the whole story.
    assert any(str(private_root) in record.getMessage() for record in caplog.records)


def test_corrupt_and_unreadable_objects_name_no_path(
    local: tuple[Store, Names], private_root: Path, tmp_path: Path,
) -> None:
    store, names = local
    corrupt = names.blobs[0]
    path = _object_path(private_root, corrupt)
    path.chmod(0o644)
    path.write_bytes(b"x" * corrupt.size)  # the right size, the wrong content
    # A subdirectory whose object this server may not read (as root, permissions would not
    # stop it: the read is refused where the backend opens the file).
    tree = parse_directory(names.tree, store.read_bytes(names.tree))
    unreadable = Digest.from_proto(tree.directories[0].digest)
    unreadable_path = str(_object_path(private_root, unreadable))
    blobs = store.blobs
    open_blob, read_blobs = blobs.open_blob, blobs.read_blobs

    def refuse(digest: Digest) -> None:
        if digest == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", unreadable_path)

    def guarded_open(digest: Digest, offset: int = 0):  # type: ignore[no-untyped-def]
        refuse(digest)
        return open_blob(digest, offset)

    def guarded_read(digests):  # type: ignore[no-untyped-def]
        for digest, data in read_blobs(list(digests)):
            refuse(digest)
            yield digest, data

    blobs.open_blob = guarded_open  # type: ignore[method-assign]
    blobs.read_blobs = guarded_read  # type: ignore[method-assign]
    names.blobs.append(unreadable)
    with ExitStack() as stack:
        client = _serve(store, stack)
        _record_asset_and_action(client, names)
        client.all_services(names)

    assert_nothing_leaks(client, str(private_root), str(tmp_path))
    read = client.outcome(f"ByteStream.Read {corrupt}")
    assert read.code == grpc.StatusCode.DATA_LOSS and str(corrupt) in read.messages[0]
    refused = client.outcome(f"ByteStream.Read {unreadable}")
    assert refused.code == grpc.StatusCode.INTERNAL and "incident #" in refused.messages[0]
    batch = client.outcome("BatchReadBlobs")
    assert batch.code == grpc.StatusCode.OK and len(batch.messages) == 2


def test_a_full_disk_is_resource_exhausted(
    local: tuple[Store, Names], private_root: Path, tmp_path: Path,
) -> None:
    store, names = local
    temp = str(private_root / "tmp" / "tmp-full-disk")

    def no_space() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device", temp)

    with ExitStack() as stack:
        client = _serve(store, stack)
        _record_asset_and_action(client, names)
        stack.enter_context(failing_writes(store, 0, error=no_space))
        client.all_services(names)

    assert_nothing_leaks(client, str(private_root), str(tmp_path))
    exhausted = "the server's store is out of space"
    for what in ("ByteStream.Write", "UpdateActionResult"):
        outcome = client.outcome(what)
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, outcome)
        assert exhausted in outcome.messages[0]
    batch = client.outcome("BatchUpdateBlobs")
    assert batch.code == grpc.StatusCode.OK
    assert batch.messages and all(exhausted in message for message in batch.messages)


def test_an_unreachable_backend_is_unavailable_without_its_url(
    cas_server: Callable[..., str], memory_store: Store, tmp_path: Path,
) -> None:
    """A server whose own store is another server (grpc://HOST:PORT/INSTANCE?options), which
    answers UNAVAILABLE: its own storage is down."""
    upstream_url = cas_server(memory_store, instance_names=["private/instance"])
    names = _populate(memory_store, tmp_path)
    backend_url = f"{upstream_url}?timeout=5&max_concurrency=2"
    digest = names.blobs[0]

    def down(*args: object, **kwargs: object) -> NoReturn:
        raise BackendUnavailableError("storage unreachable")

    for part, method in ((memory_store.blobs, "find_missing_blobs"),
                         (memory_store.blobs, "open_blob"), (memory_store.blobs, "read_blobs"),
                         (memory_store.refs, "get_ref")):
        setattr(part, method, down)
    with open_store(backend_url) as proxied, ExitStack() as stack:
        client = _serve(proxied, stack)
        # One call per service that reaches the store (each is retried by grpcio first).
        client.call("FindMissingBlobs", client.cas.FindMissingBlobs,
                    re_pb2.FindMissingBlobsRequest(blob_digests=[dproto(digest)]))
        client.call("ByteStream.Read", client.bytestream.Read, byte_pb2.ReadRequest(
            resource_name=f"blobs/{digest.hash}/{digest.size}"))
        client.call("GetActionResult", client.ac.GetActionResult, re_pb2.GetActionResultRequest(
            action_digest=dproto(names.action)))
        client.call("FetchDirectory", client.fetch.FetchDirectory,
                    ra_pb2.FetchDirectoryRequest(uris=[f"casframe:ref/{names.ref}"]))
        client.call("GetReference", client.refs.GetReference,
                    bs_pb2.GetReferenceRequest(key=names.ref))

    host_port = upstream_url.split("://")[1].split("/")[0]
    assert_nothing_leaks(client, host_port, "private/instance", "timeout=5")
    for outcome in client.outcomes:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
        assert outcome.messages[0] == "cannot reach <url>: storage unreachable", outcome


def test_update_action_result_refuses_invalid_output_digests(
    local: tuple[Store, Names],
) -> None:
    store, _ = local
    bad_results = {
        "zz": re_pb2.ActionResult(output_files=[re_pb2.OutputFile(
            path="out", digest=re_pb2.Digest(hash="zz", size_bytes=2))]),
        "-1": re_pb2.ActionResult(stdout_digest=re_pb2.Digest(
            hash=Digest.of_bytes(b"x").hash, size_bytes=-1)),
    }
    with ExitStack() as stack:
        client = _serve(store, stack)
        for label, result in bad_results.items():
            action = Digest.of_bytes(label.encode())
            outcome = client.call(label, client.ac.UpdateActionResult,
                                  re_pb2.UpdateActionResultRequest(
                                      action_digest=dproto(action), action_result=result))
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
            assert "invalid" in outcome.messages[0]
            # Nothing was stored: the action has no result.
            assert client.call("get", client.ac.GetActionResult, re_pb2.GetActionResultRequest(
                action_digest=dproto(action))).code == grpc.StatusCode.NOT_FOUND
    assert "output 'out'" in client.outcome("zz").messages[0]
    assert "stdout" in client.outcome("-1").messages[0]


def test_get_tree_page_token_of_thousands_of_digits_is_invalid(
    local: tuple[Store, Names],
) -> None:
    store, names = local
    with ExitStack() as stack:
        client = _serve(store, stack)
        token = "9" * 5000 + ":" + names.tree.hash[:16]
        outcome = client.call("GetTree", client.cas.GetTree, re_pb2.GetTreeRequest(
            root_digest=dproto(names.tree), page_token=token))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "was not issued for a tree with root" in outcome.messages[0]
    assert len(outcome.messages[0]) < 300  # the token is not echoed whole


# -- TLS: a key that is not the certificate's -------------------------------------------------


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def mismatched_pem(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate and the key of another certificate, as files."""
    cert, key = tmp_path / "server.crt", tmp_path / "other.key"
    cert.write_bytes(_self_signed(ec.generate_private_key(ec.SECP256R1())))
    key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    return cert, key


def test_tls_key_not_matching_its_certificate_is_refused_by_the_server_api(
    memory_store: Store, mismatched_pem: tuple[Path, Path],
) -> None:
    cert, key = mismatched_pem
    for cert_source, key_source, shown in ((cert, key, str(key)),
                                           (cert.read_bytes(), key.read_bytes(), "PEM bytes")):
        server = Server(memory_store, tls_cert=cert_source, tls_key=key_source)
        with pytest.raises(ConfigError, match="does not match the certificate") as info:
            server.start()
        assert shown in str(info.value)
        assert server.port is None  # never listened
    matching = ec.generate_private_key(ec.SECP256R1())
    with Server(memory_store, tls_cert=_self_signed(matching), tls_key=_key_pem(matching)):
        pass  # a matching pair starts
    with pytest.raises(ConfigError, match="cannot use TLS certificate"):
        Server(memory_store, tls_cert=b"not a certificate", tls_key=key.read_bytes()).start()
    encrypted = matching.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ConfigError, match="is encrypted; casframe serve needs an unencrypted"):
        Server(memory_store, tls_cert=_self_signed(matching), tls_key=encrypted).start()


def test_tls_key_not_matching_its_certificate_is_one_line_from_the_command(
    tmp_path: Path, mismatched_pem: tuple[Path, Path],
) -> None:
    cert, key = mismatched_pem
    result = subprocess.run(
        [sys.executable, "-m", "casframe.server", f"file://{tmp_path / 'store'}",
         "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"casframe serve: error: TLS key {key} does not match the certificate in "
        f"TLS certificate {cert}: give the private key that the certificate was issued for"
    ]
    assert "serving" not in result.stdout


def test_an_s3_store_is_not_named_to_clients(
    s3_mock: S3TestBucket, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bucket, key prefix and keys stay on the server, whether a ref or an object is damaged
    or the whole bucket is gone."""
    prefix = "private-prefix"
    bucket, s3 = s3_mock.name, s3_mock.client
    with open_store(f"s3://{bucket}/{prefix}") as store, ExitStack() as stack:
        names = _populate(store, tmp_path)
        client = _serve(store, stack)
        _record_asset_and_action(client, names)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/refs/heads/{names.ref}", Body=b"\x00garbage")
        blob = names.blobs[0]
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{layout.object_key(blob)}",
                      Body=b"truncated")
        client.all_services(names)
        damaged = list(client.outcomes)
        for key in s3_mock.keys():
            s3.delete_object(Bucket=bucket, Key=key)
        s3.delete_bucket(Bucket=bucket)
        client.outcomes.clear()
        with caplog.at_level(logging.WARNING, logger="casframe.server"):
            client.all_services(names)
        gone = list(client.outcomes)

    client.outcomes = damaged + gone
    assert_nothing_leaks(client, bucket, prefix, "s3://")
    by_name = {o.what: o for o in damaged}
    assert by_name["GetReference"].code == grpc.StatusCode.DATA_LOSS
    assert by_name[f"ByteStream.Read {blob}"].code == grpc.StatusCode.DATA_LOSS
    missing_bucket = next(o for o in gone if o.what == "FindMissingBlobs")
    assert missing_bucket.code == grpc.StatusCode.INTERNAL, missing_bucket
    assert "bucket '<store>' does not exist" in missing_bucket.messages[0]
    assert any(f"bucket {bucket!r} does not exist" in r.getMessage() for r in caplog.records)


def test_credentials_in_the_store_url_are_scrubbed_wherever_they_appear() -> None:
    """Backends name their store in their own ways; every form is scrubbed."""
    store_url = ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@private-bucket/team/cas"
                 "?endpoint_url=http://10.1.2.3:9000")
    messages = [
        "cannot list in s3://AKIAEXAMPLE:wJalrXUtnFEMI@private-bucket/team/cas: timed out",
        "access denied to read in bucket 'private-bucket', key team/cas/objects/ab/cd",
        "S3 endpoint http://10.1.2.3:9000 is unreachable (user AKIAEXAMPLE)",
        "connect to 10.1.2.3:9000 failed; secret wJalrXUtnFEMI refused",
    ]
    shown = [client_message(message, store_url) for message in messages]
    for text in shown:
        for secret in ("AKIAEXAMPLE", "wJalrXUtnFEMI", "private-bucket", "team/cas", "10.1.2.3"):
            assert secret not in text, text
    assert shown[1] == "access denied to read in bucket '<store>', key <store>/objects/ab/cd"
    assert shown[3] == "connect to <address> failed; secret <store> refused"
