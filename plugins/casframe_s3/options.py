"""The options of ``s3://BUCKET/PREFIX`` store URLs, parsed and checked before boto3 is touched.

Options arrive in the URL query or from a named store's ``options`` table in the config file
(the query wins); both reach here through :class:`casframe.StoreURL`. An unknown option or a bad
value is a :class:`casframe.ConfigError` naming the option, so a typo never passes silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from urllib.parse import unquote

from casframe import ConfigError, StoreURL

__all__ = ["S3Options", "parse_size"]

MiB = 1 << 20
# S3's smallest multipart part (except the last one) and its largest single PUT.
MIN_PART_SIZE = 5 * MiB
MAX_SINGLE_PUT = 5 << 30

_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,254}")  # S3 plus what S3-compatible servers allow


def parse_size(text: str, option: str, url: str) -> int:
    """``"8MiB"``, ``"8M"``, ``"8388608"`` → bytes (binary units, as boto3's own sizes)."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ConfigError(
            f"option {option}={text!r} in {url} is not a size (e.g. 8MiB, 16M, 1048576)"
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class S3Options:
    """Everything an ``s3://`` URL can say, with the defaults that apply when it does not."""

    bucket: str
    #: Key prefix without leading or trailing ``/`` (``""`` for the bucket's root).
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: ``auto`` (boto3's choice), ``path`` (most S3-compatible servers) or ``virtual``.
    addressing_style: str = "auto"
    #: Concurrent requests of one store: checks, small uploads and downloads, multipart parts.
    #: 10 is the AWS CLI's and boto3's default; each thread moving data holds a few MiB.
    max_concurrency: int = 10
    #: Blobs at least this large are uploaded in parts, concurrently (boto3's default).
    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    #: botocore's retry modes: ``standard`` (default) or ``adaptive`` (client-side rate
    #: limiting on throttling); ``legacy`` is accepted for old deployments.
    retry_mode: str = "standard"
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # ``when_required`` sends and checks checksums only where S3 demands them, so servers that
    # predate the CRC32 checksum headers of 2025's SDKs keep working; ``when_supported`` asks
    # for end-to-end checksums on every upload and download where the server offers them.
    request_checksum_calculation: str = "when_required"
    response_checksum_validation: str = "when_required"
    # Signing each upload's body (SigV4) costs a second pass over it and a few MiB per thread;
    # TLS protects content in transit and the core verifies every blob it reads.
    payload_signing: bool = False

    @property
    def key_prefix(self) -> str:
        """What every key of this store starts with: ``"PREFIX/"`` or ``""``."""
        return f"{self.prefix}/" if self.prefix else ""

    @property
    def location(self) -> str:
        """``s3://BUCKET/PREFIX`` as used in messages (without the options)."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint_description(self) -> str:
        if self.endpoint_url:
            return self.endpoint_url
        return f"AWS S3 ({self.region})" if self.region else "AWS S3"

    @classmethod
    def from_url(cls, url: StoreURL) -> S3Options:
        bucket, prefix = _bucket_and_prefix(url)
        url.check_options({f.name for f in fields(cls)} - {"bucket", "prefix"})
        read = _OptionReader(url)
        for name in ("endpoint_url", "region", "profile"):
            read.text_option(name)
        endpoint = read.values.get("endpoint_url")
        if isinstance(endpoint, str) and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"option endpoint_url={endpoint!r} in {url.url} must start with http:// or https://"
            )
        read.choice("addressing_style", ("auto", "path", "virtual"))
        read.choice("retry_mode", ("standard", "adaptive", "legacy"))
        read.choice("request_checksum_calculation", ("when_required", "when_supported"))
        read.choice("response_checksum_validation", ("when_required", "when_supported"))
        read.boolean("payload_signing")
        read.number("max_concurrency", int, 1)
        read.number("max_attempts", int, 1)
        read.number("connect_timeout", float, 0.001)
        read.number("read_timeout", float, 0.001)
        read.size("multipart_threshold", 1)
        read.size("multipart_chunksize", MIN_PART_SIZE)
        options = cls(bucket=bucket, prefix=prefix, **read.values)  # type: ignore[arg-type]
        if options.multipart_threshold > MAX_SINGLE_PUT:
            raise ConfigError(
                f"option multipart_threshold in {url.url} exceeds 5 GiB, S3's largest single PUT"
            )
        return options


def _bucket_and_prefix(url: StoreURL) -> tuple[str, str]:
    """The bucket and the key prefix of ``s3://BUCKET/PREFIX``, checked."""
    bucket = url.netloc
    if not bucket:
        raise ConfigError(f"s3:// URL needs a bucket (s3://BUCKET/PREFIX): {url.url!r}")
    if "@" in bucket or ":" in bucket:
        raise ConfigError(
            f"s3:// URL {url.url!r}: put no credentials or port in the bucket name; "
            "credentials come from boto3's chain and the server from endpoint_url="
        )
    if not _BUCKET_RE.fullmatch(bucket):
        raise ConfigError(f"s3:// URL {url.url!r}: {bucket!r} is not a valid bucket name")
    prefix = unquote(url.path).strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(
            f"s3:// URL {url.url!r}: the prefix {prefix!r} has an empty, '.' or '..' segment"
        )
    return bucket, prefix


class _OptionReader:
    """Reads a URL's options one kind at a time into ``values``; a bad value is a ConfigError
    naming the option, the URL and what would be accepted. Absent or blank options are left
    out, so the dataclass's defaults apply."""

    def __init__(self, url: StoreURL) -> None:
        self.url = url.url
        self.raw = dict(url.options)
        self.values: dict[str, object] = {}

    def text(self, name: str) -> str | None:
        value = self.raw.get(name)
        return value.strip() if value is not None and value.strip() else None

    def text_option(self, name: str) -> None:
        value = self.text(name)
        if value is not None:
            self.values[name] = value

    def choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = self.text(name)
        if value is None:
            return
        if value.lower() not in allowed:
            raise ConfigError(
                f"option {name}={value!r} in {self.url} must be one of: {', '.join(allowed)}"
            )
        self.values[name] = value.lower()

    def number(self, name: str, kind: type[int] | type[float], minimum: float) -> None:
        value = self.text(name)
        if value is None:
            return
        try:
            parsed = kind(value)
        except ValueError:
            parsed = None
        # float() also reads "nan" (never less than anything) and "inf" (no time-out).
        if parsed is None or not math.isfinite(parsed) or parsed < minimum:
            raise ConfigError(
                f"option {name}={value!r} in {self.url} must be a finite number of at least "
                f"{minimum}"
            )
        self.values[name] = parsed

    def boolean(self, name: str) -> None:
        value = self.text(name)
        if value is None:
            return
        if value.lower() not in _BOOLEANS:
            raise ConfigError(f"option {name}={value!r} in {self.url} is not a boolean")
        self.values[name] = _BOOLEANS[value.lower()]

    def size(self, name: str, minimum: int) -> None:
        value = self.text(name)
        if value is None:
            return
        parsed = parse_size(value, name, self.url)
        if parsed < minimum:
            raise ConfigError(
                f"option {name}={value!r} in {self.url} must be at least {minimum} bytes"
            )
        self.values[name] = parsed
