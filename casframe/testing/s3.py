"""pytest fixtures for S3 stores on moto, for casframe's own tests and plugin authors.

``fake_aws_credentials``
    the test's AWS environment replaced by fake credentials, no configuration files and no
    instance metadata (every fixture below does this too).
``s3_mock``
    in-process moto (``moto.mock_aws``) with fake credentials and a fresh bucket; yields an
    :class:`S3TestBucket`. Every boto3 client made during the test talks to this fake.
``s3_store``
    a :class:`~casframe.Store` on ``s3_mock``'s bucket.
``moto_server``
    moto's S3 server on ``127.0.0.1`` and a free port, started once per session; yields a
    :class:`MotoServer` (``.endpoint_url``). Tests get their own bucket from ``s3_server_bucket``
    and the server's state is reset after each of them.
``s3_server_bucket``
    a fresh bucket on ``moto_server``; yields an :class:`S3TestBucket` whose ``store_url``
    points at the server (``s3://BUCKET/prefix?endpoint_url=http://127.0.0.1:PORT``).
``s3_server_store``
    a :class:`~casframe.Store` on ``s3_server_bucket``.

Every fixture replaces the AWS environment of the test with fake credentials (and no
configuration files, no instance metadata), so that neither a developer's real credentials nor
the network beyond loopback are ever used. moto and boto3 are imported inside the fixtures only:
importing this module costs nothing (install ``casframe[test]`` or ``moto[server,s3]`` to use it).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

import casframe

if TYPE_CHECKING:
    from casframe.store import Store

__all__ = [
    "FAKE_AWS_ENVIRONMENT",
    "MotoServer",
    "S3TestBucket",
    "fake_aws_credentials",
    "moto_server",
    "s3_mock",
    "s3_server_bucket",
    "s3_server_store",
    "s3_store",
]

#: What the fixtures put in the environment (AWS_* variables not listed here are removed).
FAKE_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}

_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3TestBucket:
    """A bucket made for one test, and how to reach it."""

    name: str
    #: The key prefix the store uses inside the bucket (without slashes).
    prefix: str
    #: ``None`` for in-process moto, else the server's ``http://127.0.0.1:PORT``.
    endpoint_url: str | None
    #: ``s3://NAME/PREFIX`` plus ``?endpoint_url=…`` for a server.
    store_url: str
    #: A boto3 S3 client for looking at (or damaging) the bucket behind the store's back.
    client: Any

    def keys(self) -> list[str]:
        """Every key in the bucket, sorted."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)


@dataclass(frozen=True)
class MotoServer:
    """moto's S3 server running in this process."""

    endpoint_url: str
    server: Any

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``/moto-api/reset``)."""
        import urllib.request

        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass


def _fake_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in FAKE_AWS_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


_loader: list[Any] = []


def _client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client on a fresh session (so it sees the fake environment), sharing one
    model loader across tests: parsing botocore's S3 model anew costs up to a second each time."""
    import boto3
    import botocore.loaders
    import botocore.session

    if not _loader:
        _loader.append(botocore.loaders.create_loader())
    core = botocore.session.get_session()
    core.register_component("data_loader", _loader[0])
    session = boto3.session.Session(botocore_session=core, region_name="us-east-1")
    return session.client("s3", endpoint_url=endpoint_url)


def _new_bucket_name() -> str:
    return f"casframe-test-{os.getpid()}-{next(_bucket_numbers)}"


def _open(url: str) -> Iterator[Store]:
    store = casframe.open_store(url)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake AWS credentials and no AWS configuration for this test (see the module docstring)."""
    _fake_aws_environment(monkeypatch)


@pytest.fixture
def s3_mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3TestBucket]:
    """In-process moto with fake credentials and a fresh bucket (see the module docstring)."""
    _fake_aws_environment(monkeypatch)
    import moto

    with moto.mock_aws():
        client = _client()
        name = _new_bucket_name()
        client.create_bucket(Bucket=name)
        yield S3TestBucket(name, "store", None, f"s3://{name}/store", client)


@pytest.fixture
def s3_store(s3_mock: S3TestBucket) -> Iterator[Store]:
    """A fresh store on in-process moto."""
    yield from _open(s3_mock.store_url)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's S3 server on 127.0.0.1 and a free port, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(f"http://{host}:{port}", server)
    finally:
        server.stop()


@pytest.fixture
def s3_server_bucket(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[S3TestBucket]:
    """A fresh bucket on the session's moto server; the server is reset afterwards."""
    _fake_aws_environment(monkeypatch)
    client = _client(moto_server.endpoint_url)
    name = _new_bucket_name()
    client.create_bucket(Bucket=name)
    url = f"s3://{name}/store?endpoint_url={moto_server.endpoint_url}"
    try:
        yield S3TestBucket(name, "store", moto_server.endpoint_url, url, client)
    finally:
        client.close()
        moto_server.reset()


@pytest.fixture
def s3_server_store(s3_server_bucket: S3TestBucket) -> Iterator[Store]:
    """A fresh store on the session's moto server."""
    yield from _open(s3_server_bucket.store_url)
