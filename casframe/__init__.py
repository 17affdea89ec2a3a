"""casframe: content-addressed artifact storage in the REAPI v2 data model.

This module is the public API; everything not listed in ``__all__`` is private.
"""

from casframe.digest import EMPTY_DIGEST, Digest, Hasher
from casframe.errors import (
    BackendUnavailableError,
    BlobNotFoundError,
    CasframeError,
    ConfigError,
    CorruptBlobError,
    DigestMismatchError,
    DuplicateSchemeError,
    InvalidDigestError,
    InvalidNameError,
    MissingDependencyError,
    PermissionDeniedError,
    RefNotFoundError,
    StoreNotFoundError,
    UnknownSchemeError,
    UnsafeTreeError,
    UnsupportedFileTypeError,
    UnsupportedOperationError,
)
from casframe.hookspecs import hookimpl
from casframe.names import validate_entry_name, validate_ref_name
from casframe.plugins import PluginInfo, list_plugins, open_store, registered_plugin
from casframe.progress import Progress
from casframe.registry import BackendRegistry, StoreURL
from casframe.remotes import RemoteOutcome, Remotes, RemotesError, RemotesReport, RemoteStatus
from casframe.spi import BlobInfo, BlobStore, BlobWriter, Capability, RefInfo, RefStore
from casframe.store import Store

__version__ = "0.1.0"

__all__ = [
    "EMPTY_DIGEST",
    "BackendRegistry",
    "BackendUnavailableError",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobStore",
    "BlobWriter",
    "Capability",
    "CasframeError",
    "ConfigError",
    "CorruptBlobError",
    "Digest",
    "DigestMismatchError",
    "DuplicateSchemeError",
    "Hasher",
    "InvalidDigestError",
    "InvalidNameError",
    "MissingDependencyError",
    "PermissionDeniedError",
    "PluginInfo",
    "Progress",
    "RefInfo",
    "RefNotFoundError",
    "RefStore",
    "RemoteOutcome",
    "RemoteStatus",
    "Remotes",
    "RemotesError",
    "RemotesReport",
    "Store",
    "StoreNotFoundError",
    "StoreURL",
    "UnknownSchemeError",
    "UnsafeTreeError",
    "UnsupportedFileTypeError",
    "UnsupportedOperationError",
    "__version__",
    "hookimpl",
    "list_plugins",
    "open_store",
    "registered_plugin",
    "validate_entry_name",
    "validate_ref_name",
]
