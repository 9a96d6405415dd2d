"""Valid wire messages for the codec tests: hypothesis strategies built from the message
dataclasses, hand-made samples (the golden update among them) and frame helpers."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import msgpack
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fedmpq import PROTOCOL_VERSION
from fedmpq.errors import DecodeError
from fedmpq.packing import packed_nbytes
from fedmpq.quant_scales import EXPONENT_RANGE
from fedmpq.quant_spec import (
    OBSERVERS,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_FLOAT,
    SCHEME_SYMMETRIC,
    VALID_BITS,
)
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    LayerGrid,
    MaskedInput,
    MaskedTensor,
    SecAggSetup,
    UnmaskResponse,
)
from fedmpq.wire.codec import (
    CONTROL_STATES,
    DEFAULT_LIMITS,
    STATUS_STATES,
    DecodeLimits,
    body_bytes,
    decode,
    encode,
)
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

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

NAMES = st.text(max_size=12)
FLOAT_DTYPES = {16: "<f2", 32: "<f4"}


@st.composite
def tensors(draw: st.DrawFn) -> TensorPayload:
    """A payload the decoder must accept: sizes consistent, scales and floats finite."""
    bits = draw(st.sampled_from(sorted(VALID_BITS)))
    quantized = bits in QUANT_BITS
    scheme = draw(st.sampled_from([SCHEME_SYMMETRIC, SCHEME_AFFINE])) if quantized else SCHEME_FLOAT
    shape = draw(st.lists(st.integers(0, 6), max_size=3))
    # A float tensor has no scale axis: it travels as -1 whatever a caller set.
    axis = draw(st.sampled_from([-1, *range(len(shape))])) if quantized else -1
    count = math.prod(shape)
    n_scales = (1 if axis == -1 else shape[axis]) if quantized else 0
    # Per tensor a float32; per slice an int16 exponent and a code a slice, whose largest
    # step times the symmetric levels (< 2**7) stays a finite float32.
    if not quantized:
        scale = b""
    elif axis == -1:
        scale = np.array([draw(st.floats(0, 2.0**100, width=32))], "<f4").tobytes()
    else:
        base = draw(st.integers(EXPONENT_RANGE[0], 16 * 120))
        scale = np.array([base], "<i2").tobytes() + draw(
            st.binary(min_size=n_scales, max_size=n_scales)
        )
    n_zp = n_scales if scheme == SCHEME_AFFINE else 0
    if quantized:
        nbytes = packed_nbytes(count, bits)
        data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    else:
        values = st.floats(width=bits, allow_nan=False, allow_infinity=False)
        data = np.array(
            draw(st.lists(values, min_size=count, max_size=count)), FLOAT_DTYPES[bits]
        ).tobytes()
    return TensorPayload(
        name=draw(NAMES),
        shape=shape,
        bits=bits,
        scheme=scheme,
        axis=axis,
        scale=scale,
        zero_point=draw(st.binary(min_size=n_zp, max_size=n_zp)),
        data=data,
    )


# Sorted by name: a decoded message lists its tensors in layout order.
TENSOR_LISTS = st.lists(tensors(), max_size=3, unique_by=lambda t: t.name).map(
    lambda ts: sorted(ts, key=lambda t: t.name)
)

# Fields whose valid values are narrower than their annotation.
OVERRIDES: dict[tuple[type, str], st.SearchStrategy[Any]] = {
    (UpdateMessage, "kind"): st.sampled_from(sorted(UPDATE_KINDS)),
    (UpdateMessage, "tensors"): TENSOR_LISTS,
    (GlobalModelMessage, "tensors"): TENSOR_LISTS,
    (StatusMessage, "state"): st.sampled_from(sorted(STATUS_STATES)),
    (ControlMessage, "state"): st.sampled_from(sorted(CONTROL_STATES)),
    (TaskMessage, "bits"): st.dictionaries(NAMES, st.sampled_from(sorted(VALID_BITS)), max_size=4),
    (ModelMessage, "bits"): st.dictionaries(NAMES, st.sampled_from(sorted(VALID_BITS)), max_size=4),
    (ModelMessage, "num_classes"): st.integers(2, 2**16),
    (TaskMessage, "scheme"): st.sampled_from([SCHEME_SYMMETRIC, SCHEME_AFFINE]),
    (TaskMessage, "observer"): st.sampled_from(sorted(OBSERVERS)),
    (TaskMessage, "batch_size"): st.integers(1, 2**16),
    (StatusMessage, "round"): st.integers(-1, 2**63),
    (DeviceProfile, "cpu_count"): st.integers(1, 1024),
    (DeviceProfile, "battery_percent"): st.none() | st.floats(0, 100),
    (SecAggSetup, "threshold"): st.integers(1, 2**16),
    (LayerGrid, "size"): st.integers(0, 2**20),
    (LayerGrid, "bits"): st.integers(1, 8),
    (LayerGrid, "scale"): st.floats(1e-30, 1e30),
    (MaskedTensor, "ring_bits"): st.integers(1, 32),
}
SCALARS: dict[Any, st.SearchStrategy[Any]] = {
    int: st.integers(0, 2**64 - 1),
    float: st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    str: st.text(max_size=20),
    bytes: st.binary(max_size=16),
    bool: st.booleans(),
}


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Valid values of annotation ``tp``, built from the dataclass annotations."""
    if dataclasses.is_dataclass(tp):
        hints = get_type_hints(tp)
        fields = {f.name: OVERRIDES.get((tp, f.name)) for f in dataclasses.fields(tp)}
        return st.builds(
            tp, **{k: strategy_for(hints[k]) if v is None else v for k, v in fields.items()}
        )
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return st.none() | strategy_for(next(a for a in args if a is not type(None)))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(NAMES, strategy_for(args[1]), max_size=4)
    return SCALARS[tp]


