"""Validation of ref names and of names inside Directory trees.

Every name that reaches a backend or the file system passes through here first, so a backend
can map names to keys or paths without worrying about traversal. The namespaces the server
reserves, and what each kind of ref keeps alive, are in :mod:`casframe.refkinds`.
"""

from __future__ import annotations

from casframe.errors import InvalidNameError

__all__ = [
    "MAX_REF_LENGTH",
    "MAX_REF_SEGMENT_LENGTH",
    "entry_names_are_safe",
    "split_tree_path",
    "validate_entry_name",
    "validate_ref_name",
]

# Longer names would not fit an S3 key with a prefix (1024 bytes) nor a file name on most
# file systems once split into segments.
MAX_REF_LENGTH = 512
# Each segment of a ref name is a file or folder name in file:// stores: 255 bytes is NAME_MAX
# of Linux and of nearly every file system, so a longer segment could be stored nowhere there.
MAX_REF_SEGMENT_LENGTH = 255


def _segment_problem(segment: str) -> str | None:
    if segment == "":
        return "empty path segment"
    if segment in (".", ".."):
        return f"segment {segment!r} is not allowed"
    if "\x00" in segment:
        return "NUL character"
    if "/" in segment:
        return "'/' is not allowed in a single name"
    if "\\" in segment:
        return "backslash is not allowed"
    return None


def validate_ref_name(name: str) -> str:
    """Return ``name`` if it is a valid ref name, else raise :class:`InvalidNameError`.

    Ref names are ``/``-separated segments (``project/main``); no segment may be empty, ``.``
    or ``..``, and no name may start or end with ``/`` or contain NUL or backslash; a name
    is valid UTF-8, of at most :data:`MAX_REF_LENGTH` bytes, each segment of at most
    :data:`MAX_REF_SEGMENT_LENGTH`.
    """
    if not isinstance(name, str) or not name:
        raise InvalidNameError("invalid ref name: empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable bytes of a command line argument: no REAPI peer could send the name.
        raise InvalidNameError(f"invalid ref name {name!r}: not valid UTF-8") from None
    if len(encoded) > MAX_REF_LENGTH:
        raise InvalidNameError(f"invalid ref name: longer than {MAX_REF_LENGTH} bytes")
    if name.startswith("/"):
        raise InvalidNameError(f"invalid ref name {name!r}: must not start with '/'")
    for segment in name.split("/"):
        problem = _segment_problem(segment)
        if problem:
            raise InvalidNameError(f"invalid ref name {name!r}: {problem}")
        length = len(segment.encode("utf-8"))
        if length > MAX_REF_SEGMENT_LENGTH:
            raise InvalidNameError(
                f"invalid ref name {_shorten(name)}: segment {_shorten(segment)} is {length} "
                f"bytes long, over the limit of {MAX_REF_SEGMENT_LENGTH}"
            )
    return name


def _shorten(text: str, keep: int = 40) -> str:
    """``text`` quoted, cut in the middle when long: error lines stay readable."""
    if len(text) <= 2 * keep:
        return repr(text)
    return repr(f"{text[:keep]}…{text[-keep:]}")


def entry_names_are_safe(names: list[str]) -> bool:
    """Whether :func:`validate_entry_name` accepts every one of ``names``.

    One pass over all of them, for the thousands of names of a tree; call
    :func:`validate_entry_name` on each to learn which one is refused and why.
    """
    if not all(type(name) is str for name in names):
        return False
    joined = "/".join(names)
    return (
        joined.count("/") == max(len(names) - 1, 0)  # no name holds a "/"
        and "\x00" not in joined
        and "\\" not in joined
        and _SPECIAL_SEGMENTS.isdisjoint(names)
    )


_SPECIAL_SEGMENTS = frozenset({"", ".", ".."})


def validate_entry_name(name: str) -> str:
    """Return ``name`` if it is a safe single path segment for a Directory entry."""
    problem = _segment_problem(name) if isinstance(name, str) else "not a string"
    if problem:
        raise InvalidNameError(f"unsafe name {name!r} in tree: {problem}")
    return name


def split_tree_path(path: str) -> list[str]:
    """Split a path inside a tree (``a/b/c``; leading/trailing ``/`` and ``.`` ignored)."""
    segments = [s for s in path.split("/") if s not in ("", ".")]
    for segment in segments:
        validate_entry_name(segment)
    return segments
