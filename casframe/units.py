"""Sizes, durations and counts as casframe reads and prints them: one convention everywhere.

In: a plain number is bytes; ``K``, ``M``, ``G``, ``T`` alone or with ``iB`` are binary
multiples (``20K`` = ``20KiB`` = 20,480 bytes), and ``kB``, ``MB``, ``GB``, ``TB`` are decimal
ones (``20kB`` = 20,000 bytes), so each spelling means what it says. Out: sizes in binary
units, as most spellings mean (``20 KiB``, ``1.5 GiB``), counts with thousands separators
(``20,441 objects``). Pure functions, no imports beyond the standard library: the CLI, the
server's options and the maintenance API all use these.
"""

from __future__ import annotations

import re

__all__ = ["format_count", "format_size", "parse_duration", "parse_size"]

_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
# Patterns are compiled by ``re`` on first use (and cached there), not when the module loads:
# every command imports this module, few parse a size.
_SIZE = r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgt]?)(?P<suffix>ib|b)?"
_EXAMPLES = "e.g. 500M, 10GiB, 20kB or 1.5G"
_PRINTED = ("KiB", "MiB", "GiB", "TiB")


def parse_size(text: str | int) -> int:
    """Bytes from ``1234``, ``20K``, ``20KiB`` (both 20,480), ``20kB`` (20,000), ``1.5G``.

    Case does not matter in the multiple (``20k`` = ``20K``); fractions of a byte are dropped.
    Raises ValueError naming the text for anything else, and for a negative number.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    match = re.fullmatch(_SIZE, str(text).strip(), re.IGNORECASE)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional K, M, G or T "
            f"(binary: K = KiB = 1024) or kB, MB, GB, TB (decimal: kB = 1000), {_EXAMPLES}"
        )
    unit = match["unit"].lower()
    suffix = (match["suffix"] or "").lower()
    multiple = _DECIMAL[unit] if suffix == "b" and unit else _BINARY[unit]
    return int(float(match["number"]) * multiple)


def format_size(count: int | float) -> str:
    """``512 B``, ``20 KiB``, ``16.5 KiB``, ``1.5 GiB``: binary units, one decimal at most."""
    if count < 1024:
        return f"{count:,.0f} B"
    value = float(count)
    for unit in _PRINTED:
        value /= 1024
        if value < 1024 or unit == _PRINTED[-1]:
            break
    text = f"{value:,.1f}".removesuffix(".0")
    return f"{text} {unit}"


def format_count(count: int, noun: str, plural: str = "") -> str:
    """``1 object``, ``20,441 objects``: the number with separators and the noun agreeing."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)"
_DURATION = r"(?:(?:\d+(?:\.\d*)?|\.\d+)\s*[smhdw]?\s*)+"


def parse_duration(text: str | float) -> float:
    """Seconds from ``30s``, ``10m``, ``1h``, ``2d``, ``1w``, ``1h30m``, ``0`` or a plain number."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return float(text)
    stripped = str(text).strip()
    if not stripped or re.fullmatch(_DURATION, stripped, re.IGNORECASE) is None:
        raise ValueError(
            f"invalid duration {text!r}: expected seconds or a number with a unit s, m, h, d "
            "or w, e.g. 30s, 10m, 1h or 0"
        )
    return sum(
        float(number) * _DURATION_UNITS[unit.lower()]
        for number, unit in re.findall(_DURATION_PART, stripped, re.IGNORECASE)
    )
