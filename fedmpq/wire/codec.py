"""The strict msgpack codec for the messages in ``fedmpq.wire.messages``.

A frame is a msgpack map ``{"v", "type", "codec", "body", "sig"}``; ``body`` is
the msgpack map of the message's fields (nested dataclasses as maps, ``bytes`` as
bin), zstd-compressed when ``codec == "zstd"``.  ``sig`` is opaque here: it lets a
caller sign ``body_bytes(msg)`` and verify it against ``Envelope.body``.

Tensors travel positionally (protocol version 2): a message's ``tensors`` field is
an array in layout order (``fedmpq.wire.layout``), each tensor ``[bits, data]`` for
floats or ``[bits, scheme, axis, scale, zero_point, data]`` when quantized (scheme
0 = symmetric, 1 = affine), with no names, shapes or map keys.  Next to it, the
body's ``layout`` field holds the layout itself in a ``GlobalModelMessage`` and
only its digest elsewhere; decoding such a message needs a layout this process has
seen (in a global model, or by encoding a message of that layout).

Encoding is canonical: fields in declaration order, map keys sorted, ints as
ints and floats as float64 (float32 would round learning rates, timestamps and
metrics, and float64 costs 4 bytes a field on messages dominated by tensor data).

Decoding trusts nothing.  Whatever the input, the only exception that leaves
``decode``/``decode_envelope``/``decode_body`` is ``DecodeError``, whose message
names the offending field by path (``update.tensors[3].data``).  The schema check
is one recursive converter driven by the dataclass annotations; semantic checks
are a table of per-field rules plus one function for ``TensorPayload``.
"""

from __future__ import annotations

import hmac
import math
import numbers
import struct
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, is_dataclass
from functools import cache
from typing import Any, TypeAlias, TypeVar, Union, get_args, get_origin, get_type_hints, overload

import msgpack
import numpy as np
import zstandard

from fedmpq import PROTOCOL_VERSION
from fedmpq.errors import DecodeError
from fedmpq.packing import packed_nbytes
from fedmpq.quant_spec import (
    OBSERVERS,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_FLOAT,
    SCHEME_SYMMETRIC,
    VALID_BITS,
)
from fedmpq.wire.layout import DIGEST_BYTES, ModelLayout, known_layout, remember_layout
from fedmpq.wire.messages import (
    MESSAGE_TYPES,
    UPDATE_KINDS,
    ControlMessage,
    DeviceProfile,
    GlobalModelMessage,
    ModelMessage,
    RegisterMessage,
    ResourceUsage,
    StatusMessage,
    TaskMessage,
    TensorPayload,
    UpdateMessage,
)
from fedmpq.wire.signing import frame_mac

Message: TypeAlias = (
    RegisterMessage
    | TaskMessage
    | GlobalModelMessage
    | UpdateMessage
    | StatusMessage
    | ControlMessage
    | ModelMessage
)
M = TypeVar("M", bound=Message)

CODEC_NONE = "none"
CODEC_ZSTD = "zstd"
CODECS = frozenset({CODEC_NONE, CODEC_ZSTD})
STATUS_STATES = frozenset({"online", "offline", "training", "rejected", "error"})
CONTROL_STATES = frozenset({"open", "finished"})

