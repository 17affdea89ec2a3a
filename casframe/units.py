"""Sizes written by people (``500M``, ``10G``, ``1.5T``), parsed once for every option that
takes one. This module imports nothing of casframe's, so any module may use it."""

from __future__ import annotations

import re

__all__ = ["parse_size"]

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``10G``, ``500M``, ``1.5G``, ``64K``, ``1T`` or a plain number of bytes.

    Suffixes are binary multiples (K = 1024) and case-insensitive; ``B``/``iB`` may follow them
    (``10GB``, ``10GiB``). Fractions of a byte are dropped.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    match = _SIZE_RE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional K, M, G or T "
            "suffix (binary multiples), e.g. 500M, 10G or 1.5G"
        )
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])
