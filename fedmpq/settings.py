"""Settings declared once: a dataclass field carries its type, default, range and help.

A configuration class declares each setting with :func:`setting`; from that one
declaration come the type and range checks (:func:`check`), construction from a TOML
table (:func:`build`), command-line overrides (:func:`add_flags`, :func:`flag_values`)
and the README's reference table (:func:`markdown_table`).  Standard-library
dataclasses carry all of it, so no configuration library is needed; see the README.

Example
-------
>>> @dataclass
... class Train:
...     epochs: int = setting(1, "local epochs per round", minimum=1)
>>> build(Train, {"epochs": 0}, "run config")
Traceback (most recent call last):
fedmpq.errors.ConfigError: run config: epochs: expected an integer >= 1, got 0
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmpq.errors import ConfigError

_KEY = "fedmpq.setting"

_METAVARS = {int: "N", float: "NUMBER", str: "TEXT"}

#: Marks a setting that has no generated command-line flag.
NO_FLAG = "-"


@dataclass(frozen=True)
class Spec:
    """What one setting accepts, beyond its type.

    Attributes
    ----------
    help
        One line for ``--help`` and the README.
    minimum, maximum
        Inclusive bounds of a number.
    above
        Exclusive lower bound of a number (``above=0`` means "> 0").
    choices
        The values a string may take.
    flag
        The command-line flag; ``""`` derives ``--name-with-dashes``, :data:`NO_FLAG` has none.
    shown_default
        How to show a default that is computed at run time (e.g. ``runs/<run_id>``).
    """

    help: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    flag: str = ""
    shown_default: str = ""

    def allowed(self) -> str:
        """The range as text: ``>= 1``, ``0..1``, ``> 0``, ``a, b``; empty if unrestricted."""
        if self.choices:
            return ", ".join(self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"{_number(self.minimum)}..{_number(self.maximum)}"
        if self.minimum is not None:
            return f">= {_number(self.minimum)}"
        if self.above is not None:
            return f"> {_number(self.above)}"
        return ""


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] = (),
    flag: str = "",
    shown_default: str = "",
) -> Any:
    """A dataclass field declaring one setting (mutable defaults are copied per instance)."""
    spec = Spec(help, minimum, maximum, above, choices, flag, shown_default)
    metadata = {_KEY: spec}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spec_of(field: dataclasses.Field[Any]) -> Spec:
    """The :class:`Spec` a field was declared with."""
    spec = field.metadata.get(_KEY)
    if not isinstance(spec, Spec):
        raise TypeError(f"{field.name} is not declared with fedmpq.settings.setting()")
    return spec


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_settings_class(tp: Any) -> typing.TypeGuard[type]:
    """Whether a setting's type is itself a group of settings (a nested TOML table)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_type(value: Any, tp: Any) -> tuple[Any, str]:
    """``(value as a tp, "")``, or ``(value, what a tp is)`` if it is not one."""
    if tp is bool:
        return value, "" if isinstance(value, bool) else "a bool"
    if tp is int:
        return value, "" if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        if _is_number(value) and math.isfinite(value):
            return float(value), ""
        return value, "a number"
    if tp is str:
        return value, "" if isinstance(value, str) else "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if isinstance(value, list) and all(_is_number(v) for v in value):
            return [float(v) for v in value], ""
        return value, "a list of numbers"
    if origin is dict and args[1] is float:
        if isinstance(value, dict) and all(_is_number(v) for v in value.values()):
            return {str(k): float(v) for k, v in value.items()}, ""
        return value, "a table of numbers"
    if origin is dict:
        return value, "" if isinstance(value, dict) else "a table"
    raise TypeError(f"settings of type {tp} are not supported")


def _in_range(value: Any, spec: Spec) -> bool:
    if spec.choices:
        return value in spec.choices
    if not _is_number(value):
        return True
    return not (
        (spec.minimum is not None and value < spec.minimum)
        or (spec.maximum is not None and value > spec.maximum)
        or (spec.above is not None and value <= spec.above)
    )