_ZSTD_LEVEL = 3
_UTF8_MAX_BYTES_PER_CHAR = 4
_FLOAT_DTYPES: dict[int, np.dtype[Any]] = {16: np.dtype("<f2"), 32: np.dtype("<f4")}
_UNION_ORIGINS = (Union, types.UnionType)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds the decoder enforces so hostile input cannot exhaust memory or CPU.

    Attributes
    ----------
    max_message_bytes
        Raw frame size, checked before anything is parsed.
    max_elements
        Elements of one tensor, as declared by its shape.
    max_total_elements
        Elements over all tensors of a message.
    max_tensors
        Tensors in a message; also bounds every msgpack array.
    max_string_len
        Characters in a name, id or detail string.
    max_map_entries
        Entries in a ``bits``/``options``/``metrics`` map; records (dataclass maps)
        are bounded by their schema instead.
    max_decompressed_bytes
        Size a zstd body may declare and decompress to.
    """

    max_message_bytes: int = 64 * 2**20
    max_elements: int = 64 * 2**20
    max_total_elements: int = 256 * 2**20
    max_tensors: int = 4096
    max_string_len: int = 256
    max_map_entries: int = 4096
    max_decompressed_bytes: int = 256 * 2**20


DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True)
class Envelope:
    """A checked frame whose body is not decoded yet (e.g. to verify ``sig`` over ``body``)."""

    version: int
    type: str
    codec: str
    body: bytes
    sig: bytes


@dataclass
class _Frame:
    """The frame map exactly as it is on the wire (short key ``v``)."""

    v: int
    type: str
    codec: str
    body: bytes
    sig: bytes


@dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    required: bool


@cache
def _schema(cls: type) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    return tuple(
        _Field(f.name, hints[f.name], f.default is MISSING and f.default_factory is MISSING)
        for f in fields(cls)
    )


@cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in _schema(cls))


def _optional_inner(tp: Any) -> Any:
    (inner,) = (a for a in get_args(tp) if a is not type(None))
    return inner


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bytes: "bin", bool: "a bool"}


@cache
def _kind(tp: Any) -> tuple[str, Any]:
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
    if tp in _TYPE_WORDS:
        return "scalar", tp
    raise TypeError(f"the wire codec does not support fields of type {tp!r}")


#: Fields of the widest dataclass, so that msgpack's map limit never cuts a record short.
_WIDEST_RECORD = max(
    len(fields(cls))
    for cls in (_Frame, TensorPayload, DeviceProfile, ResourceUsage, *MESSAGE_TYPES.values())
)


# --------------------------------------------------------------------------- encoding


def _to_wire(value: Any, tp: Any) -> Any:
    """Plain msgpack-able data for ``value``, canonicalised by its annotation ``tp``."""
    kind, inner = _kind(tp)
    if kind == "record":
        return {f.name: _to_wire(getattr(value, f.name), f.type) for f in _schema(inner)}
    if kind == "optional":
        return None if value is None else _to_wire(value, inner)
    if kind == "list":
        return [_to_wire(v, inner) for v in value]
    if kind == "dict":
        return {k: _to_wire(value[k], inner) for k in sorted(value)}
    # numpy scalars (shapes, metrics) become plain ints/floats; anything else is left
    # for the decoder on the other side to reject.
    if tp is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


#: Messages whose ``tensors`` travel positionally, and whether the body carries the
#: whole layout (True) or only its digest.
_FULL_LAYOUT: dict[type, bool] = {GlobalModelMessage: True, UpdateMessage: False}
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


def _message_to_wire(msg: Any) -> dict[str, Any]:
    """The body map of ``msg``; tensors positional in layout order, after ``layout``."""
    cls: type = type(msg)
    if cls not in _FULL_LAYOUT:
        wire: dict[str, Any] = _to_wire(msg, cls)
        return wire
    by_name = {t.name: t for t in msg.tensors}
    if len(by_name) != len(msg.tensors):
        raise ValueError(f"cannot encode {cls.__name__}: tensor names repeat")
    layout = ModelLayout.of_entries((t.name, t.shape) for t in msg.tensors)
    remember_layout(layout)
    wire = {}
    for f in _schema(cls):
        if f.name == "tensors":
            wire["layout"] = layout.to_wire() if _FULL_LAYOUT[cls] else layout.digest
            wire["tensors"] = [_positional(by_name[name]) for name in layout.names]
        else:
            wire[f.name] = _to_wire(getattr(msg, f.name), f.type)
    return wire


def _message_type(msg: object) -> str:
    name = getattr(msg, "MESSAGE_TYPE", None)
    if not isinstance(name, str) or MESSAGE_TYPES.get(name) is not type(msg):
        raise TypeError(f"cannot encode {type(msg).__name__}: not a fedmpq.wire.messages message")
    return name


def body_bytes(msg: Message) -> bytes:
    """The canonical, uncompressed body of ``msg``: what a signature covers.

    Parameters
    ----------
    msg
        Any message of ``fedmpq.wire.messages.MESSAGE_TYPES``.

    Returns
    -------
    bytes
        Msgpack of the message's fields; equal messages give equal bytes.
    """
    _message_type(msg)
    return msgpack.packb(_message_to_wire(msg), use_bin_type=True)


def encode(
    msg: Message, *, compress: bool = False, sig: bytes = b"", key: bytes | None = None
) -> bytes:
    """Encode ``msg`` as one frame.

    Parameters
    ----------
    msg
        Any message of ``fedmpq.wire.messages.MESSAGE_TYPES``.  It is not validated
        here; the receiving ``decode`` does that.
    compress
        zstd-compress the body (with its content size, which the decoder requires).
    sig
        Opaque signature bytes carried alongside the body.
    key
        Sign the frame with this device key (``fedmpq.wire.signing``); overrides ``sig``.

    Returns
    -------
    bytes
        The frame; deterministic for a given message, ``compress`` and ``sig``.
    """
    body = body_bytes(msg)
    if compress:
        body = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
    codec = CODEC_ZSTD if compress else CODEC_NONE
    if key is not None:
        sig = frame_mac(key, PROTOCOL_VERSION, _message_type(msg), codec, body)
    return _frame_bytes(
        {"v": PROTOCOL_VERSION, "type": _message_type(msg), "codec": codec}, body, bytes(sig)
    )


def _bin_header(size: int) -> bytes:
    """msgpack's bin8/bin16/bin32 header for ``size`` bytes."""
    if size < 2**8:
        return struct.pack(">BB", 0xC4, size)
    if size < 2**16:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


