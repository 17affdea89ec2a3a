"""Names the server reads from requests: instance names, ByteStream resource names, digest
functions, and the ref names under which action results and Remote Asset entries are kept.

Every check here answers a malformed or unsafe name with ``INVALID_ARGUMENT`` (or
``UNIMPLEMENTED`` for a well-formed request the server does not offer) and a message that says
what was expected. Nothing here touches the store.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.compression import COMPRESSOR_VALUES, IDENTITY, KNOWN_COMPRESSORS
from casframe.digest import Digest
from casframe.errors import InvalidDigestError, InvalidNameError
from casframe.names import MAX_REF_LENGTH, validate_ref_name
from casframe.refkinds import ACTION_RESULT_REF_PREFIX, ASSET_REF_PREFIX, writable_ref_name
from casframe.server.errors import StatusError

__all__ = [
    "BUILDSTREAM1_URI_PREFIX",
    "REF_URI_PREFIX",
    "Instances",
    "ResourceName",
    "action_ref_name",
    "asset_ref_name",
    "hashed_asset_ref_name",
    "check_digest_function",
    "parse_read_resource",
    "parse_write_resource",
    "validate_instance_name",
]

#: A Remote Asset URI naming a casframe ref directly: ``casframe:ref/NAME``.
REF_URI_PREFIX = "casframe:ref/"
#: The Remote Asset URI under which BuildStream 1.6 keeps the artifact that BuildStream 1.4
#: keeps in ReferenceStorage under ``KEY``: ``urn:fdc:buildstream.build:2020:v1:KEY``. Both
#: name the same ref ``KEY``, so the two generations share artifacts.
BUILDSTREAM1_URI_PREFIX = "urn:fdc:buildstream.build:2020:v1:"
#: BuildStream 2's artifact and source URIs: ``urn:fdc:buildstream.build:2020:artifact:NAME``
#: (NAME is ``project/element/key``) and ``…:source:NAME``.
_BUILDSTREAM2_URI = re.compile(r"urn:fdc:buildstream\.build:2020:(artifact|source):(.+)", re.S)
# What the held form of an asset ref name adds (``asset/held/…``, casframe.server.assets).
_HELD_ROOM = len("held/")

# Segments REAPI reserves in resource names, so they cannot be part of an instance name.
_RESERVED_SEGMENTS = frozenset(
    {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities",
     "compressed-blobs"}
)
# Longest decimal size accepted in a resource name (int64's 19 digits).
_MAX_SIZE_DIGITS = 19


def validate_instance_name(name: str) -> str:
    """Check an instance name the server is configured to serve.

    ``""`` is the default instance. Others are ``/``-separated segments, each a valid ref-name
    segment and none of REAPI's reserved words; ``_`` alone is refused because it stands for the
    default instance in action-cache ref names.
    """
    if name == "":
        return name
    if name == "_":
        raise InvalidNameError("instance name '_' is reserved (it stands for the default '')")
    try:
        validate_ref_name(name)
    except InvalidNameError as exc:
        raise InvalidNameError(f"invalid instance name {name!r}: {exc}") from None
    for segment in name.split("/"):
        if segment in _RESERVED_SEGMENTS:
            raise InvalidNameError(
                f"invalid instance name {name!r}: {segment!r} is reserved by the REAPI"
            )
    return name


class Instances:
    """The set of instance names one server answers for."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(validate_instance_name(n) for n in names)
        if not self.names:
            raise InvalidNameError("a server needs at least one instance name")

    def check(self, name: str) -> str:
        if name not in self.names:
            served = ", ".join(repr(n) for n in sorted(self.names))
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown instance name {name!r}: this server serves {served}",
            )
        return name


def check_digest_function(value: int) -> None:
    """Refuse any digest function but SHA256 (unset means SHA256 for 64-hex digests)."""
    if value not in (re_pb2.DigestFunction.UNKNOWN, re_pb2.DigestFunction.SHA256):
        try:
            name = re_pb2.DigestFunction.Value.Name(value)
        except ValueError:
            name = str(value)
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"digest function {name} is not supported: this server uses SHA256 only",
        )


