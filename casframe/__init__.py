"""casframe: content-addressed artifact storage in the REAPI v2 data model.

This module is the public API; everything not listed in ``__all__`` is private.
"""

from casframe.lazy import lazy_names

# Not typing's: the console script holds the garbage collector off from here on, and importing
# typing, before it can, would cost it (casframe.__main__).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from casframe.digest import EMPTY_DIGEST, Digest, Hasher
    from casframe.digestfunctions import DIGEST_FUNCTIONS, SHA256, DigestFunction
    from casframe.errors import (
        BackendContractError,
        BackendUnavailableError,
        BlobNotFoundError,
        CasframeError,
        CheckoutError,
        CompressedDataError,
        ConfigError,
        CorruptBlobError,
        DigestMismatchError,
        DuplicateSchemeError,
        InvalidDigestError,
        InvalidNameError,
        MissingDependencyError,
        PermissionDeniedError,
        RefConflictError,
        RefNotFoundError,
        RemoteProtocolError,
        StoreNotFoundError,
        TreeTooLargeError,
        UnknownSchemeError,
        UnsafeTreeError,
        UnsupportedDigestFunctionError,
        UnsupportedFileTypeError,
        UnsupportedOperationError,
        WorkerError,
    )
    from casframe.hookspecs import hookimpl
    from casframe.names import validate_entry_name, validate_ref_name
    from casframe.plugins import (
        PluginInfo,
        StoreOpener,
        list_plugins,
        open_store,
        registered_plugin,
    )
    from casframe.progress import Progress
    from casframe.registry import BackendRegistry, StoreURL
    from casframe.remotes import RemoteOutcome, Remotes, RemotesError, RemotesReport, RemoteStatus
    from casframe.spi import (
        BlobInfo,
        BlobLimits,
        BlobStore,
        BlobWriter,
        Capability,
        RefCapability,
        RefInfo,
        RefStore,
        StrayEntry,
    )
    from casframe.store import Store
    from casframe.treesize import TreeLimits

# Every public name, imported from its module on first use: `import casframe` (and so the
# `casframe` command's start-up) costs almost nothing until a name is used.
_LAZY = {
    "BackendRegistry": "casframe.registry",
    "BackendContractError": "casframe.errors",
    "BackendUnavailableError": "casframe.errors",
    "BlobInfo": "casframe.spi",
    "BlobLimits": "casframe.spi",
    "BlobNotFoundError": "casframe.errors",
    "BlobStore": "casframe.spi",
    "BlobWriter": "casframe.spi",
    "Capability": "casframe.spi",
    "CasframeError": "casframe.errors",
    "CheckoutError": "casframe.errors",
    "CompressedDataError": "casframe.errors",
    "ConfigError": "casframe.errors",
    "CorruptBlobError": "casframe.errors",
    "DIGEST_FUNCTIONS": "casframe.digestfunctions",
    "Digest": "casframe.digest",
    "DigestFunction": "casframe.digestfunctions",
    "DigestMismatchError": "casframe.errors",
    "DuplicateSchemeError": "casframe.errors",
    "EMPTY_DIGEST": "casframe.digest",
    "Hasher": "casframe.digest",
    "InvalidDigestError": "casframe.errors",
    "InvalidNameError": "casframe.errors",
    "MissingDependencyError": "casframe.errors",
    "PermissionDeniedError": "casframe.errors",
    "PluginInfo": "casframe.plugins",
    "Progress": "casframe.progress",
    "RefCapability": "casframe.spi",
    "RefConflictError": "casframe.errors",
    "RefInfo": "casframe.spi",
    "RefNotFoundError": "casframe.errors",
    "RefStore": "casframe.spi",
    "RemoteOutcome": "casframe.remotes",
    "RemoteProtocolError": "casframe.errors",
    "RemoteStatus": "casframe.remotes",
    "Remotes": "casframe.remotes",
    "RemotesError": "casframe.remotes",
    "RemotesReport": "casframe.remotes",
    "Store": "casframe.store",
    "StoreNotFoundError": "casframe.errors",
    "StoreOpener": "casframe.plugins",
    "StoreURL": "casframe.registry",
    "StrayEntry": "casframe.spi",
    "TreeLimits": "casframe.treesize",
    "TreeTooLargeError": "casframe.errors",
    "UnknownSchemeError": "casframe.errors",
    "UnsafeTreeError": "casframe.errors",
    "SHA256": "casframe.digestfunctions",
    "UnsupportedDigestFunctionError": "casframe.errors",
    "UnsupportedFileTypeError": "casframe.errors",
    "UnsupportedOperationError": "casframe.errors",
    "WorkerError": "casframe.errors",
    "hookimpl": "casframe.hookspecs",
    "list_plugins": "casframe.plugins",
    "open_store": "casframe.plugins",
    "registered_plugin": "casframe.plugins",
    "validate_entry_name": "casframe.names",
    "validate_ref_name": "casframe.names",
}


__getattr__ = lazy_names(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "DIGEST_FUNCTIONS",
    "EMPTY_DIGEST",
    "SHA256",
    "BackendContractError",
    "BackendRegistry",
    "BackendUnavailableError",
    "BlobInfo",
    "BlobLimits",
    "BlobNotFoundError",
    "BlobStore",
    "BlobWriter",
    "Capability",
    "CasframeError",
    "CheckoutError",
    "CompressedDataError",
    "ConfigError",
    "CorruptBlobError",
    "Digest",
    "DigestFunction",
    "DigestMismatchError",
    "DuplicateSchemeError",
    "Hasher",
    "InvalidDigestError",
    "InvalidNameError",
    "MissingDependencyError",
    "PermissionDeniedError",
    "PluginInfo",
    "Progress",
    "RefCapability",
    "RefConflictError",
    "RefInfo",
    "RefNotFoundError",
    "RefStore",
    "RemoteOutcome",
    "RemoteProtocolError",
    "RemoteStatus",
    "Remotes",
    "RemotesError",
    "RemotesReport",
    "Store",
    "StoreNotFoundError",
    "StoreOpener",
    "StoreURL",
    "StrayEntry",
    "TreeLimits",
    "TreeTooLargeError",
    "UnknownSchemeError",
    "UnsafeTreeError",
    "UnsupportedDigestFunctionError",
    "UnsupportedFileTypeError",
    "UnsupportedOperationError",
    "WorkerError",
    "__version__",
    "hookimpl",
    "list_plugins",
    "open_store",
    "registered_plugin",
    "validate_entry_name",
    "validate_ref_name",
]