def check(instance: Any, where: str, prefix: str = "") -> None:
    """Check (and normalise, e.g. int to float) every declared setting of ``instance``.

    Raises
    ------
    ConfigError
        ``"{where}: {key}: expected {what}, got {value!r}"`` for the first bad setting.
    """
    for field, tp in _fields(type(instance)):
        key = prefix + field.name
        value = getattr(instance, field.name)
        if _is_settings_class(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{where}: {key}: expected a [{key}] table, got {value!r}")
            check(value, where, f"{key}.")
            continue
        spec = spec_of(field)
        value, expected = _checked_type(value, tp)
        if not expected and not _in_range(value, spec):
            expected = _expected_range(tp, spec)
        if expected:
            raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")
        setattr(instance, field.name, value)


def _expected_range(tp: Any, spec: Spec) -> str:
    if spec.choices:
        return "one of " + ", ".join(spec.choices)
    kind = "an integer" if tp is int else "a number"
    allowed = spec.allowed()
    return f"{kind} within {allowed}" if ".." in allowed else f"{kind} {allowed}"


def build(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """An instance of ``cls`` from a (TOML) table; nested tables become nested settings.

    Raises
    ------
    ConfigError
        For an unknown key, or (from the class's own checks) a wrong type or range.
    """
    kinds = {field.name: tp for field, tp in _fields(cls)}
    known = set(kinds)
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(prefix + name for name in unknown)
        raise ConfigError(f"{where}: unknown setting {names}; known: {', '.join(sorted(known))}")
    kwargs = dict(values)
    for name, tp in kinds.items():
        if _is_settings_class(tp) and isinstance(kwargs.get(name), dict):
            kwargs[name] = build(tp, kwargs[name], where, f"{prefix}{name}.")
    return cls(**kwargs)


def _scalar_flags(cls: type) -> list[tuple[dataclasses.Field[Any], Any, Spec]]:
    return [
        (field, tp, spec_of(field))
        for field, tp in _fields(cls)
        if tp in (bool, int, float, str) and spec_of(field).flag != NO_FLAG
    ]


def _flag(field: dataclasses.Field[Any], spec: Spec) -> str:
    return spec.flag or "--" + field.name.replace("_", "-")


def shown_default(field: dataclasses.Field[Any]) -> str:
    """The default as the README and ``--help`` show it (TOML syntax)."""
    spec = spec_of(field)
    if spec.shown_default:
        return spec.shown_default
    default = field.default_factory() if callable(field.default_factory) else field.default
    return _toml(default)


def shown_default_of(cls: type, name: str) -> str:
    """The shown default of setting ``name`` of ``cls``."""
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return shown_default(field)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return _number(value) if _is_number(value) else str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One optional flag per scalar setting of ``cls``; an absent flag leaves the setting be."""
    for field, tp, spec in _scalar_flags(cls):
        flag = _flag(field, spec)
        allowed = f"{spec.allowed()}; " if spec.allowed() and not spec.choices else ""
        text = f"{spec.help} ({allowed}default {shown_default(field)})".replace("%", "%%")
        if tp is bool:
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            metavar = None if spec.choices else _METAVARS[tp]
            parser.add_argument(
                flag,
                dest=field.name,
                type=tp,
                choices=spec.choices or None,
                metavar=metavar,
                help=text,
            )


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings given on the command line (flags added by :func:`add_flags`)."""
    values = {field.name: getattr(args, field.name) for field, _, _ in _scalar_flags(cls)}
    return {key: value for key, value in values.items() if value is not None}


def as_flags(cls: type, values: Mapping[str, Any]) -> list[str]:
    """The command line that :func:`add_flags`' parser reads back as ``values``."""
    flags = {field.name: (field, tp, spec) for field, tp, spec in _scalar_flags(cls)}
    unknown = sorted(set(values) - set(flags))
    if unknown:
        raise TypeError(f"{cls.__name__} has no command-line flag for {unknown}")
    argv = []
    for name, value in values.items():
        field, tp, spec = flags[name]
        flag = _flag(field, spec)
        if tp is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def _type_name(tp: Any) -> str:
    names = {bool: "bool", int: "integer", float: "number", str: "string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    return "list of numbers" if origin is list else "table"


def markdown_table(cls: type, prefix: str = "") -> list[str]:
    """Rows of the README's reference table (without its header) for ``cls``."""
    rows = []
    for field, tp in _fields(cls):
        if _is_settings_class(tp):
            rows += markdown_table(tp, f"{prefix}{field.name}.")
            continue
        spec = spec_of(field)
        allowed = ", ".join(f"`{c}`" for c in spec.choices) or spec.allowed()
        cells = [
            f"`{prefix}{field.name}`",
            _type_name(tp),
            f"`{shown_default(field)}`",
            allowed.replace("|", "\\|"),
            spec.help.replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows
