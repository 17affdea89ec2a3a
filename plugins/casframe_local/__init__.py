"""The ``file://PATH`` backend: casframe's embedded default.

Layout (that of BuildStream 1.x's CAS cache, which therefore opens as it is)::

    PATH/objects/ab/cdef…   blob with sha256 ``abcdef…``, read-only
    PATH/refs/heads/NAME    a serialized REAPI Digest message; its mtime is the last access
    PATH/tmp/               uploads in progress

A blob is written to a new file in ``tmp/`` and renamed into ``objects/``, so no partial object
is ever visible and several processes may write the same blob at once. Options (URL query):
``fsync=true`` flushes each object to disk before it becomes visible (survives power loss, at a
large cost in speed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from casframe import hookimpl

if TYPE_CHECKING:  # loading the plugin (every command does) imports no registry
    from casframe import BackendRegistry

# The factory lives in casframe_local.store (the stores in casframe_local.blobs and .refs),
# imported when a file:// store is first opened: loading the plugin (every command does) costs
# nothing more.


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    registry.add(
        "file",
        "casframe_local.store:open_local_store",
        description="local directory (BuildStream CAS layout)",
    )