MESSAGES = st.one_of([strategy_for(cls) for cls in MESSAGE_TYPES.values()])


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    return encode(draw(MESSAGES), compress=draw(st.booleans()), sig=draw(st.binary(max_size=8)))


# --------------------------------------------------------------------------- samples


def q4_tensor(name: str = "conv.weight") -> TensorPayload:
    """4-bit symmetric, one scale per output channel, shape [3, 5]: steps 2**-4, 2**-5 and
    2**-6 (exponent -64, codes 0, 16, 32), so scales 7/16, 7/32 and 7/64."""
    return TensorPayload(
        name=name,
        shape=[3, 5],
        bits=4,
        scheme=SCHEME_SYMMETRIC,
        axis=0,
        scale=np.array([-64], "<i2").tobytes() + bytes([0, 16, 32]),
        zero_point=b"",
        data=bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0x0E]),
    )


def f32_tensor(name: str = "fc.bias") -> TensorPayload:
    return TensorPayload(
        name, [3], 32, SCHEME_FLOAT, -1, b"", b"", np.array([1.5, -2.0, 0.0], "<f4").tobytes()
    )


def affine_tensor(name: str = "affine.weight") -> TensorPayload:
    """8-bit affine, per-tensor: one scale, one zero point."""
    return TensorPayload(name, [2, 2], 8, SCHEME_AFFINE, -1, b"\x00\x00\x80\x3f", b"\x80", b"abcd")


def golden_update() -> UpdateMessage:
    return UpdateMessage(
        run_id="run-0001",
        round=7,
        client_id="pi-zero-3",
        num_samples=512,
        model_fingerprint="sha256:0123456789abcdef",
        kind="weights",
        tensors=[q4_tensor(), f32_tensor()],
        usage=ResourceUsage(train_seconds=12.5, peak_rss_bytes=123_456_789, cpu_percent=87.5),
        metrics={"loss": 0.6931471805599453, "accuracy": 0.5},
        bits_dropped={"conv.weight": 1},
    )


def samples() -> dict[str, Any]:
    profile = DeviceProfile(
        total_ram=2**30,
        available_ram=2**29,
        cpu_count=4,
        cpu_freq_mhz=1500.0,
        load_avg=0.5,
        gflops=2.5,
        platform="Linux",
        arch="aarch64",
        battery_percent=None,
    )
    golden_task = TaskMessage(
        "run-0001",
        7,
        "pi-zero-3",
        "cnn",
        "fp",
        "fedmpq",
        {"conv.weight": 4},
        SCHEME_SYMMETRIC,
        True,
        1,
        32,
        0.01,
        60.0,
        True,
        {"lambda": 0.1},
    )
    return {
        "register": RegisterMessage("pi-zero-3", "0.1.0", profile, 512, True, 1.7e9),
        "task": golden_task,
        "global_model": GlobalModelMessage("run-0001", 7, "cnn", "fp", [q4_tensor(), f32_tensor()]),
        "update": golden_update(),
        "status": StatusMessage("pi-zero-3", "online", 0, "", 1.7e9),
        "control": ControlMessage("run-0001", "open", 0, "", 1.7e9),
        "secure_task": dataclasses.replace(
            golden_task,
            secagg=SecAggSetup(
                "run-0001", 7, ["pi-zero-3", "pi-zero-4"], 2, [LayerGrid("conv.weight", 15, 4, 0.5)]
            ),
        ),
        "secagg_keys": AdvertiseKeys("run-0001", 7, "pi-zero-3", bytes(32), bytes(range(32))),
        "secagg_masked": MaskedInput(
            "run-0001", 7, "pi-zero-3", [MaskedTensor("conv.weight", 6, bytes(range(12)))]
        ),
        "secagg_unmask_response": UnmaskResponse("run-0001", 7, "pi-zero-3", [], []),
    }


def frame(body: Any, *, type: str = "update", codec: str = "none", **overrides: Any) -> bytes:
    """A frame around ``body`` (bytes, or data to msgpack), with any key replaced or added."""
    raw = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    keys = {"v": PROTOCOL_VERSION, "type": type, "codec": codec, "body": raw, "sig": b""}
    return msgpack.packb({**keys, **overrides}, use_bin_type=True)


def wire_body(msg: Any, *, inline_layout: bool = False) -> Any:
    return msgpack.unpackb(body_bytes(msg, inline_layout=inline_layout))


def decodes_or_rejects(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode ``data``; only DecodeError may come out, and what is accepted must be valid."""
    try:
        msg = decode(data, limits=limits)
    except DecodeError as e:
        assert str(e), "a DecodeError must say what is wrong"
        return None
    assert decode(encode(msg), limits=limits) == msg
    return msg
