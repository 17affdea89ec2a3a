"""Frozen value classes, made without the cost of :mod:`dataclasses`.

Defining one ``@dataclass(frozen=True, slots=True)`` compiles generated source for each of its
methods and builds the class twice: 3.5 to 4.5 M instructions, a tenth of what ``python -c
pass`` costs, and every short command (``casframe ref list``) defined a dozen of them before
doing any work. :func:`value_class` gives a class written the same way (annotated fields,
defaults, :func:`value_field` for the rest) what users and code rely on, from shared functions
and no generated source::

    @value_class
    class Entry:
        name: str
        size: int = 0
        options: Mapping[str, str] = value_field(default_factory=dict)

* keyword and positional construction, defaults and default factories, then ``__post_init__``;
* ``__slots__``, and no assignment nor deletion afterwards
  (:class:`dataclasses.FrozenInstanceError`);
* equality and hash over the compared fields (values of another class are never equal), a
  ``Name(field=value, ...)`` repr, pickling and copying, ``__match_args__``;
* :func:`replace`; and ``dataclasses.replace``, ``fields``, ``asdict`` and ``is_dataclass``
  work on these classes as on dataclasses (the field descriptions are made, and the
  :mod:`dataclasses` module imported, the first time one of them asks).

The generated ``__init__`` binds its arguments in Python: a class made for every blob or every
file (:class:`~casframe.backendvalues.BlobInfo`) writes its own ``__init__`` with the same
parameters, which is then kept, and sets its fields with ``object.__setattr__``. Type checkers
see these classes as frozen dataclasses (:func:`typing.dataclass_transform`). This module must
never import anything of casframe but :mod:`casframe.lazy`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, dataclass_transform

from casframe.lazy import lazy_module

if TYPE_CHECKING:
    import dataclasses
else:  # for FrozenInstanceError and the field descriptions dataclasses' functions read
    dataclasses = lazy_module("dataclasses")

__all__ = ["replace", "value_class", "value_field"]

_T = TypeVar("_T")
_set_field = object.__setattr__


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Any = _Missing()


class _Field:
    """What :func:`value_field` returns, read once by :func:`value_class`."""

    __slots__ = ("compare", "default", "factory", "repr")

    def __init__(self, default: Any, factory: Any, repr: bool, compare: bool) -> None:  # noqa: A002
        self.default, self.factory, self.repr, self.compare = default, factory, repr, compare


def value_field(
    *,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] | None = None,
    repr: bool = True,  # noqa: A002
    compare: bool = True,
) -> Any:
    """A field's default (or ``default_factory``, called for each new value), and whether it is
    shown by ``repr`` and taken into equality and hash (as :func:`dataclasses.field`)."""
    if default is not _MISSING and default_factory is not None:
        raise ValueError("value_field() takes a default or a default_factory, not both")
    factory = _MISSING if default_factory is None else default_factory
    return _Field(default, factory, repr, compare)


class _Spec:
    """The fields of one value class, in order, and what its shared methods need of them."""

    __slots__ = ("compare_names", "count", "defaults", "factories", "names", "options",
                 "repr_names", "types")

    def __init__(self, cls: type) -> None:
        annotations: dict[str, Any] = cls.__dict__.get("__annotations__", {})
        self.names: tuple[str, ...] = tuple(
            name for name, kind in annotations.items() if not _is_class_var(kind)
        )
        self.types = {name: annotations[name] for name in self.names}
        self.count = len(self.names)
        self.defaults: dict[str, Any] = {}
        self.factories: dict[str, Callable[[], Any]] = {}
        self.options: dict[str, _Field] = {}
        for name in self.names:
            given = cls.__dict__.get(name, _MISSING)
            option = given if isinstance(given, _Field) else _Field(given, _MISSING, True, True)
            self.options[name] = option
            if option.factory is not _MISSING:
                self.factories[name] = option.factory
            elif option.default is not _MISSING:
                self.defaults[name] = option.default
            elif self.defaults or self.factories:
                raise TypeError(f"{cls.__qualname__}: non-default field {name!r} follows a "
                                "field with a default")
        self.repr_names = [name for name in self.names if self.options[name].repr]
        self.compare_names = tuple(name for name in self.names if self.options[name].compare)

    def bind(self, owner: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The field values of a call with keywords, defaults or the wrong count, or the
        TypeError Python gives for such a call of a function."""
        if len(args) > self.count:
            raise TypeError(f"{owner}() takes {self.count} positional arguments but "
                            f"{len(args)} were given")
        values = dict(zip(self.names, args, strict=False))
        for name, value in kwargs.items():
            if name not in self.types:
                raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"{owner}() got multiple values for argument {name!r}")
            values[name] = value
        missing = [n for n in self.names if n not in values and n not in self.defaults
                   and n not in self.factories]
        if missing:
            raise TypeError(f"{owner}() missing {len(missing)} required argument"
                            f"{'s' if len(missing) > 1 else ''}: "
                            f"{', '.join(repr(n) for n in missing)}")
        return [
            values[name] if name in values
            else self.factories[name]() if name in self.factories
            else self.defaults[name]
            for name in self.names
        ]


