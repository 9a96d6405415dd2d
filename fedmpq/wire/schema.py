"""The schema check: msgpack data against the message dataclasses' annotations.

One recursive converter builds dataclasses from maps (``convert``) and plain data from
dataclasses (``to_wire``), checking every scalar's type, string length and map size, and
running the semantic rules of ``fedmpq.wire.checks`` on the way.
"""

from __future__ import annotations

import math
import numbers
import types
from dataclasses import MISSING, dataclass, fields, is_dataclass
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

from fedmpq.errors import DecodeError
from fedmpq.wire.checks import RULES, DecodeLimits, check_tensor
from fedmpq.wire.messages import TensorPayload

_UNION_ORIGINS = (Union, types.UnionType)


@dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    required: bool


@cache
def record_fields(cls: type) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    return tuple(
        _Field(f.name, hints[f.name], f.default is MISSING and f.default_factory is MISSING)
        for f in fields(cls)
    )


@cache
def field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in record_fields(cls))


def _optional_inner(tp: Any) -> Any:
    (inner,) = (a for a in get_args(tp) if a is not type(None))
    return inner


TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bytes: "bin", bool: "a bool"}


@cache
def kind_of(tp: Any) -> tuple[str, Any]:
    """How annotation ``tp`` travels, and the annotation inside it (cached: the hot path)."""
    origin = get_origin(tp)
    if origin in _UNION_ORIGINS:
        return "optional", _optional_inner(tp)
    if origin is list:
        return "list", get_args(tp)[0]
    if origin is dict:
        return "dict", get_args(tp)[1]
    if is_dataclass(tp):
        return "record", tp
    if tp in TYPE_WORDS:
        return "scalar", tp
    raise TypeError(f"the wire codec does not support fields of type {tp!r}")


def to_wire(value: Any, tp: Any) -> Any:
    """Plain msgpack-able data for ``value``, canonicalised by its annotation ``tp``."""
    kind, inner = kind_of(tp)
    if kind == "record":
        return {f.name: to_wire(getattr(value, f.name), f.type) for f in record_fields(inner)}
    if kind == "optional":
        return None if value is None else to_wire(value, inner)
    if kind == "list":
        return [to_wire(v, inner) for v in value]
    if kind == "dict":
        return {k: to_wire(value[k], inner) for k in sorted(value)}
    # numpy scalars (shapes, metrics) become plain ints/floats; anything else is left
    # for the decoder on the other side to reject.
    if tp is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def describe(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def scalar(value: Any, tp: Any, path: str, limits: DecodeLimits) -> Any:
    # ``type(v) is`` rather than isinstance: bool is an int subclass and must not pass for one.
    kind = type(value)
    if tp is float and kind in (float, int):
        if not math.isfinite(value):
            raise DecodeError(f"{path}: {value} is not a finite number")
        return float(value)
    if kind is not tp:
        raise DecodeError(f"{path}: expected {TYPE_WORDS[tp]}, got {describe(value)}")
    if tp is str and len(value) > limits.max_string_len:
        raise DecodeError(
            f"{path}: string of {len(value)} characters, over the limit of "
            f"{limits.max_string_len} (DecodeLimits.max_string_len)"
        )
    return value


def convert(value: Any, tp: Any, path: str, limits: DecodeLimits) -> Any:
    """Check ``value`` (fresh from msgpack) against annotation ``tp``; build dataclasses."""
    kind, inner = kind_of(tp)
    if kind == "scalar":
        return scalar(value, inner, path, limits)
    if kind == "optional":
        return None if value is None else convert(value, inner, path, limits)
    if kind == "list":
        if type(value) is not list:
            raise DecodeError(f"{path}: expected an array, got {describe(value)}")
        return [convert(v, inner, f"{path}[{i}]", limits) for i, v in enumerate(value)]
    if type(value) is not dict:
        raise DecodeError(f"{path}: expected a map, got {describe(value)}")
    if kind == "record":
        return convert_dataclass(value, inner, path, limits)
    if len(value) > limits.max_map_entries:
        raise DecodeError(
            f"{path}: {len(value)} entries, over the limit of {limits.max_map_entries} "
            "(DecodeLimits.max_map_entries)"
        )
    return {
        convert(k, str, f"{path} key", limits): convert(v, inner, f"{path}[{k!r}]", limits)
        for k, v in value.items()
    }


def convert_dataclass(
    value: dict[Any, Any],
    cls: type,
    path: str,
    limits: DecodeLimits,
    given: dict[str, Any] | None = None,
) -> Any:
    """Build ``cls`` from a checked map; ``given`` holds fields already decoded."""
    given = given or {}
    schema = record_fields(cls)
    extra = [k for k in value if k not in field_names(cls) or k in given]
    if extra:
        raise DecodeError(f"{path}: unknown field(s) {', '.join(map(repr, extra))}")
    missing = [f.name for f in schema if f.required and f.name not in value.keys() | given.keys()]
    if missing:
        raise DecodeError(f"{path}: missing field(s) {', '.join(map(repr, missing))}")
    kwargs: dict[str, Any] = {}
    for f in schema:
        if f.name in value or f.name in given:
            fpath = f"{path}.{f.name}"
            if f.name in given:
                kwargs[f.name] = v = given[f.name]
            else:
                kwargs[f.name] = v = convert(value[f.name], f.type, fpath, limits)
            rule = RULES.get((cls, f.name))
            if rule is not None and v is not None:
                rule(v, fpath, limits)
    obj = cls(**kwargs)
    if cls is TensorPayload:
        check_tensor(obj, path, limits)
    return obj
