"""TLS and mutual TLS for the gRPC server, with a CA and certificates made in the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from casframe import Digest, Store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe.server import Server


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server: Pem
    client: Pem
    other_ca: bytes
    stranger: Pem  # a client certificate from a CA the server does not trust


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key = _key()
    ca = _certificate("casframe test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _certificate("localhost", server_key, ca, ca_key, server=True)
    client = _certificate("casframe test client", client_key, ca, ca_key)
    other_key = _key()
    other_ca = _certificate("someone else's CA", other_key, None, other_key, ca=True)
    stranger_key = _key()
    stranger = _certificate("stranger", stranger_key, other_ca, other_key)
    return Pki(
        ca=_pem(ca),
        server=Pem(_pem(server), _key_pem(server_key)),
        client=Pem(_pem(client), _key_pem(client_key)),
        other_ca=_pem(other_ca),
        stranger=Pem(_pem(stranger), _key_pem(stranger_key)),
    )


@pytest.fixture
def pem_files(pki: Pki, tmp_path: Path) -> dict[str, Path]:
    files = {"cert": pki.server.cert, "key": pki.server.key, "ca": pki.ca}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _capabilities(channel: grpc.Channel) -> re_pb2.ServerCapabilities:
    return re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(),
                                                             timeout=10)


def _secure(port: int, pki: Pki, client: Pem | None = None,
            host: str = "127.0.0.1") -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(f"{host}:{port}", credentials)


@pytest.fixture
def tls_server(memory_store: Store, pem_files: dict[str, Path]) -> Iterator[Server]:
    with Server(memory_store, tls_cert=pem_files["cert"], tls_key=pem_files["key"]) as server:
        yield server


@pytest.fixture
def mtls_server(memory_store: Store, pki: Pki) -> Iterator[Server]:
    with Server(memory_store, tls_cert=pki.server.cert, tls_key=pki.server.key,
                tls_client_ca=pki.ca) as server:
        yield server


def test_tls_serves_clients_that_trust_the_ca(tls_server: Server, pki: Pki) -> None:
    assert tls_server.port is not None
    for host in ("127.0.0.1", "localhost"):
        with _secure(tls_server.port, pki, host=host) as channel:
            assert _capabilities(channel).cache_capabilities.digest_functions


def test_tls_server_refuses_plaintext_and_untrusting_clients(tls_server: Server,
                                                             pki: Pki) -> None:
    assert tls_server.port is not None
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _capabilities(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    untrusting = grpc.ssl_channel_credentials(root_certificates=pki.other_ca)
    with grpc.secure_channel(f"127.0.0.1:{tls_server.port}", untrusting) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _capabilities(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_a_client_certificate(mtls_server: Server, pki: Pki,
                                                 memory_store: Store) -> None:
    assert mtls_server.port is not None
    with _secure(mtls_server.port, pki, client=pki.client) as channel:
        assert _capabilities(channel).cache_capabilities.digest_functions
        data = b"uploaded over mutual TLS"
        cas = re_grpc.ContentAddressableStorageStub(channel)
        cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=Digest.of_bytes(data).to_proto(),
                                                   data=data)]), timeout=10)
    assert memory_store.read_bytes(Digest.of_bytes(data)) == data


@pytest.mark.parametrize("client", ["none", "stranger"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(mtls_server: Server, pki: Pki,
                                                                  client: str) -> None:
    assert mtls_server.port is not None
    certificate = None if client == "none" else pki.stranger
    with _secure(mtls_server.port, pki, client=certificate) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _capabilities(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_options_must_come_together(memory_store: Store, pki: Pki) -> None:
    from casframe import ConfigError

    with pytest.raises(ConfigError, match="--tls-key"):
        Server(memory_store, tls_cert=pki.server.cert)
    with pytest.raises(ConfigError, match="--tls-cert"):
        Server(memory_store, tls_client_ca=pki.ca)
