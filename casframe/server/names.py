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

from casframe.compression import COMPRESSOR_VALUES, IDENTITY, KNOWN_COMPRESSORS
from casframe.digest import Digest
from casframe.errors import InvalidDigestError, InvalidNameError
from casframe.names import MAX_REF_LENGTH, validate_ref_name
from casframe.refkinds import ACTION_RESULT_REF_PREFIX, ASSET_REF_PREFIX, writable_ref_name
from casframe.server.errors import StatusError
from casframe.server.functions import REAPI_FUNCTION_NAMES

__all__ = [
    "BUILDSTREAM1_URI_PREFIX",
    "REF_URI_PREFIX",
    "Instances",
    "ResourceName",
    "action_ref_name",
    "asset_ref_name",
    "hashed_asset_ref_name",
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
# What a hash segment looks like (lowercase hex; its length is checked with its function).
_HEX = re.compile(r"[0-9a-f]+")
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


@dataclass(frozen=True)
class ResourceName:
    """A parsed ByteStream resource name; ``compressor`` is how the content travels
    (``identity`` or ``zstd``; the digest is always the uncompressed content's);
    ``digest_function`` is the name's ``{digest_function}/`` segment, None when it has none
    (:mod:`casframe.server.functions` then infers it from the hash's length)."""

    instance: str
    digest: Digest
    upload_id: str | None = None
    compressor: str = IDENTITY
    digest_function: str | None = None

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


def _function(name: str, segments: list[str]) -> tuple[str | None, list[str]]:
    """Split an optional ``{digest_function}/`` segment off the ``{hash}/{size}…`` part.

    A segment is a function when REAPI names one so (lowercase); one that is not a hash but is
    followed by one is an unknown function, refused by name rather than as a malformed digest.
    """
    if not segments:
        return None, segments
    first = segments[0]
    if first in REAPI_FUNCTION_NAMES:
        return first, segments[1:]
    if (len(segments) >= 3 and first.isascii() and first.isalnum()
            and not _HEX.fullmatch(first) and _HEX.fullmatch(segments[1])):
        functions = ", ".join(sorted(REAPI_FUNCTION_NAMES))
        shown = first if len(first) <= 32 else f"{first[:32]}..."
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"resource {name!r}: unknown digest function {shown!r} (REAPI names them in "
            f"lowercase: {functions})",
        )
    return None, segments


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


_READ_FORM = ("'{instance}/blobs/[{digest_function}/]{hash}/{size}' or "
              "'{instance}/compressed-blobs/{compressor}/[{digest_function}/]{hash}/{size}'")
_WRITE_FORM = ("'{instance}/uploads/{uuid}/blobs/[{digest_function}/]{hash}/{size}[/...]' or "
               "'{instance}/uploads/{uuid}/compressed-blobs/{compressor}/"
               "[{digest_function}/]{hash}/{size}[/...]'")


def parse_read_resource(name: str) -> ResourceName:
    """Parse ``{instance}/blobs/[{digest_function}/]{hash}/{size}`` or
    ``{instance}/compressed-blobs/{compressor}/[{digest_function}/]{hash}/{size}``."""
    instance, rest = _split(name, frozenset({"blobs", "compressed-blobs"}), _READ_FORM)
    compressor = IDENTITY
    if rest[0] == "compressed-blobs":
        if len(rest) < 2:
            raise _bad(name, _READ_FORM)
        compressor = _compressor(name, rest[1])
        rest = rest[1:]
    function, tail = _function(name, rest[1:])
    if len(tail) != 2:
        raise _bad(name, _READ_FORM)
    return ResourceName(instance, _digest(name, tail, _READ_FORM), compressor=compressor,
                        digest_function=function)


def parse_write_resource(name: str) -> ResourceName:
    """Parse ``{instance}/uploads/{uuid}/blobs/[{digest_function}/]{hash}/{size}[/metadata…]``
    or ``{instance}/uploads/{uuid}/compressed-blobs/{compressor}/[{digest_function}/]{hash}/
    {size}[/metadata…]``."""
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
    function, tail = _function(name, rest[1:])
    # Anything after the size is optional metadata the REAPI lets clients append.
    return ResourceName(instance, _digest(name, tail[:2], _WRITE_FORM), upload_id, compressor,
                        function)


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
