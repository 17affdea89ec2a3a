"""Where the tests find what ``scripts/test-prereqs`` installed, and what they say when it is
missing.

The tests install nothing themselves: a missing peer fails the test that needs it (never a
skip), inside CI (``CI=true``) as a broken machine set-up, elsewhere with the command that
installs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["PREREQS", "missing", "tool"]

# Read once, at import: tests that point HOME into their tmp_path must not move it.
PREREQS = Path(
    os.environ.get("CASFRAME_PREREQS")
    or Path(os.path.expanduser("~")) / ".cache" / "casframe-prereqs"
)


def missing(what: str) -> NoReturn:
    """Fail the test: ``what`` (a tool, a virtualenv) is not installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"{what} is missing on this CI machine: its set-up must run scripts/test-prereqs "
            "before the tests",
            pytrace=False,
        )
    pytest.fail(
        f"{what} is missing: run scripts/test-prereqs (or make prereqs) to install it",
        pytrace=False,
    )


def tool(name: str, package: str) -> str:
    """The path of the command ``name`` that Debian's ``package`` provides."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} (Debian's {package})")
    return found
