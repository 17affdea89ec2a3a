"""What every REAPI servicer over one :class:`casframe.store.Store` shares: the store, the
settings, the served instance names, and the checks each call starts with.

The services themselves each have their module: :mod:`casframe.server.capabilities`,
:mod:`casframe.server.cas`, :mod:`casframe.server.actioncache`,
:mod:`casframe.server.remoteasset` (Remote Asset Fetch and Push),
:mod:`casframe.server.refstorage` (BuildStream's ReferenceStorage) and
:mod:`casframe.server.bytestream`.

Each servicer checks the instance name and read-only mode, picks the store of the request's
digest function (:mod:`casframe.server.functions`), then calls that Store; every upload goes
through the Store's verified write paths, so nothing unverified ever becomes visible. Errors
are raised, never returned, and become statuses in :mod:`casframe.server.errors`.

Where things are kept (all in the Store's refs, so every backend gets them and several servers
over one bucket agree):

* action results: ref ``ac/{instance or _}/{hash}/{size}`` → the ActionResult message, stored as
  a blob;
* Remote Asset ``casframe:ref/NAME`` → the ref ``NAME`` itself (a Directory tree);
* BuildStream 1.6's ``urn:fdc:buildstream.build:2020:v1:KEY`` directories → the ref ``KEY``,
  the same ref BuildStream 1.4 reads and writes through ReferenceStorage;
* any other Remote Asset URI → ref ``asset/{blob|directory}/{sha256 of instance, URI and
  qualifiers}``, or ``asset/held/{blob|directory}/{…}`` when pushed with references
  (:mod:`casframe.server.assets`);
* ReferenceStorage keys → refs of the same name.

Refs are store-wide: every instance sees the same refs; the action cache and generic Remote
Asset entries are per instance. Each digest function has its own blobs and refs (the store
``store.with_digest_function(name)``): an action result or asset pushed with BLAKE3 digests is
found only by requests that name BLAKE3.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.digest import Digest
from casframe.errors import InvalidDigestError
from casframe.server.counts import NO_COUNTS, ContentCounts
from casframe.server.errors import StatusError, missing_blobs_error
from casframe.server.functions import DigestFunctions
from casframe.server.names import Instances
from casframe.server.settings import ServerSettings
from casframe.store import Store
from casframe.tree import missing_in_tree

__all__ = ["ServicerBase", "parse_digest"]


log = logging.getLogger("casframe.server")


class ServicerBase:
    """What every servicer shares: the served store, the store of each digest function it
    offers (``functions``), the settings, the served instance names and where it counts what
    its calls stored and served (``counts``, :mod:`casframe.server.counts`)."""

    def __init__(self, store: Store, settings: ServerSettings, instances: Instances, *,
                 counts: ContentCounts = NO_COUNTS) -> None:
        self.store = store
        self.counts = counts
        self.functions = DigestFunctions(store)
        self.settings = settings
        self.instances = instances

    def _check(self, instance: str) -> str:
        return self.instances.check(instance)

    def _store_for(self, digest_function: int, digests: Iterable[Digest]) -> Store:
        """The store of a request's ``digest_function`` (inferred from the digests' length
        when unset); every digest must be of that function (else ``INVALID_ARGUMENT``)."""
        return self.functions.for_request(digest_function, digests)

    def _check_writable(self) -> None:
        if self.settings.read_only:
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED, "this server is read-only")

    @staticmethod
    def _get_ref(
        store: Store,
        name: str,
        what: str,
        lookup: Callable[[Store, str], Digest] = Store.get_ref,
    ) -> Digest:
        """The digest a ref of ``store`` holds (found by ``lookup``); a damaged ref is the
        server's ``DATA_LOSS``, not the client's ``INVALID_ARGUMENT``, and its details (where
        it is stored) go to the log."""
        try:
            return lookup(store, name)
        except InvalidDigestError as exc:
            log.error("damaged ref %s: %s", name, exc)
            raise StatusError(
                grpc.StatusCode.DATA_LOSS,
                f"{what} is damaged in the server's store; set it again "
                "(the server log has the details)",
            ) from None

    @staticmethod
    def _set_tree_ref(store: Store, names: Iterable[str], root: Digest, what: str) -> None:
        """Point refs of ``store`` at a tree after checking, once, that the whole tree is
        stored."""
        # Freshen while checking: prune's grace period then covers the tree from here on.
        missing = missing_in_tree(store.verified, root, freshen=True)
        if missing:
            raise missing_blobs_error(
                grpc.StatusCode.FAILED_PRECONDITION, f"{what}: tree {root} is incomplete", missing
            )
        for name in names:
            store.set_ref(name, root, check_complete=False)


def parse_digest(message: re_pb2.Digest, what: str = "digest") -> Digest:
    """The digest a request field carries; an invalid one is refused naming ``what``."""
    try:
        return Digest.from_proto(message)
    except InvalidDigestError as exc:
        raise InvalidDigestError(f"invalid {what}: {exc}") from None
