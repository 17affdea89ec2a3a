"""The ``grpc://`` ref store, :class:`GrpcRefStore`: refs over BuildStream's ReferenceStorage or
the Remote Asset API, whichever the server offers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from casframe import (
    SHA256,
    CasframeError,
    Digest,
    PermissionDeniedError,
    RefCapability,
    RefInfo,
    RefStore,
    RemoteProtocolError,
    UnsupportedOperationError,
)
from casframe.reapi import buildstream as bst
from casframe.reapi import buildstream_grpc as bst_grpc
from casframe.reapi import remote_asset as asset
from casframe.reapi import remote_asset_grpc as asset_grpc

from ._answers import answered_ref_digest
from ._connection import Connection, translate_error, translate_status

__all__ = ["GrpcRefStore", "ref_uri"]

_REF_URI_PREFIX = "casframe:ref/"



def ref_uri(name: str) -> str:
    """The Remote Asset URI under which ref ``name`` is pushed and fetched."""
    return _REF_URI_PREFIX + name


class GrpcRefStore(RefStore):
    """Refs on a REAPI server, over ReferenceStorage or Remote Asset.

    Neither protocol can list or delete names, nor report when a name was last used: refs
    here can be set and read, and expiring them is the server's business. A store of another
    digest function than SHA-256 uses Remote Asset, whose requests name the function
    (ReferenceStorage's cannot).
    """

    capabilities: frozenset[RefCapability] = frozenset()  # neither list nor delete

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._wanted = conn.options.ref_protocol
        self._protocol: str | None = None if self._wanted == "auto" else self._wanted
        self._function = conn.function_value
        if self._function:  # not SHA-256: only Remote Asset can say which function
            self._protocol = "asset"
        self._lock = threading.Lock()
        self._references = bst_grpc.ReferenceStorageStub(conn.channel)
        self._fetch = asset_grpc.FetchStub(conn.channel)
        self._push = asset_grpc.PushStub(conn.channel)

    def protocol(self) -> str:
        """``reference-storage`` or ``asset``: probed on first use when ``ref_protocol=auto``."""
        with self._lock:
            if self._protocol is None:
                try:
                    self._references.Status(
                        bst.StatusRequest(instance_name=self.conn.instance),
                        timeout=self.conn.options.timeout,
                    )
                    self._protocol = "reference-storage"
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise translate_error(
                            exc, self.conn.where, "ReferenceStorage.Status"
                        ) from None
                    self._protocol = "asset"
            return self._protocol

    def check_writable(self) -> None:
        """With ReferenceStorage, ask its ``Status``: ``allow_updates`` false means read-only.

        The Remote Asset API has no such question; its servers are assumed to accept pushes
        (the blob probe of :class:`GrpcBlobStore` still catches a read-only server).
        """
        if self.protocol() != "reference-storage":
            return
        with self.conn.calling("ReferenceStorage.Status"):
            status = self._references.Status(
                bst.StatusRequest(instance_name=self.conn.instance),
                timeout=self.conn.options.timeout,
            )
        if not status.allow_updates:
            raise PermissionDeniedError(
                f"{self.conn.where} refuses writes: its ReferenceStorage status does not "
                "allow updates"
            )

    def _unsupported(self, what: str, error: UnsupportedOperationError) -> CasframeError:
        if self._wanted == "auto":
            return UnsupportedOperationError(
                f"{self.conn.where} cannot {what}: it offers neither BuildStream's "
                f"ReferenceStorage nor the Remote Asset API ({error})"
            )
        return error

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        # ``touch`` cannot be honoured: neither protocol has a way to look without using.
        timeout = self.conn.options.timeout
        try:
            if self.protocol() == "reference-storage":
                with self.conn.calling("ReferenceStorage.GetReference", ref=name):
                    found = self._references.GetReference(
                        bst.GetReferenceRequest(instance_name=self.conn.instance, key=name),
                        timeout=timeout,
                    )
                return answered_ref_digest(
                    self.conn.where, "ReferenceStorage.GetReference", name, found.digest
                )
            with self.conn.calling("Fetch.FetchDirectory", ref=name):
                fetched = self._fetch.FetchDirectory(
                    asset.FetchDirectoryRequest(
                        instance_name=self.conn.instance, uris=[ref_uri(name)],
                        digest_function=self._function,
                    ),
                    timeout=timeout,
                )
        except UnsupportedOperationError as exc:
            raise self._unsupported("read refs", exc) from None
        if fetched.status.code:
            raise translate_status(fetched.status.code, fetched.status.message,
                                   self.conn.where, "Fetch.FetchDirectory", ref=name)
        # Remote Asset: an answer that names no function is SHA-256's.
        answered = fetched.digest_function or SHA256.reapi_value
        if answered != self.conn.function.reapi_value:
            raise RemoteProtocolError(
                f"{self.conn.where} answered Fetch.FetchDirectory of ref {name} with a digest "
                f"of DigestFunction {answered}, not of {self.conn.function.name} as asked"
            )
        return answered_ref_digest(
            self.conn.where, "Fetch.FetchDirectory", name, fetched.root_directory_digest
        )

    def set_ref(self, name: str, digest: Digest) -> None:
        timeout = self.conn.options.timeout
        try:
            if self.protocol() == "reference-storage":
                with self.conn.calling("ReferenceStorage.UpdateReference"):
                    self._references.UpdateReference(
                        bst.UpdateReferenceRequest(
                            instance_name=self.conn.instance, keys=[name],
                            digest=digest.to_proto(),
                        ),
                        timeout=timeout,
                    )
                return
            with self.conn.calling("Push.PushDirectory"):
                self._push.PushDirectory(
                    asset.PushDirectoryRequest(
                        instance_name=self.conn.instance,
                        uris=[ref_uri(name)],
                        root_directory_digest=digest.to_proto(),
                        digest_function=self._function,
                    ),
                    timeout=timeout,
                )
        except UnsupportedOperationError as exc:
            raise self._unsupported("store refs", exc) from None

    def conflicting_ref(self, name: str) -> str | None:
        # The server decides, as it sets the ref: a casframe server refuses a conflict with
        # FAILED_PRECONDITION naming both refs, which comes back as RefConflictError. Asking
        # first would cost a round trip a folder and could not see refs under the name.
        return None

    def delete_ref(self, name: str) -> None:
        raise UnsupportedOperationError(
            f"{self.conn.where} cannot delete refs: REAPI has no such call"
        )

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        raise UnsupportedOperationError(
            f"{self.conn.where} cannot list refs: REAPI has no such call"
        )
