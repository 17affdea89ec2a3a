"""The ``s3://BUCKET/PREFIX`` backend: a casframe store in any S3-compatible bucket (boto3).

Layout under PREFIX, that of ``file://`` so that a local store copied with any S3 sync tool opens
as an S3 store and back::

    PREFIX/objects/ab/cdef…   blob with sha256 ``abcdef…``
    PREFIX/refs/heads/NAME    a serialized REAPI Digest message; user metadata ``accessed``
                              holds the last access (seconds since the epoch)
    PREFIX/digest/NAME/…      the same for the store of digest function NAME (blake3, …)

A blob becomes visible only as a whole: one PUT, or a multipart upload that is completed only
after the core has checked the content against its digest. When the digest is known before the
content (transfers, ByteStream writes, large local files, which the core hashes first), the
parts go to the final key from memory while the content arrives; otherwise the content is
spooled until the core knows its digest. Nothing here verifies content on its
way in or out (the core does; the one hash computed here tells a blob stored with another size
from a damaged one), and nothing above this module ever sees a botocore error: they are
translated into casframe's errors once, in :meth:`_Bucket.translate`.

The package, one job a module: :mod:`.options` (the URL's options), :mod:`.bucket` (the client,
its pool, error translation, reading and listing keys), :mod:`.uploads` (spooled and multipart
uploads), :mod:`.blobs` (:class:`S3BlobStore`), :mod:`.refs` (:class:`S3RefStore`), and this
module, the factory the plugin registers.
"""

from __future__ import annotations

from dataclasses import replace

from casframe import Store, StoreURL, layout
from casframe_s3.blobs import S3BlobStore
from casframe_s3.bucket import _Bucket
from casframe_s3.options import S3Options
from casframe_s3.refs import S3RefStore

__all__ = ["S3BlobStore", "S3RefStore", "open_s3_store"]


def open_s3_store(url: StoreURL) -> Store:
    """Factory for ``s3://BUCKET/PREFIX?options``; checks the bucket before returning. A
    digest function other than SHA-256 has its store under ``PREFIX/digest/NAME/``."""
    function = url.digest_function_for(S3BlobStore)
    options = S3Options.from_url(url)
    shown = options.location
    folder = layout.function_folder(function)
    if folder:
        options = replace(options, prefix="/".join(p for p in (options.prefix, folder) if p))
        shown += f"?digest_function={function.name}"
    bucket = _Bucket(options, function.hex_length)
    try:
        bucket.check_bucket()
    except BaseException:
        bucket.close()
        raise
    return Store(S3BlobStore(bucket, function), S3RefStore(bucket), url=shown)
