"""What the start-up path does without the standard library's heavier modules: store URLs split
without urllib.parse, paths made URLs without quoting them, SHA hashers made without importing
hashlib until the first one is asked for, the entry-point cache named without hashlib."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from urllib.parse import quote, urlsplit

import pytest

from casframe import StoreURL
from casframe.config import _path_url
from casframe.digestfunctions import DIGEST_FUNCTIONS, SHA256, SHA384, SHA512
from casframe.registry import split_url
from casframe.treesize import TreeSize

_URLS = [
    "file:///srv/cas", "file://relative/x", "file:/x", "s3://bucket/prefix/a",
    "grpc://host:1/instance", "grpcs://host", "http://[::1]:80/x", "a+b-c.d://x", "1abc://x",
    "://x", "file://a b", " file:///x", "file:///x\n", "FILE:///X", "file:///x?fsync=1",
    "file:///x#fragment", "file:///\u00e9", "c:\\x", "file:", "file:///", "x://[", "x://]",
    "x://a]b[", "file:///a%20b",
]


def _urlsplit(url: str) -> tuple[str, ...]:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return ("error", str(exc))
    return (parts.scheme, parts.netloc, parts.path, parts.query)


def _split(url: str) -> tuple[str, ...]:
    try:
        return split_url(url)
    except ValueError as exc:
        return ("error", str(exc))


def test_store_urls_split_as_urlsplit_splits_them() -> None:
    rng = random.Random(14)
    alphabet = "ab:/?#[]%. \t\n+-1A\u00e9"
    urls = _URLS + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(30_000)
    ]
    assert [u for u in urls if _split(u) != _urlsplit(u)] == []


def test_a_url_query_still_reaches_the_options() -> None:
    parsed = StoreURL.parse("file:///srv/cas?fsync=1&a=%20b&empty=")
    assert (parsed.scheme, parsed.netloc, parsed.path) == ("file", "", "/srv/cas")
    assert dict(parsed.options) == {"fsync": "1", "a": " b", "empty": ""}
    with pytest.raises(ValueError, match="Invalid IPv6 URL"):
        StoreURL.parse("grpc://[::1/x")


@pytest.mark.parametrize(
    "path", ["/srv/cas", "/srv/a b", "/srv/#1?x%", "/srv/\u00e9t\u00e9", "/srv/~user_.-x",
             "/srv/" + "\udcff"],
)
def test_a_path_becomes_the_url_quote_makes_of_it(path: str) -> None:
    assert _path_url(path) == "file://" + quote(path, errors="surrogateescape")


def test_sha_hashers_import_hashlib_on_first_use_and_then_are_hashlib_s() -> None:
    code = (
        "import sys\n"
        "from casframe.digestfunctions import SHA256, SHA512\n"
        "assert 'hashlib' not in sys.modules\n"
        "assert SHA256.hash_hex(b'abc').startswith('ba7816bf')\n"
        "import hashlib\n"
        "assert SHA256.new is hashlib.sha256 and SHA512.new is not hashlib.sha512\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout == "ok\n", result.stderr


@pytest.mark.parametrize("function", [SHA256, SHA384, SHA512], ids=lambda f: f.name)
def test_digest_functions_stay_equal_and_picklable(function) -> None:
    copy = pickle.loads(pickle.dumps(function))
    assert copy == function == DIGEST_FUNCTIONS[function.name]
    assert copy.hasher().hexdigest() == function.empty_hash
    assert copy.hash_hex(b"") == function.empty_hash


def test_a_tree_size_is_a_frozen_value() -> None:
    size = TreeSize(3, files=2, bytes=10)
    assert size == TreeSize(3, 2, 10) != TreeSize(3, 2, 11)
    assert hash(size) == hash(TreeSize(3, 2, 10)) and size != (3, 2, 10)
    assert repr(size) == "TreeSize(entries=3, files=2, bytes=10)" and TreeSize() == TreeSize(0)
    assert pickle.loads(pickle.dumps(size)) == size
    with pytest.raises(AttributeError, match="frozen"):
        size.entries = 4  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del size.bytes