@dataclass(frozen=True)
class ResourceName:
    """A parsed ByteStream resource name; ``compressor`` is how the content travels
    (``identity`` or ``zstd``; the digest is always the uncompressed content's)."""

    instance: str
    digest: Digest
    upload_id: str | None = None
    compressor: str = IDENTITY

    @property
    def compressed(self) -> bool:
        return self.compressor != IDENTITY


def _bad(name: str, expected: str) -> StatusError:
    return StatusError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"malformed resource name {name!r}: expected {expected}",
    )


def _digest(name: str, segments: list[str], expected: str) -> Digest:
    if len(segments) < 2:
        raise _bad(name, expected)
    hash_, size = segments[0], segments[1]
    if not size.isascii() or not size.isdigit() or len(size) > _MAX_SIZE_DIGITS:
        raise _bad(name, expected)
    try:
        return Digest(hash_, int(size))
    except InvalidDigestError as exc:
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed resource name {name!r}: {exc}"
        ) from None


def _compressor(name: str, compressor: str) -> str:
    if compressor in COMPRESSOR_VALUES:
        return compressor
    if compressor in KNOWN_COMPRESSORS:
        served = ", ".join(c for c in COMPRESSOR_VALUES if c != IDENTITY)
        raise StatusError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"resource {name!r}: compressor {compressor!r} is not supported by this server "
            f"(GetCapabilities lists {served}); use one of those or blobs/{{hash}}/{{size}}",
        )
    raise StatusError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"resource {name!r}: unknown compressor {compressor!r}",
    )


def _split(name: str, markers: frozenset[str], expected: str) -> tuple[str, list[str]]:
    if not name or "\x00" in name:
        raise _bad(name, expected)
    segments = name.split("/")
    for index, segment in enumerate(segments):
        if segment in markers:
            instance = "/".join(segments[:index])
            if index and any(s in ("", ".", "..") for s in segments[:index]):
                raise _bad(name, expected)
            return instance, segments[index:]
    raise _bad(name, expected)


_READ_FORM = ("'{instance}/blobs/{hash}/{size}' or "
              "'{instance}/compressed-blobs/{compressor}/{hash}/{size}'")
_WRITE_FORM = ("'{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]' or "
               "'{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{hash}/{size}[/...]'")


def parse_read_resource(name: str) -> ResourceName:
    """Parse ``{instance}/blobs/{hash}/{size}`` or
    ``{instance}/compressed-blobs/{compressor}/{hash}/{size}``."""
    instance, rest = _split(name, frozenset({"blobs", "compressed-blobs"}), _READ_FORM)
    compressor = IDENTITY
    if rest[0] == "compressed-blobs":
        if len(rest) != 4:
            raise _bad(name, _READ_FORM)
        compressor = _compressor(name, rest[1])
        rest = rest[1:]
    if len(rest) != 3:
        raise _bad(name, _READ_FORM)
    return ResourceName(instance, _digest(name, rest[1:], _READ_FORM), compressor=compressor)


def parse_write_resource(name: str) -> ResourceName:
    """Parse ``{instance}/uploads/{uuid}/blobs/{hash}/{size}[/metadata…]`` or
    ``{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{hash}/{size}[/metadata…]``."""
    instance, rest = _split(name, frozenset({"uploads"}), _WRITE_FORM)
    if len(rest) < 5 or not rest[1] or rest[2] not in ("blobs", "compressed-blobs"):
        raise _bad(name, _WRITE_FORM)
    upload_id = rest[1]
    rest = rest[2:]
    compressor = IDENTITY
    if rest[0] == "compressed-blobs":
        if len(rest) < 4:
            raise _bad(name, _WRITE_FORM)
        compressor = _compressor(name, rest[1])
        rest = rest[1:]
    # Anything after the size is optional metadata the REAPI lets clients append.
    return ResourceName(instance, _digest(name, rest[1:3], _WRITE_FORM), upload_id, compressor)


