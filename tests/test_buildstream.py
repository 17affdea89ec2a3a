"""BuildStream 1.4, 1.6 and 2.8, installed from PyPI, use ``casframe serve`` as their artifact
cache (and, for 2.8, source cache), over file:// and over s3:// on moto's server.

Each test is what a BuildStream user does: build with the server configured (nothing cached
anywhere), which pushes; forget the local cache; build again, which must pull instead of
building; check the artifact out and compare it with the source, byte for byte, with modes and
symlinks. The clients come from ``scripts/test-prereqs`` (see ``buildstream_helpers``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from buildstream_helpers import (
    GENERATIONS,
    Machine,
    Project,
    snapshot,
    user_config,
    write_files,
    write_project,
)
from test_server_tls import Pki, pki  # noqa: F401 - the certificates of the TLS tests

from casframe import Store, open_store

# A 1.x artifact's ref: project/element/cache key (sha256 hex).
_KEY = "[0-9a-f]{64}"


@pytest.fixture(params=["file", "s3"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """``casframe serve`` over a file:// store, or over s3:// on moto's server: the store and
    the URL BuildStream is given."""
    from casframe.server import Server

    if request.param == "s3":
        store = request.getfixturevalue("s3_server_store")
    else:
        store = open_store(f"file://{tmp_path}/served")
        request.addfinalizer(store.close)
    with Server(store, listen="127.0.0.1:0") as server:
        yield store, f"http://127.0.0.1:{server.port}"


@pytest.fixture
def file_served(tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """``casframe serve`` over a file:// store (prune and gc are the same on every backend)."""
    from casframe.server import Server

    with open_store(f"file://{tmp_path}/served") as store, \
            Server(store, listen="127.0.0.1:0") as server:
        yield store, f"http://127.0.0.1:{server.port}"


def _sources(tmp_path: Path, *names: str) -> dict[str, Path]:
    return {name: write_files(tmp_path / "sources" / name, name) for name in names}


def _take_origin_away(project: Project) -> None:
    """From here on, the tar sources cannot be downloaded from their origin."""
    project.origin.rename(project.origin.with_name(project.origin.name + "-gone"))


@pytest.mark.parametrize("version", GENERATIONS)
def test_build_push_wipe_pull_checkout(
    version: str, served: tuple[Store, str], tmp_path: Path
) -> None:
    store, url = served
    sources = _sources(tmp_path, "hello")
    project = write_project(tmp_path / "proj", version, sources)
    config = user_config(version, url)
    machine = Machine(tmp_path / "machine", version)

    first = machine.build(project, config, "hello")
    assert first["Pull"] == (0, 1), first  # nothing on the server yet
    assert first["Build"] == (1, 0), first
    assert first["Push"] == (1, 0), first
    refs = [ref.name for ref in store.list_refs()]
    if version.startswith("1."):
        # Both 1.x generations keep the artifact under its readable name.
        assert len(refs) == 1 and re.fullmatch(f"proj/hello/{_KEY}", refs[0]), refs
    else:
        # The artifact message, under its strong and its weak key, holding the file tree.
        assert len(refs) == 2, refs
        assert all(re.fullmatch(f"asset/held/blob/buildstream/artifact/proj/hello/{_KEY}", name)
                   for name in refs), refs

    machine.wipe()
    if not version.startswith("1."):
        _take_origin_away(project)  # the files can only come from casframe now
    second = machine.build(project, config, "hello")
    assert second["Pull"] == (1, 0), second
    assert second["Build"] == (0, 1), second
    assert second["Push"] == (0, 1), second
    checkout = machine.checkout(project, config, "hello", tmp_path / "checkout")
    assert snapshot(checkout) == snapshot(sources["hello"])


def test_buildstream_2_source_cache(served: tuple[Store, str], tmp_path: Path) -> None:
    """2.8 pushes the sources it fetched; another machine, with the origin gone and no artifact
    cache, fetches them from casframe and builds the same artifact."""
    _, url = served
    version = "2.8.1"
    sources = _sources(tmp_path, "hello")
    project = write_project(tmp_path / "proj", version, sources)
    pusher = Machine(tmp_path / "pusher", version)
    counts = pusher.build(project, user_config(version, url, artifacts=False, sources=True),
                          "hello")
    assert counts["Src-push"] == (1, 0), counts

    _take_origin_away(project)
    config = user_config(version, url, artifacts=False, sources=True)
    machine = Machine(tmp_path / "machine", version)
    log = machine.run(project, config, "source", "fetch", "hello.bst")
    assert re.search(r"INFO\s+Pulled source \w+ <- " + re.escape(url), log), log[-4000:]
    counts = machine.build(project, config, "hello")
    assert counts["Build"] == (1, 0), counts
    checkout = machine.checkout(project, config, "hello", tmp_path / "checkout")
    assert snapshot(checkout) == snapshot(sources["hello"])


