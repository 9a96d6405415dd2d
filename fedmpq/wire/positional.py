"""Tensors on the wire in layout order: no names, shapes or map keys (since protocol version 2).

A message's ``tensors`` field is an array in layout order (``fedmpq.wire.layout``), each
tensor ``[bits, data]`` for floats or ``[bits, scheme, axis, scale, zero_point, data]``
when quantized (scheme 0 = symmetric, 1 = affine; ``scale`` as ``fedmpq.wire.tensors.
scale_bytes`` writes it).  Next to it, the body's ``layout`` field holds the layout's
digest (since version 4 in a ``GlobalModelMessage`` too: both ends build the layout
from the model).  A ``GlobalModelMessage`` written to a file holds the layout itself
(``inline_layout``), so that a process that knows neither the model nor its data can
read it.
"""

from __future__ import annotations

from typing import Any

from fedmpq.errors import DecodeError, LayoutMismatchError
from fedmpq.quant_spec import SCHEME_AFFINE, SCHEME_FLOAT, SCHEME_SYMMETRIC
from fedmpq.wire.checks import DecodeLimits, check_tensor, element_count
from fedmpq.wire.layout import DIGEST_BYTES, ModelLayout, known_layout, remember_layout
from fedmpq.wire.messages import GlobalModelMessage, TensorPayload, UpdateMessage
from fedmpq.wire.schema import convert, convert_dataclass, describe, record_fields, scalar, to_wire

#: Messages whose ``tensors`` travel positionally, and whether the body may carry the
#: whole layout instead of its digest (a global model in a file).
POSITIONAL: dict[type, bool] = {GlobalModelMessage: True, UpdateMessage: False}
_SCHEME_CODES = {SCHEME_SYMMETRIC: 0, SCHEME_AFFINE: 1}
_SCHEME_NAMES = {code: name for name, code in _SCHEME_CODES.items()}


def _positional(t: TensorPayload) -> list[Any]:
    if t.scheme == SCHEME_FLOAT:
        return [int(t.bits), t.data]
    return [
        int(t.bits),
        _SCHEME_CODES.get(t.scheme, t.scheme),
        int(t.axis),
        t.scale,
        t.zero_point,
        t.data,
    ]


def message_to_wire(msg: Any, inline_layout: bool = False) -> dict[str, Any]:
    """The body map of ``msg``; tensors positional in layout order, after ``layout``.

    ``inline_layout`` writes the layout itself instead of its digest (files only; a
    ``GlobalModelMessage`` only).
    """
    cls: type = type(msg)
    if inline_layout and not POSITIONAL.get(cls, False):
        raise TypeError(f"cannot encode {cls.__name__} with its layout inline")
    if cls not in POSITIONAL:
        wire: dict[str, Any] = to_wire(msg, cls)
        return wire
    by_name = {t.name: t for t in msg.tensors}
    if len(by_name) != len(msg.tensors):
        raise ValueError(f"cannot encode {cls.__name__}: tensor names repeat")
    layout = ModelLayout.of_entries((t.name, t.shape) for t in msg.tensors)
    remember_layout(layout)
    wire = {}
    for f in record_fields(cls):
        if f.name == "tensors":
            wire["layout"] = layout.to_wire() if inline_layout else layout.digest
            wire["tensors"] = [_positional(by_name[name]) for name in layout.names]
        else:
            wire[f.name] = to_wire(getattr(msg, f.name), f.type)
    return wire


def _read_digest(value: bytes, path: str, expected: ModelLayout | None) -> ModelLayout:
    """The layout named by ``value``: ``expected`` (which it must name), else one known here."""
    if len(value) != DIGEST_BYTES:
        raise DecodeError(f"{path}: {len(value)} bytes, expected a {DIGEST_BYTES}-byte digest")
    if expected is not None:
        _check_expected(value, path, expected)
        return expected
    layout = known_layout(value)
    if layout is None:
        raise DecodeError(
            f"{path}: unknown model layout {value.hex()}; this process has not built or "
            "encoded a model of that layout (is the frame from another run or model?)"
        )
    return layout


def _check_expected(digest: bytes, path: str, expected: ModelLayout) -> None:
    if digest != expected.digest:
        raise LayoutMismatchError(
            f"{path}: the frame's model layout is {digest.hex()}, this model's is "
            f"{expected.hex}: the sender runs another model, number of classes or input shape"
        )


def _read_inline(value: Any, path: str, limits: DecodeLimits) -> ModelLayout:
    """A layout written out whole, ``[[name, [dims...]], ...]``, fully checked."""
    if type(value) is not list:
        raise DecodeError(f"{path}: expected an array or a digest, got {describe(value)}")
    names, shapes = [], []
    for i, entry in enumerate(value):
        if type(entry) is not list or len(entry) != 2:
            raise DecodeError(f"{path}[{i}]: expected [name, shape], got {describe(entry)}")
        names.append(scalar(entry[0], str, f"{path}[{i}] name", limits))
        shape = convert(entry[1], list[int], f"{path}[{i}] shape", limits)
        element_count(shape, f"{path}[{i}]", limits)
        shapes.append(tuple(shape))
    if names != sorted(set(names)):
        raise DecodeError(f"{path}: tensor names must be distinct and in sorted order")
    return ModelLayout(tuple(names), tuple(shapes))


def _read_layout(
    value: Any, inline_allowed: bool, path: str, limits: DecodeLimits, expected: ModelLayout | None
) -> ModelLayout:
    """The layout a body declares: by digest, or (a global model in a file) whole.

    A layout read whole is not remembered: a frame must not teach this process layouts
    (a device could otherwise push the run's own layout out of the bounded book).
    """
    if type(value) is bytes or not inline_allowed:
        return _read_digest(scalar(value, bytes, path, limits), path, expected)
    layout = _read_inline(value, path, limits)
    if expected is not None:
        _check_expected(layout.digest, path, expected)
    return layout


#: The two positional forms of a tensor, by length: float and quantized.
_TENSOR_FORMS: dict[int, tuple[tuple[str, type], ...]] = {
    2: (("bits", int), ("data", bytes)),
    6: (
        ("bits", int),
        ("scheme", int),
        ("axis", int),
        ("scale", bytes),
        ("zero_point", bytes),
        ("data", bytes),
    ),
}


def _read_tensor(
    value: Any, name: str, shape: list[int], path: str, limits: DecodeLimits
) -> TensorPayload:
    """One positional tensor, named and shaped by its layout entry, fully checked."""
    if type(value) is not list:
        raise DecodeError(f"{path}: expected an array, got {describe(value)}")
    form = _TENSOR_FORMS.get(len(value))
    if form is None:
        raise DecodeError(
            f"{path}: expected [bits, data] or [bits, scheme, axis, scale, zero_point, data], "
            f"got {len(value)} items"
        )
    items = [
        scalar(v, tp, f"{path}.{key}", limits) for v, (key, tp) in zip(value, form, strict=True)
    ]
    if len(items) == 2:
        bits, data = items
        t = TensorPayload(name, shape, bits, SCHEME_FLOAT, -1, b"", b"", data)
    else:
        bits, code, axis, scale, zero_point, data = items
        if code not in _SCHEME_NAMES:
            raise DecodeError(f"{path}.scheme: code {code} is not one of {sorted(_SCHEME_NAMES)}")
        t = TensorPayload(name, shape, bits, _SCHEME_NAMES[code], axis, scale, zero_point, data)
    check_tensor(t, path, limits)
    return t


def convert_message(
    raw: Any, cls: type, path: str, limits: DecodeLimits, layout: ModelLayout | None = None
) -> Any:
    """Check a body against message ``cls``, resolving positional tensors by layout.

    ``layout`` is the one the caller expects (its own model's): the body must name it.
    Without it, the body's digest must name a layout this process knows.
    """
    if cls not in POSITIONAL:
        return convert(raw, cls, path, limits)
    if type(raw) is not dict:
        raise DecodeError(f"{path}: expected a map, got {describe(raw)}")
    missing = [k for k in ("layout", "tensors") if k not in raw]
    if missing:
        raise DecodeError(f"{path}: missing field(s) {', '.join(map(repr, missing))}")
    rest = dict(raw)
    layout = _read_layout(rest.pop("layout"), POSITIONAL[cls], f"{path}.layout", limits, layout)
    items = rest.pop("tensors")
    tpath = f"{path}.tensors"
    if type(items) is not list:
        raise DecodeError(f"{tpath}: expected an array, got {describe(items)}")
    if len(items) != len(layout.names):
        raise DecodeError(
            f"{tpath}: {len(items)} tensors, the layout {layout.hex} has {len(layout.names)}"
        )
    tensors = [
        _read_tensor(v, name, list(shape), f"{tpath}[{i}]", limits)
        for i, (v, name, shape) in enumerate(zip(items, layout.names, layout.shapes, strict=True))
    ]
    return convert_dataclass(rest, cls, path, limits, given={"tensors": tensors})
