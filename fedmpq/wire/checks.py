"""What makes a decoded message valid beyond its types: sizes, ranges, tensor consistency.

The schema converter (``fedmpq.wire.schema``) runs ``RULES`` on each field it builds and
``check_tensor`` on each tensor; everything here raises ``DecodeError`` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmpq.errors import DecodeError
from fedmpq.packing import packed_nbytes
from fedmpq.quant_scales import EXPONENT_RANGE, units_base, units_nbytes
from fedmpq.quant_spec import (
    OBSERVERS,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_FLOAT,
    SCHEME_SYMMETRIC,
    VALID_BITS,
)
from fedmpq.secagg.messages import LayerGrid, MaskedTensor, SecAggSetup
from fedmpq.wire.messages import (
    SECAGG_DOWNLINK,
    SECAGG_UPLINK,
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
from fedmpq.wire.tensors import scales_of

STATUS_STATES = frozenset({"online", "offline", "training", "rejected", "error"})
CONTROL_STATES = frozenset({"open", "finished"})
_FLOAT_DTYPES: dict[int, np.dtype[Any]] = {16: np.dtype("<f2"), 32: np.dtype("<f4")}


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


Rule = Callable[[Any, str, DecodeLimits], None]


def _within(low: float, high: float = math.inf) -> Rule:
    def rule(v: Any, path: str, limits: DecodeLimits) -> None:
        if not low <= v <= high:
            bound = f"at least {low}" if high == math.inf else f"within [{low}, {high}]"
            raise DecodeError(f"{path}: {v} must be {bound}")

    return rule


def _positive(v: Any, path: str, limits: DecodeLimits) -> None:
    if not v > 0:
        raise DecodeError(f"{path}: {v} must be > 0")


def _grid_size(layers: list[LayerGrid], path: str, limits: DecodeLimits) -> None:
    """A setup may not ask a device for more codes than a message may carry."""
    total = sum(layer.size for layer in layers)
    if total > limits.max_total_elements:
        raise DecodeError(
            f"{path}: {total} codes over all layers, over the limit of "
            f"{limits.max_total_elements} (DecodeLimits.max_total_elements)"
        )


def _one_of(allowed: frozenset[Any]) -> Rule:
    def rule(v: Any, path: str, limits: DecodeLimits) -> None:
        if v not in allowed:
            raise DecodeError(f"{path}: {v!r} is not one of {sorted(allowed)}")

    return rule


def _each_value(inner: Rule) -> Rule:
    def rule(v: dict[str, Any], path: str, limits: DecodeLimits) -> None:
        for key, item in v.items():
            inner(item, f"{path}[{key!r}]", limits)

    return rule


def _shape_text(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 8 else f"[{', '.join(map(str, shape[:8]))}, ...]"


def element_count(shape: list[int], path: str, limits: DecodeLimits) -> int:
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


def check_tensor(t: TensorPayload, path: str, limits: DecodeLimits) -> None:
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
    count = element_count(t.shape, path, limits)
    if not (t.axis == -1 or 0 <= t.axis < len(t.shape)):
        raise DecodeError(f"{path}.axis: {t.axis} is neither -1 nor a dimension of {len(t.shape)}")
    n_scales = (1 if t.axis == -1 else t.shape[t.axis]) if quantized else 0
    n_zero_points = n_scales if t.scheme == SCHEME_AFFINE else 0
    where = f"shape {_shape_text(t.shape)}, axis {t.axis}, {t.bits} bits, {t.scheme}"
    # Per slice: an int16 exponent, then a byte a slice (fedmpq.quant_scales).
    scale_nbytes = (4 * n_scales if t.axis == -1 else units_nbytes(n_scales)) if quantized else 0
    if len(t.scale) != scale_nbytes:
        raise DecodeError(
            f"{path}.scale: {len(t.scale)} bytes, expected {scale_nbytes} for {where}"
        )
    if len(t.zero_point) != n_zero_points:
        raise DecodeError(
            f"{path}.zero_point: {len(t.zero_point)} bytes, expected {n_zero_points} for {where}"
        )
    if quantized and t.axis != -1:
        low, high = EXPONENT_RANGE
        if not low <= units_base(t.scale) <= high:
            raise DecodeError(
                f"{path}.scale: exponent {units_base(t.scale)} is outside [{low}, {high}]"
            )
    scales = scales_of(t) if quantized else np.empty(0, np.float32)
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


def check_tensor_list(tensors: list[TensorPayload], path: str, limits: DecodeLimits) -> None:
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
RULES: dict[tuple[type, str], Rule] = {
    **{
        (cls, "round"): _NON_NEGATIVE
        for cls in (
            TaskMessage,
            GlobalModelMessage,
            UpdateMessage,
            ControlMessage,
            ModelMessage,
            SecAggSetup,
            *SECAGG_UPLINK,
            *SECAGG_DOWNLINK,
        )
    },
    # Ranges only: the protocol (fedmpq.secagg) checks how the fields fit together.
    (SecAggSetup, "threshold"): _within(1),
    (SecAggSetup, "layers"): _grid_size,
    (LayerGrid, "size"): _NON_NEGATIVE,
    (LayerGrid, "bits"): _within(1, 8),
    (LayerGrid, "scale"): _positive,
    (MaskedTensor, "ring_bits"): _within(1, 32),
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
    (GlobalModelMessage, "tensors"): check_tensor_list,
    (UpdateMessage, "tensors"): check_tensor_list,
}