def _frame_bytes(head: dict[str, Any], body: bytes, sig: bytes) -> bytes:
    """``msgpack.packb({**head, "body": body, "sig": sig})``, copying ``body`` only once."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(head) + 2)]
    parts += [packer.pack(x) for kv in head.items() for x in kv]
    parts += [packer.pack("body"), _bin_header(len(body)), body]
    parts += [packer.pack("sig"), packer.pack(sig)]
    return b"".join(parts)


# --------------------------------------------------------------------------- parsing


#: What each msgpack limit stands for, to name the problem when one trips.
_MSGPACK_LIMITS = {
    "max_array_len": "an array is longer than DecodeLimits.max_tensors",
    "max_map_len": "a map has more entries than DecodeLimits.max_map_entries",
    "max_str_len": "a string is longer than 4 * DecodeLimits.max_string_len bytes",
    "max_bin_len": "a bin is longer than the frame or body limit",
    "max_ext_len": "msgpack extension types are not part of the protocol",
}


def _unpack(data: bytes, where: str, max_bin_len: int, limits: DecodeLimits) -> Any:
    """Msgpack-parse untrusted bytes under explicit size limits."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            # Bytes, not characters: the converter checks the exact character count.
            max_str_len=_UTF8_MAX_BYTES_PER_CHAR * limits.max_string_len,
            # The tensors list is the longest legitimate array.
            max_array_len=limits.max_tensors,
            max_map_len=max(limits.max_map_entries, _WIDEST_RECORD),
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise DecodeError(f"{where}: trailing bytes after the msgpack object") from None
    except UnicodeDecodeError as e:
        raise DecodeError(f"{where}: a string is not valid UTF-8 ({e.reason})") from None
    except (msgpack.StackError, RecursionError):
        raise DecodeError(f"{where}: arrays or maps nested too deeply") from None
    except msgpack.FormatError:
        raise DecodeError(f"{where}: not valid msgpack (reserved type byte 0xc1)") from None
    # Otherwise msgpack reports hostile input as ValueError, TypeError or MemoryError
    # depending on the build; all of them mean "bad bytes".
    except Exception as e:
        reason = next((r for k, r in _MSGPACK_LIMITS.items() if k in str(e)), "not valid msgpack")
        raise DecodeError(f"{where}: {reason} ({type(e).__name__}: {e})") from e


def _decompress(body: bytes, where: str, limits: DecodeLimits) -> bytes:
    """zstd-decompress one frame whose header must declare a size within the limit.

    Requiring the content size keeps the allocation bounded by that declaration;
    ``encode`` always writes it.
    """
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise DecodeError(f"{where}: not a zstd frame ({e})") from None
    if size < 0:
        raise DecodeError(f"{where}: zstd frame does not declare its content size")
    if size > limits.max_decompressed_bytes:
        raise DecodeError(
            f"{where}: zstd frame declares {size} bytes, over the limit of "
            f"{limits.max_decompressed_bytes} (DecodeLimits.max_decompressed_bytes)"
        )
    try:
        return zstandard.ZstdDecompressor().decompress(body, allow_extra_data=False)
    except Exception as e:  # ZstdError, or MemoryError for a size the host cannot give
        raise DecodeError(f"{where}: zstd decompression failed ({e})") from e


# --------------------------------------------------------------------------- schema


