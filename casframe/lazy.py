"""Modules named at the top of a module and imported when first used.

A short command (``casframe ref list``, ``casframe --version``) must not pay for importing
every algorithm the facade can run, nor gRPC, protobuf or boto3. A module that needs another
only in some of its functions names it at module level with :func:`lazy_module`::

    if TYPE_CHECKING:
        from casframe import maintenance
    else:
        maintenance = lazy_module("casframe.maintenance")

and uses ``maintenance.gc(...)`` as if it had been imported: type checkers see the real module,
and the import runs (through :func:`importlib.import_module`, under the import system's
per-module lock, so two threads never run a module twice) the first time an attribute is read.
This is click's lazy-group pattern for modules: dependencies stay declared at the top of the
file, where readers and the layer test (tests/test_architecture.py) find them.
"""

from __future__ import annotations

import importlib
import types

TYPE_CHECKING = False  # not typing's: see casframe/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

__all__ = ["lazy_module", "lazy_names"]


class _LazyModule(types.ModuleType):
    """Stands for module ``__name__`` until an attribute is read, then forwards to it."""

    def __getattr__(self, attribute: str) -> Any:
        # Only reached for attributes this object does not have: every one of the module's.
        # Nothing is copied here, so a later change to the module (a test patching one of
        # its functions) is seen; after the first call import_module is a dictionary lookup.
        return getattr(importlib.import_module(self.__name__), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> types.ModuleType:
    """Module ``name`` as an object that imports it when one of its attributes is first read."""
    return _LazyModule(name)


def lazy_names(
    package: str, modules: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A package's ``__getattr__`` (PEP 562) importing each public name of ``modules`` (name ->
    module) on first use and keeping it in ``namespace`` (the package's ``globals()``): how
    ``casframe`` and ``casframe.server`` cost almost nothing to import until a name is used."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    return __getattr__