def _is_class_var(kind: Any) -> bool:
    text = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _tuple_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """``obj -> (obj.a, obj.b, ...)``, in C (attrgetter gives a bare value for one name)."""
    if len(names) == 1:
        single = operator.attrgetter(names[0])
        return lambda obj: (single(obj),)
    if not names:
        return lambda obj: ()
    return operator.attrgetter(*names)


def _methods(cls: type, spec: _Spec) -> dict[str, Any]:
    """The shared methods of one value class, as closures over its fields."""
    names, count, owner = spec.names, spec.count, cls.__name__
    post_init = getattr(cls, "__post_init__", None)
    compared = _tuple_getter(spec.compare_names)
    every = _tuple_getter(names)
    shown = spec.repr_names

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        values = args if len(args) == count and not kwargs else spec.bind(owner, args, kwargs)
        for name, value in zip(names, values, strict=True):
            _set_field(self, name, value)
        if post_init is not None:
            post_init(self)

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(compared(self) == compared(other))

    def __hash__(self: Any) -> int:
        return hash(compared(self))

    def __repr__(self: Any) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{self.__class__.__qualname__}({fields})"

    def __setattr__(self: Any, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(
            f"cannot assign to field {name!r}: a {self.__class__.__name__} is frozen")

    def __delattr__(self: Any, name: str) -> None:
        raise dataclasses.FrozenInstanceError(
            f"cannot delete field {name!r}: a {self.__class__.__name__} is frozen")

    def __reduce__(self: Any) -> tuple[type, tuple[Any, ...]]:
        return (self.__class__, every(self))

    methods = {"__init__": __init__, "__eq__": __eq__, "__hash__": __hash__,
               "__repr__": __repr__, "__reduce__": __reduce__, "__replace__": replace}
    # Those the class writes itself are kept (a class defining __eq__ has __hash__ = None).
    own = {name for name, method in cls.__dict__.items() if method is not None}
    methods = {name: method for name, method in methods.items() if name not in own}
    for name, method in methods.items():
        if name != "__replace__":
            method.__qualname__ = f"{cls.__qualname__}.{name}"
    return {**methods, "__setattr__": __setattr__, "__delattr__": __delattr__}


class _DataclassFields:
    """``__dataclass_fields__``, described by :mod:`dataclasses` the first time it is read
    (``dataclasses.replace``, ``fields``, ``asdict``, ``is_dataclass`` read it), then kept."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec

    def __get__(self, instance: object, owner: type) -> dict[str, Any]:
        spec = self.spec
        described = []
        for name in spec.names:
            option = spec.options[name]
            default = {} if option.default is _MISSING else {"default": option.default}
            if option.factory is not _MISSING:
                default = {"default_factory": option.factory}
            described.append((name, spec.types[name], dataclasses.field(
                repr=option.repr, compare=option.compare, **default)))
        twin = dataclasses.make_dataclass(owner.__name__, described, frozen=True)
        fields: dict[str, Any] = vars(twin)["__dataclass_fields__"]
        type.__setattr__(owner, "__dataclass_fields__", fields)
        return fields


@dataclass_transform(frozen_default=True, field_specifiers=(value_field,))
def value_class(cls: type[_T]) -> type[_T]:
    """``cls`` as a frozen, slotted value class (see the module's documentation)."""
    if any(base is not object for base in cls.__bases__):
        raise TypeError(f"{cls.__qualname__}: a value class derives from object only")
    spec = _Spec(cls)
    namespace = {
        key: value for key, value in cls.__dict__.items()
        if key not in spec.options and key not in ("__dict__", "__weakref__")
    }
    namespace.update(_methods(cls, spec))
    namespace["__slots__"] = spec.names
    namespace["__qualname__"] = cls.__qualname__
    namespace["__match_args__"] = spec.names
    namespace["__dataclass_fields__"] = _DataclassFields(spec)
    namespace["__value_fields__"] = spec.names
    metaclass: type = type(cls)
    made: type[_T] = metaclass(cls.__name__, cls.__bases__, namespace)
    return made


def replace(value: _T, /, **changes: Any) -> _T:
    """A copy of the value class instance ``value`` with the fields ``changes`` names changed
    (checked again by its ``__init__``), as :func:`dataclasses.replace` makes one."""
    names: tuple[str, ...] = value.__class__.__value_fields__  # type: ignore[attr-defined]
    current = {name: getattr(value, name) for name in names}
    return value.__class__(**{**current, **changes})