@pytest.mark.parametrize(("pusher", "puller"), [("1.4.3", "1.6.9"), ("1.6.9", "1.4.3")])
def test_1_4_and_1_6_share_artifacts(
    pusher: str, puller: str, served: tuple[Store, str], tmp_path: Path
) -> None:
    store, url = served
    sources = _sources(tmp_path, "shared")
    project = write_project(tmp_path / "proj", pusher, sources)
    counts = Machine(tmp_path / "pusher", pusher).build(project, user_config(pusher, url),
                                                         "shared")
    assert counts["Push"] == (1, 0), counts

    machine = Machine(tmp_path / "puller", puller)
    counts = machine.build(project, user_config(puller, url), "shared")
    assert counts["Pull"] == (1, 0), counts
    assert counts["Build"] == (0, 1), counts
    checkout = machine.checkout(project, user_config(puller, url), "shared",
                                tmp_path / "checkout")
    assert snapshot(checkout) == snapshot(sources["shared"])
    names = [ref.name for ref in store.list_refs()]
    assert len(names) == 1 and re.fullmatch(f"proj/shared/{_KEY}", names[0]), names


def _wait_for_next_tick(since: float) -> None:
    """Return once the clock is past ``since`` by more than a file system timestamp's grain,
    so that an access made now is strictly more recent than one made before ``since``."""
    while time.time() < since + 1.0:
        time.sleep(0.05)


@pytest.mark.parametrize("version", GENERATIONS)
def test_prune_keeps_and_gc_expires_lru_buildstream_artifacts(
    version: str, file_served: tuple[Store, str], tmp_path: Path
) -> None:
    store, url = file_served
    sources = _sources(tmp_path, "old", "used")
    project = write_project(tmp_path / "proj", version, sources)
    config = user_config(version, url)
    pusher = Machine(tmp_path / "pusher", version)
    pusher.build(project, config, "used")
    pusher.build(project, config, "old")
    pushed = time.time()

    # Everything the artifacts need stays, even with no grace period.
    report = store.prune(grace_period=0)
    assert report.objects_freed == 0, report

    _wait_for_next_tick(pushed)
    user = Machine(tmp_path / "user", version)
    counts = user.build(project, config, "used")  # a pull: "used" is now the recent one
    assert counts["Pull"] == (1, 0), counts
    checkout = user.checkout(project, config, "used", tmp_path / "used-checkout")
    assert snapshot(checkout) == snapshot(sources["used"])

    # A quota that one artifact's 64 KiB file must leave: the least recently used goes.
    total = store.gc(max_size="1TB", grace_period=0).bytes_before
    report = store.gc(max_size=total - 1, low_watermark=(total - 60_000) / (total - 1),
                      grace_period=0)
    assert len(report.refs_deleted) >= 1, report

    late = Machine(tmp_path / "late", version)
    counts = late.build(project, config, "used")
    assert counts["Pull"] == (1, 0), counts
    checkout = late.checkout(project, config, "used", tmp_path / "late-checkout")
    assert snapshot(checkout) == snapshot(sources["used"])
    counts = late.build(project, config, "old")
    assert counts["Pull"] == (0, 1), counts  # expired: built again
    assert counts["Build"] == (1, 0), counts


@pytest.mark.parametrize("version", GENERATIONS)
def test_mutual_tls(version: str, pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """The TLS configuration docs/buildstream.md gives, for each generation, against a server
    that requires a client certificate."""
    from casframe.server import Server

    files = {"server-cert": pki.ca, "client-cert": pki.client.cert, "client-key": pki.client.key}
    tls = {}
    for key, data in files.items():
        tls[key] = tmp_path / f"{key}.pem"
        tls[key].write_bytes(data)
    sources = _sources(tmp_path, "secret")
    project = write_project(tmp_path / "proj", version, sources)
    with open_store(f"file://{tmp_path}/served") as store, \
            Server(store, listen="127.0.0.1:0", tls_cert=pki.server.cert, tls_key=pki.server.key,
                   tls_client_ca=pki.ca) as server:
        config = user_config(version, f"https://localhost:{server.port}", tls=tls)
        counts = Machine(tmp_path / "pusher", version).build(project, config, "secret")
        assert counts["Push"] == (1, 0), counts
        machine = Machine(tmp_path / "puller", version)
        counts = machine.build(project, config, "secret")
        assert counts["Pull"] == (1, 0), counts
        checkout = machine.checkout(project, config, "secret", tmp_path / "checkout")
    assert snapshot(checkout) == snapshot(sources["secret"])