def action_ref_name(instance: str, action: Digest) -> str:
    """The ref under which the ActionResult of ``action`` in ``instance`` is kept."""
    return f"{ACTION_RESULT_REF_PREFIX}{instance or '_'}/{action.hash}/{action.size}"


def asset_ref_name(
    kind: str, instance: str, uri: str, qualifiers: Iterable[tuple[str, str]]
) -> str:
    """The ref a Remote Asset (``kind`` "blob" or "directory") URI and qualifiers map to.

    ``casframe:ref/NAME`` is the ref ``NAME`` itself (directories only, no qualifiers), which is
    how refs travel between casframe stores. BuildStream 1.6's artifact URI
    ``urn:fdc:buildstream.build:2020:v1:KEY`` as a directory without qualifiers is the ref
    ``KEY``, the name BuildStream 1.4 gives the same artifact in ReferenceStorage (store-wide,
    like every ReferenceStorage key). BuildStream 2's artifact and source URIs in the default
    instance without qualifiers keep their readable name:
    ``asset/{kind}/buildstream/{artifact|source}/NAME``. Any other URI is keyed by the sha256
    of a canonical JSON of instance, URI and sorted qualifiers: ``asset/{kind}/{key}``.
    """
    pairs = sorted(qualifiers)
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "qualifier names must be unique")
    if not uri:
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "empty URI")
    if uri.startswith(REF_URI_PREFIX):
        if kind != "directory":
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{uri!r}: casframe:ref/ URIs name directory trees; "
                "use FetchDirectory and PushDirectory",
            )
        if pairs:
            from google.rpc import error_details_pb2

            bad = error_details_pb2.BadRequest()
            for qualifier_name in names:
                bad.field_violations.add(
                    field="qualifiers.name", description=f'"{qualifier_name}" not supported'
                )
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{uri!r}: casframe:ref/ URIs take no qualifiers (got {', '.join(names)})",
                [bad],
            )
        # A user's ref, never one of the server's own: those are reserved whole.
        return writable_ref_name(uri[len(REF_URI_PREFIX) :])
    if uri.startswith(BUILDSTREAM1_URI_PREFIX) and kind == "directory" and not pairs:
        return writable_ref_name(uri[len(BUILDSTREAM1_URI_PREFIX) :])
    readable = _buildstream2_ref_name(kind, instance, uri, pairs)
    if readable is not None:
        return readable
    return hashed_asset_ref_name(kind, instance, uri, pairs)


def hashed_asset_ref_name(
    kind: str, instance: str, uri: str, qualifiers: Iterable[tuple[str, str]]
) -> str:
    """``asset/{kind}/{sha256 of instance, URI and sorted qualifiers}``: the ref of a generic
    Remote Asset entry (and where casframe kept BuildStream 2's entries before they had
    readable names)."""
    pairs = sorted(qualifiers)
    canonical = json.dumps(
        {"instance": instance, "uri": uri, "qualifiers": pairs},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )
    key = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{ASSET_REF_PREFIX}{kind}/{key}"


def _buildstream2_ref_name(
    kind: str, instance: str, uri: str, qualifiers: list[tuple[str, str]]
) -> str | None:
    """The readable ref name of a BuildStream 2 artifact or source URI, or None when the URI
    is not one or its name cannot be a ref name (it is then keyed by its hash)."""
    match = _BUILDSTREAM2_URI.fullmatch(uri)
    if match is None or instance or qualifiers:
        return None
    name = f"{ASSET_REF_PREFIX}{kind}/buildstream/{match[1]}/{match[2]}"
    try:
        validate_ref_name(name)
    except InvalidNameError:
        return None
    if len(name.encode()) + _HELD_ROOM > MAX_REF_LENGTH:
        return None  # its held form would be too long
    return name
