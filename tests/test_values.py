"""casframe.values: value classes behave as the frozen dataclasses they replace (equality, hash,
repr, frozenness, pickling, defaults, construction, ``dataclasses``' functions), and so do
casframe's public records, limits and settings made with them."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Mapping
from typing import Any

import pytest

from casframe import (
    SHA256,
    BackendContractError,
    BlobInfo,
    BlobLimits,
    Digest,
    PluginInfo,
    RefInfo,
    StoreURL,
    StrayEntry,
    TreeLimits,
)
from casframe.config import Config, RemoteEntry, StoreEntry
from casframe.digestfunctions import BLAKE3, DigestFunction
from casframe.entrypoints import EntryPointRecord
from casframe.treesize import TreeSize
from casframe.values import replace, value_class, value_field


@value_class
class Sample:
    """A value with every kind of field."""

    name: str
    size: int = 0
    tags: Mapping[str, str] = value_field(default_factory=dict)
    note: object = value_field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size {self.size} < 0")

    def doubled(self) -> int:
        return self.size * 2


@dataclasses.dataclass(frozen=True)
class Reference:
    """The same value as a frozen dataclass: what Sample must behave as."""

    name: str
    size: int = 0
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    note: object = dataclasses.field(default=None, repr=False, compare=False)


def _pair(*args: Any, **kwargs: Any) -> tuple[Sample, Reference]:
    return Sample(*args, **kwargs), Reference(*args, **kwargs)


def _hash(value: object) -> int | str:
    """The hash, or the error hashing raises (a value holding a dict has none, as a frozen
    dataclass holding one has none)."""
    try:
        return hash(value)
    except TypeError as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(("a",), {}), (("a", 3), {}), (("a", 3, {"k": "v"}, "n"), {}), ((), {"name": "a"}),
     (("a",), {"tags": {"x": "y"}, "note": 1}), ((), {"size": 2, "name": "b"})],
)
def test_construction_defaults_and_repr_are_a_dataclass_s(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    value, reference = _pair(*args, **kwargs)
    assert (value.name, value.size, value.tags, value.note) == (
        reference.name, reference.size, reference.tags, reference.note)
    assert repr(value) == repr(reference).replace("Reference(", "Sample(", 1)
    assert value.doubled() == value.size * 2


def test_a_default_factory_makes_a_new_value_each_time() -> None:
    first, second = Sample("a"), Sample("a")
    assert first.tags == {} and first.tags is not second.tags


def test_equality_and_hash_follow_the_compared_fields() -> None:
    value = Sample("a", 1, (), note="ignored")
    assert value == Sample("a", 1, (), note="other") and hash(value) == hash(Sample("a", 1, ()))
    assert value != Sample("a", 2, ()) and value != Sample("b", 1, ())
    assert value != Reference("a", 1, ()) and value != ("a", 1, ())  # another class: never
    assert len({Sample("a", 1, ()), Sample("a", 1, ()), Sample("a", 2, ())}) == 2
    assert _hash(Sample("a")) == _hash(Reference("a")) == "unhashable type: 'dict'"


def test_a_value_is_frozen_and_slotted() -> None:
    value = Sample("a", 1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="'size'"):
        value.size = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="'name'"):
        del value.name  # type: ignore[misc]
    with pytest.raises(AttributeError):
        value.other = 1  # type: ignore[attr-defined]
    assert not hasattr(value, "__dict__") and Sample.__slots__ == ("name", "size", "tags", "note")
    assert (value.name, value.size) == ("a", 1)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_value_pickles_and_copies(protocol: int) -> None:
    value = Sample("a", 1, {"k": "v"}, note="n")
    for copied in (pickle.loads(pickle.dumps(value, protocol)), copy.copy(value),
                   copy.deepcopy(value)):
        assert copied == value and copied.note == "n" and type(copied) is Sample


def test_post_init_checks_every_way_a_value_is_made() -> None:
    with pytest.raises(ValueError, match="size -1 < 0"):
        Sample("a", -1)
    with pytest.raises(ValueError, match="size -1 < 0"):
        replace(Sample("a"), size=-1)
    with pytest.raises(ValueError, match="size -1 < 0"):
        dataclasses.replace(Sample("a"), size=-1)


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda: Sample(), r"Sample\(\) missing 1 required argument: 'name'"),
     (lambda: Sample("a", 1, {}, None, 5), r"takes 4 positional arguments but 5 were given"),
     (lambda: Sample("a", name="b"), r"multiple values for argument 'name'"),
     (lambda: Sample("a", colour="red"), r"unexpected keyword argument 'colour'")],
)
def test_a_wrong_call_is_a_type_error_naming_the_argument(call: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


def test_dataclasses_functions_work_on_value_classes() -> None:
    value = Sample("a", 1, {"k": "v"}, note="n")
    assert dataclasses.is_dataclass(Sample) and dataclasses.is_dataclass(value)
    ours = [(f.name, f.type, f.default, f.default_factory, f.repr, f.compare)
            for f in dataclasses.fields(Sample)]
    theirs = [(f.name, f.type, f.default, f.default_factory, f.repr, f.compare)
              for f in dataclasses.fields(Reference)]
    assert ours == theirs
    assert dataclasses.asdict(value) == {"name": "a", "size": 1, "tags": {"k": "v"}, "note": "n"}
    changed = dataclasses.replace(value, size=5)
    assert type(changed) is Sample and changed == Sample("a", 5, {"k": "v"})
    assert replace(value, name="b") == Sample("b", 1, {"k": "v"}) and value.name == "a"


def test_positional_patterns_match_fields_in_order() -> None:
    match Sample("a", 3):
        case Sample("a", size):
            assert size == 3
        case _:
            pytest.fail("no match")


def test_a_class_s_own_init_and_methods_are_kept() -> None:
    @value_class
    class Fast:
        a: int
        b: int = 0

        def __init__(self, a: int, b: int = 0) -> None:
            object.__setattr__(self, "a", a)
            object.__setattr__(self, "b", b * 10)

        def __repr__(self) -> str:
            return "fast"

    assert Fast(1, 2).b == 20 and repr(Fast(1)) == "fast" and Fast(1, 2) == Fast(1, 2)
    assert copy.copy(Fast(1, 2)).b == 200  # reduced to its fields, made again by its __init__


def test_a_class_declaration_error_is_reported() -> None:
    with pytest.raises(ValueError, match="not both"):
        value_field(default=1, default_factory=list)
    with pytest.raises(TypeError, match="non-default field 'b' follows"):

        @value_class
        class Wrong:
            a: int = 0
            b: int


# -- casframe's own value classes ------------------------------------------------------------

_DIGEST = Digest(SHA256.empty_hash, 0)

VALUES = [
    BlobLimits(), BlobLimits(max_concurrency=16, prehash_min_size=0), BlobInfo(_DIGEST, 1.5),
    RefInfo("a/b", _DIGEST, 2.5), StrayEntry("objects/zz", "a directory, not an object"),
    SHA256, BLAKE3, StoreURL.parse("file:///srv/cas?fsync=1"),
    StoreEntry("ci", "s3://b/p", {"region": "x"}), RemoteEntry("team", "grpc://h:1", push=True),
    Config("/c.toml", True, {"ci": StoreEntry("ci", "file:///x")}, "ci"), TreeLimits(1, 2),
    TreeSize(3, 2, 10), PluginInfo("local", "casframe", "1.0", ("file",)),
    EntryPointRecord("local", "casframe_local", "casframe", "1.0"),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_casframe_values_are_frozen_hashable_and_picklable(value: Any) -> None:
    names = [f.name for f in dataclasses.fields(value)]
    copied = pickle.loads(pickle.dumps(value))
    assert copied == value and _hash(copied) == _hash(value) and copied is not value
    assert dataclasses.replace(value) == value == copy.deepcopy(value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, names[0], getattr(value, names[0]))
    shown = [f"{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value) if f.repr]
    assert repr(value) == f"{type(value).__name__}({', '.join(shown)})"


def test_casframe_values_keep_their_documented_forms() -> None:
    assert repr(BlobLimits()) == (
        "BlobLimits(max_batch_digests=10000, max_batch_bytes=4194304, max_concurrency=4, "
        "prehash_min_size=None)"
    )
    assert repr(SHA256) == (
        "DigestFunction(name='sha256', reapi_value=1, hex_length=64, empty_hash="
        "'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855')"
    )
    # A digest function's constructors take no part in equality.
    assert SHA256 == DigestFunction("sha256", 1, 64, SHA256.empty_hash, new=print)
    assert TreeSize() == TreeSize(0, 0, 0) and repr(TreeSize(1)) == (
        "TreeSize(entries=1, files=0, bytes=0)")
    assert RefInfo(name="r", digest=_DIGEST, accessed=1.0) == RefInfo("r", _DIGEST, 1.0)
    assert StoreURL.parse("file:///x").options == {} and Config("/c").stores == {}
    with pytest.raises(BackendContractError, match="max_concurrency must be a positive int"):
        dataclasses.replace(BlobLimits(), max_concurrency=0)
    with pytest.raises(ValueError, match="max_entries must be a whole number"):
        TreeLimits(max_entries=-1)