def _describe(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _scalar(value: Any, tp: Any, path: str, limits: DecodeLimits) -> Any:
    # ``type(v) is`` rather than isinstance: bool is an int subclass and must not pass for one.
    kind = type(value)
    if tp is float and kind in (float, int):
        if not math.isfinite(value):
            raise DecodeError(f"{path}: {value} is not a finite number")
        return float(value)
    if kind is not tp:
        raise DecodeError(f"{path}: expected {_TYPE_WORDS[tp]}, got {_describe(value)}")
    if tp is str and len(value) > limits.max_string_len:
        raise DecodeError(
            f"{path}: string of {len(value)} characters, over the limit of "
            f"{limits.max_string_len} (DecodeLimits.max_string_len)"
        )
    return value


def _convert(value: Any, tp: Any, path: str, limits: DecodeLimits) -> Any:
    """Check ``value`` (fresh from msgpack) against annotation ``tp``; build dataclasses."""
    kind, inner = _kind(tp)
    if kind == "scalar":
        return _scalar(value, inner, path, limits)
    if kind == "optional":
        return None if value is None else _convert(value, inner, path, limits)
    if kind == "list":
        if type(value) is not list:
            raise DecodeError(f"{path}: expected an array, got {_describe(value)}")
        return [_convert(v, inner, f"{path}[{i}]", limits) for i, v in enumerate(value)]
    if type(value) is not dict:
        raise DecodeError(f"{path}: expected a map, got {_describe(value)}")
    if kind == "record":
        return _convert_dataclass(value, inner, path, limits)
    if len(value) > limits.max_map_entries:
        raise DecodeError(
            f"{path}: {len(value)} entries, over the limit of {limits.max_map_entries} "
            "(DecodeLimits.max_map_entries)"
        )
    return {
        _convert(k, str, f"{path} key", limits): _convert(v, inner, f"{path}[{k!r}]", limits)
        for k, v in value.items()
    }


def _convert_dataclass(
    value: dict[Any, Any],
    cls: type,
    path: str,
    limits: DecodeLimits,
    given: dict[str, Any] | None = None,
) -> Any:
    """Build ``cls`` from a checked map; ``given`` holds fields already decoded."""
    given = given or {}
    schema = _schema(cls)
    extra = [k for k in value if k not in _field_names(cls) or k in given]
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
                kwargs[f.name] = v = _convert(value[f.name], f.type, fpath, limits)
            rule = _RULES.get((cls, f.name))
            if rule is not None and v is not None:
                rule(v, fpath, limits)
    obj = cls(**kwargs)
    if cls is TensorPayload:
        _check_tensor(obj, path, limits)
    return obj


# --------------------------------------------------------------------------- semantics

_Rule = Callable[[Any, str, DecodeLimits], None]


def _within(low: float, high: float = math.inf) -> _Rule:
    def rule(v: Any, path: str, limits: DecodeLimits) -> None:
        if not low <= v <= high:
            bound = f"at least {low}" if high == math.inf else f"within [{low}, {high}]"
            raise DecodeError(f"{path}: {v} must be {bound}")

    return rule


def _one_of(allowed: frozenset[Any]) -> _Rule:
    def rule(v: Any, path: str, limits: DecodeLimits) -> None:
        if v not in allowed:
            raise DecodeError(f"{path}: {v!r} is not one of {sorted(allowed)}")

    return rule


def _each_value(inner: _Rule) -> _Rule:
    def rule(v: dict[str, Any], path: str, limits: DecodeLimits) -> None:
        for key, item in v.items():
            inner(item, f"{path}[{key!r}]", limits)

    return rule


def _shape_text(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 8 else f"[{', '.join(map(str, shape[:8]))}, ...]"


def _element_count(shape: list[int], path: str, limits: DecodeLimits) -> int:
    """prod(shape), refusing (without building a huge int) anything over max_elements."""
    for i, d in enumerate(shape):
        if d < 0:
            raise DecodeError(f"{path}.shape[{i}]: {d} is negative")
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > limits.max_elements:
            raise DecodeError(
                f"{path}.shape: {_shape_text(shape)} has more than {limits.max_elements} "
                "elements (DecodeLimits.max_elements)"
            )
    return count


def _check_tensor(t: TensorPayload, path: str, limits: DecodeLimits) -> None:
    """Everything that makes a payload decodable: consistent bits, scheme, shape, sizes, values."""
    if t.bits not in VALID_BITS:
        raise DecodeError(f"{path}.bits: {t.bits} is not one of {sorted(VALID_BITS)}")
    quantized = t.bits in QUANT_BITS
    allowed = {SCHEME_SYMMETRIC, SCHEME_AFFINE} if quantized else {SCHEME_FLOAT}
    if t.scheme not in allowed:
        raise DecodeError(
            f"{path}.scheme: {t.scheme!r} does not go with {t.bits} bits "
            f"(expected one of {sorted(allowed)})"
        )
    count = _element_count(t.shape, path, limits)
    if not (t.axis == -1 or 0 <= t.axis < len(t.shape)):
        raise DecodeError(f"{path}.axis: {t.axis} is neither -1 nor a dimension of {len(t.shape)}")
    n_scales = (1 if t.axis == -1 else t.shape[t.axis]) if quantized else 0
    n_zero_points = n_scales if t.scheme == SCHEME_AFFINE else 0
    where = f"shape {_shape_text(t.shape)}, axis {t.axis}, {t.bits} bits, {t.scheme}"
    if len(t.scale) != 4 * n_scales:
        raise DecodeError(
            f"{path}.scale: {len(t.scale)} bytes, expected {4 * n_scales} for {where}"
        )
    if len(t.zero_point) != n_zero_points:
        raise DecodeError(
            f"{path}.zero_point: {len(t.zero_point)} bytes, expected {n_zero_points} for {where}"
        )
    scales = np.frombuffer(t.scale, dtype="<f4")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise DecodeError(f"{path}.scale: scales must be finite and >= 0")
    expected = packed_nbytes(count, t.bits)
    if len(t.data) != expected:
        raise DecodeError(
            f"{path}.data: {len(t.data)} bytes, expected {expected} for shape "
            f"{_shape_text(t.shape)} at {t.bits} bits"
        )
    if not quantized:
        bad = np.count_nonzero(~np.isfinite(np.frombuffer(t.data, dtype=_FLOAT_DTYPES[t.bits])))
        if bad:
            raise DecodeError(f"{path}.data: {bad} of {count} float values are NaN or infinite")


def _check_tensor_list(tensors: list[TensorPayload], path: str, limits: DecodeLimits) -> None:
    seen: dict[str, int] = {}
    total = 0
    for i, t in enumerate(tensors):
        if t.name in seen:
            raise DecodeError(f"{path}[{i}].name: {t.name!r} repeats {path}[{seen[t.name]}].name")
        seen[t.name] = i
        total += math.prod(t.shape)
    if total > limits.max_total_elements:
        raise DecodeError(
            f"{path}: {total} elements over all tensors, over the limit of "
            f"{limits.max_total_elements} (DecodeLimits.max_total_elements)"
        )


_NON_NEGATIVE = _within(0)
_RULES: dict[tuple[type, str], _Rule] = {
    **{
        (cls, "round"): _NON_NEGATIVE
        for cls in (TaskMessage, GlobalModelMessage, UpdateMessage, ControlMessage, ModelMessage)
    },
    (ModelMessage, "num_classes"): _within(2),
    (ModelMessage, "pixel_scale"): _within(0),
    (ModelMessage, "bits"): _each_value(_one_of(VALID_BITS)),
    # A device that has not trained yet reports round -1.
    (StatusMessage, "round"): _within(-1),
    **{
        (DeviceProfile, name): _NON_NEGATIVE
        for name in (
            "total_ram",
            "available_ram",
            "cpu_freq_mhz",
            "load_avg",
            "gflops",
            "uplink_bps",
            "downlink_bps",
            "latency_s",
        )
    },
    (DeviceProfile, "cpu_count"): _within(1),
    (DeviceProfile, "battery_percent"): _within(0, 100),
    (RegisterMessage, "num_samples"): _NON_NEGATIVE,
    (TaskMessage, "bits"): _each_value(_one_of(VALID_BITS)),
    (TaskMessage, "scheme"): _one_of(frozenset({SCHEME_SYMMETRIC, SCHEME_AFFINE})),
    (TaskMessage, "observer"): _one_of(OBSERVERS),
    (TaskMessage, "epochs"): _NON_NEGATIVE,
    (TaskMessage, "batch_size"): _within(1),
    (TaskMessage, "learning_rate"): _NON_NEGATIVE,
    (TaskMessage, "deadline_s"): _NON_NEGATIVE,
    **{
        (ResourceUsage, name): _NON_NEGATIVE
        for name in ("train_seconds", "peak_rss_bytes", "cpu_percent", "emulated_seconds")
    },
    (UpdateMessage, "num_samples"): _NON_NEGATIVE,
    (UpdateMessage, "kind"): _one_of(UPDATE_KINDS),
    (UpdateMessage, "bits_dropped"): _each_value(_NON_NEGATIVE),
    (StatusMessage, "state"): _one_of(STATUS_STATES),
    (ControlMessage, "state"): _one_of(CONTROL_STATES),
    (GlobalModelMessage, "tensors"): _check_tensor_list,
    (UpdateMessage, "tensors"): _check_tensor_list,
}


# --------------------------------------------------------------------------- tensors


def _read_layout(value: Any, full: bool, path: str, limits: DecodeLimits) -> ModelLayout:
    """The layout a body declares: whole (a global model) or by digest (known here)."""
    if not full:
        digest = _scalar(value, bytes, path, limits)
        if len(digest) != DIGEST_BYTES:
            raise DecodeError(f"{path}: {len(digest)} bytes, expected a {DIGEST_BYTES}-byte digest")
        layout = known_layout(digest)
        if layout is None:
            raise DecodeError(
                f"{path}: unknown model layout {digest.hex()}; this process has not seen a "
                "global model of that layout (is the update from another run or model?)"
            )
        return layout
    if type(value) is not list:
        raise DecodeError(f"{path}: expected an array, got {_describe(value)}")
    names, shapes = [], []
    for i, entry in enumerate(value):
        if type(entry) is not list or len(entry) != 2:
            raise DecodeError(f"{path}[{i}]: expected [name, shape], got {_describe(entry)}")
        names.append(_scalar(entry[0], str, f"{path}[{i}] name", limits))
        shape = _convert(entry[1], list[int], f"{path}[{i}] shape", limits)
        _element_count(shape, f"{path}[{i}]", limits)
        shapes.append(tuple(shape))
    if names != sorted(set(names)):
        raise DecodeError(f"{path}: tensor names must be distinct and in sorted order")
    return ModelLayout(tuple(names), tuple(shapes))


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
        raise DecodeError(f"{path}: expected an array, got {_describe(value)}")
    form = _TENSOR_FORMS.get(len(value))
    if form is None:
        raise DecodeError(
            f"{path}: expected [bits, data] or [bits, scheme, axis, scale, zero_point, data], "
            f"got {len(value)} items"
        )
    items = [
        _scalar(v, tp, f"{path}.{key}", limits) for v, (key, tp) in zip(value, form, strict=True)
    ]
    if len(items) == 2:
        bits, data = items
        t = TensorPayload(name, shape, bits, SCHEME_FLOAT, -1, b"", b"", data)
    else:
        bits, code, axis, scale, zero_point, data = items
        if code not in _SCHEME_NAMES:
            raise DecodeError(f"{path}.scheme: code {code} is not one of {sorted(_SCHEME_NAMES)}")
        t = TensorPayload(name, shape, bits, _SCHEME_NAMES[code], axis, scale, zero_point, data)
    _check_tensor(t, path, limits)
    return t


def _convert_message(raw: Any, cls: type, path: str, limits: DecodeLimits) -> Any:
    """Check a body against message ``cls``, resolving positional tensors by layout."""
    if cls not in _FULL_LAYOUT:
        return _convert(raw, cls, path, limits)
    if type(raw) is not dict:
        raise DecodeError(f"{path}: expected a map, got {_describe(raw)}")
    missing = [k for k in ("layout", "tensors") if k not in raw]
    if missing:
        raise DecodeError(f"{path}: missing field(s) {', '.join(map(repr, missing))}")
    rest = dict(raw)
    layout = _read_layout(rest.pop("layout"), _FULL_LAYOUT[cls], f"{path}.layout", limits)
    items = rest.pop("tensors")
    tpath = f"{path}.tensors"
    if type(items) is not list:
        raise DecodeError(f"{tpath}: expected an array, got {_describe(items)}")
    if len(items) != len(layout.names):
        raise DecodeError(
            f"{tpath}: {len(items)} tensors, the layout {layout.hex} has {len(layout.names)}"
        )
    tensors = [
        _read_tensor(v, name, list(shape), f"{tpath}[{i}]", limits)
        for i, (v, name, shape) in enumerate(zip(items, layout.names, layout.shapes, strict=True))
    ]
    msg = _convert_dataclass(rest, cls, path, limits, given={"tensors": tensors})
    remember_layout(layout)
    return msg


# --------------------------------------------------------------------------- decoding


def _message_class(env: Envelope) -> type:
    if env.version < PROTOCOL_VERSION:
        raise DecodeError(
            f"frame.v: frame version {env.version} is no longer supported; this build speaks "
            f"{PROTOCOL_VERSION}: upgrade the agent/coordinator that sent it"
        )
    if env.version > PROTOCOL_VERSION:
        raise DecodeError(
            f"frame.v: frame version {env.version} is newer than this build's "
            f"{PROTOCOL_VERSION}: upgrade this agent/coordinator"
        )
    cls = MESSAGE_TYPES.get(env.type)
    if cls is None:
        raise DecodeError(f"frame.type: unknown message type {env.type!r}")
    if env.codec not in CODECS:
        raise DecodeError(
            f"frame.codec: unknown codec {env.codec!r} (expected one of {sorted(CODECS)})"
        )
    return cls


def verify_envelope(env: Envelope, key: bytes) -> bool:
    """True if ``env`` carries a valid signature under the device ``key``.

    Check it before :func:`decode_body`: a forged frame is then never decompressed or parsed.
    """
    expected = frame_mac(key, env.version, env.type, env.codec, env.body)
    return hmac.compare_digest(expected, env.sig)


def decode_envelope(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Envelope:
    """Parse and check a frame, leaving its body undecoded.

    Parameters
    ----------
    data
        The raw frame, untrusted.
    limits
        Bounds on sizes; ``max_message_bytes`` is checked before parsing.

    Returns
    -------
    Envelope
        Version, type and codec are known to this build.

    Raises
    ------
    DecodeError
        For any input that is not such a frame; nothing else is raised.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"frame: expected bytes, got {_describe(data)}")
    if len(data) > limits.max_message_bytes:
        raise DecodeError(
            f"frame: {len(data)} bytes, over the limit of {limits.max_message_bytes} "
            "(DecodeLimits.max_message_bytes)"
        )
    raw = _unpack(data, "frame", limits.max_message_bytes, limits)
    frame = _convert(raw, _Frame, "frame", limits)
    env = Envelope(frame.v, frame.type, frame.codec, frame.body, frame.sig)
    _message_class(env)
    return env


@overload
def decode_body(env: Envelope, expected: type[M], limits: DecodeLimits = ...) -> M: ...
@overload
def decode_body(env: Envelope, expected: None = None, limits: DecodeLimits = ...) -> Message: ...
def decode_body(
    env: Envelope, expected: type[Any] | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> Message:
    """Decompress, parse and validate the body of a checked frame.

    Parameters
    ----------
    env
        From ``decode_envelope`` (after, say, verifying ``env.sig`` over ``env.body``).
    expected
        The message class the caller wants; any other type is a ``DecodeError``.
    limits
        Bounds on sizes, element counts and strings.

    Returns
    -------
    Message
        A message whose every field passed the schema and semantic checks.

    Raises
    ------
    DecodeError
        For any body that is not such a message; nothing else is raised.
    """
    cls = _message_class(env)
    if expected is not None and cls is not expected:
        raise DecodeError(
            f"frame.type: expected a {expected.MESSAGE_TYPE!r} message, got {env.type!r}"
        )
    where = f"{env.type} body"
    body = _decompress(env.body, where, limits) if env.codec == CODEC_ZSTD else env.body
    raw = _unpack(body, where, limits.max_decompressed_bytes, limits)
    return _convert_message(raw, cls, env.type, limits)


@overload
def decode(data: bytes, expected: type[M], limits: DecodeLimits = ...) -> M: ...
@overload
def decode(data: bytes, expected: None = None, limits: DecodeLimits = ...) -> Message: ...
def decode(
    data: bytes, expected: type[Any] | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> Message:
    """Decode and validate one frame: ``decode_body(decode_envelope(data))``.

    Parameters
    ----------
    data
        The raw frame, untrusted.
    expected
        The message class the caller wants; any other type is a ``DecodeError``.
    limits
        Bounds on sizes, element counts and strings.

    Returns
    -------
    Message
        A validated message of type ``expected`` when given.

    Raises
    ------
    DecodeError
        For any input that is not such a frame; nothing else is raised.
    """
    return decode_body(decode_envelope(data, limits), expected, limits)
