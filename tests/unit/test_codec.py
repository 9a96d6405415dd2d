"""The strict wire codec: round trips, the golden frame, and rejection of everything else."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmpq import PROTOCOL_VERSION
from fedmpq.errors import DecodeError
from fedmpq.models import build_model, quantizable_layers
from fedmpq.packing import packed_nbytes
from fedmpq.quant_spec import (
    OBSERVERS,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_FLOAT,
    SCHEME_SYMMETRIC,
    VALID_BITS,
)
from fedmpq.state import state_to_numpy
from fedmpq.wire.codec import (
    CONTROL_STATES,
    DEFAULT_LIMITS,
    STATUS_STATES,
    DecodeLimits,
    body_bytes,
    decode,
    decode_body,
    decode_envelope,
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
from fedmpq.wire.tensors import encode_state, ideal_nbytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "update_v2.msgpack"
#: A version-1 frame (named, shaped tensors) as the previous release wrote it.
GOLDEN_V1 = GOLDEN.with_name("update_v1.msgpack")
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
    scales = draw(st.lists(st.floats(0, 2.0**100, width=32), min_size=n_scales, max_size=n_scales))
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
        scale=np.array(scales, "<f4").tobytes(),
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
    """4-bit symmetric, one scale per output channel, shape [3, 5]."""
    return TensorPayload(
        name=name,
        shape=[3, 5],
        bits=4,
        scheme=SCHEME_SYMMETRIC,
        axis=0,
        scale=np.array([0.5, 0.25, 0.125], "<f4").tobytes(),
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
    return {
        "register": RegisterMessage("pi-zero-3", "0.1.0", profile, 512, True, 1.7e9),
        "task": TaskMessage(
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
        ),
        "global_model": GlobalModelMessage("run-0001", 7, "cnn", "fp", [q4_tensor(), f32_tensor()]),
        "update": golden_update(),
        "status": StatusMessage("pi-zero-3", "online", 0, "", 1.7e9),
        "control": ControlMessage("run-0001", "open", 0, "", 1.7e9),
    }


def frame(body: Any, *, type: str = "update", codec: str = "none", **overrides: Any) -> bytes:
    """A frame around ``body`` (bytes, or data to msgpack), with any key replaced or added."""
    raw = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    keys = {"v": PROTOCOL_VERSION, "type": type, "codec": codec, "body": raw, "sig": b""}
    return msgpack.packb({**keys, **overrides}, use_bin_type=True)


def wire_body(msg: Any) -> Any:
    return msgpack.unpackb(body_bytes(msg))


def decodes_or_rejects(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode ``data``; only DecodeError may come out, and what is accepted must be valid."""
    try:
        msg = decode(data, limits=limits)
    except DecodeError as e:
        assert str(e), "a DecodeError must say what is wrong"
        return None
    assert decode(encode(msg), limits=limits) == msg
    return msg


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=list(MESSAGE_TYPES))
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
@FAST
@given(data=st.data())
def test_round_trip_every_type(cls: type, compress: bool, data: st.DataObject) -> None:
    msg = data.draw(strategy_for(cls))
    sig = data.draw(st.binary(max_size=64))
    wire = encode(msg, compress=compress, sig=sig)
    assert wire == encode(msg, compress=compress, sig=sig)
    env = decode_envelope(wire)
    assert (env.type, env.codec, env.sig) == (cls.MESSAGE_TYPE, "zstd" if compress else "none", sig)
    back = decode_body(env, cls)
    assert back == msg
    assert encode(back, compress=compress, sig=sig) == wire


def test_encoding_is_canonical() -> None:
    msg = golden_update()
    shuffled = dataclasses.replace(
        msg,
        metrics=dict(reversed(msg.metrics.items())),
        usage=ResourceUsage(np.float32(12.5), np.int64(123_456_789), 87.5),
        tensors=[dataclasses.replace(q4_tensor(), shape=[np.int64(3), np.int64(5)]), f32_tensor()],
    )
    assert body_bytes(shuffled) == body_bytes(msg)
    assert decode_envelope(encode(msg)).body == body_bytes(msg)


def test_float_fields_accept_ints_and_become_floats() -> None:
    body = wire_body(golden_update())
    body["usage"]["train_seconds"] = 12
    msg = decode(frame(body), UpdateMessage)
    assert type(msg.usage.train_seconds) is float and msg.usage.train_seconds == 12.0


def test_fields_with_defaults_may_be_absent() -> None:
    body = wire_body(golden_update())
    del body["bits_dropped"], body["usage"]["emulated_seconds"]
    msg = decode(frame(body), UpdateMessage)
    assert msg.bits_dropped == {} and msg.usage.emulated_seconds == 0.0


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError, match="ResourceUsage"):
        encode(ResourceUsage(1.0, 1, 1.0))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- golden bytes


def write_golden() -> None:
    """Regenerate the golden frame: only when the wire format changes on purpose."""
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_bytes(encode(golden_update()))


def test_golden_update_frame() -> None:
    if os.environ.get("FEDMPQ_REGEN_GOLDEN") == "1":
        write_golden()
    stored = GOLDEN.read_bytes()
    assert encode(golden_update()) == stored
    assert decode(stored, UpdateMessage) == golden_update()


def test_a_version_1_frame_gets_a_clear_error() -> None:
    with pytest.raises(DecodeError, match="frame version 1 is no longer supported; this build"):
        decode(GOLDEN_V1.read_bytes(), UpdateMessage)


def test_tensors_travel_in_layout_order_without_names() -> None:
    msg = golden_update()
    shuffled = dataclasses.replace(msg, tensors=list(reversed(msg.tensors)))
    assert body_bytes(shuffled) == body_bytes(msg)
    assert decode(encode(shuffled), UpdateMessage) == msg
    body = body_bytes(msg)
    assert b"conv.weight" not in body.replace(b"conv.weight", b"", 1)  # only in bits_dropped
    assert all(t.name.encode() not in body for t in msg.tensors[1:])


def test_an_update_of_an_unseen_layout_is_refused() -> None:
    wire = encode(golden_update())
    unseen = dataclasses.replace(golden_update(), tensors=[f32_tensor("never.seen")])
    body = wire_body(unseen)
    body["layout"] = b"\xff" * 8
    with pytest.raises(DecodeError, match="unknown model layout ffffffffffffffff"):
        decode(frame(body))
    assert decode(wire, UpdateMessage) == golden_update()


# --------------------------------------------------------------------------- hostile input

MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(NAMES, kids, max_size=4),
    max_leaves=8,
)


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a msgpack tree of maps and arrays."""
    if not isinstance(tree, (dict, list)):
        return [prefix]
    out = [prefix] if prefix else []
    for k in tree.keys() if isinstance(tree, dict) else range(len(tree)):
        out += paths(tree[k], (*prefix, k))
    return out


@FAST
@given(data=st.binary(max_size=512))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    assert decodes_or_rejects(data) is None


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_every_truncation_is_rejected(compress: bool) -> None:
    for msg in samples().values():
        wire = encode(msg, compress=compress)
        for n in range(len(wire)):
            with pytest.raises(DecodeError):
                decode(wire[:n])


EDITS = ["flip", "insert", "delete"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wire=frames(),
    edits=st.lists(
        st.tuples(st.sampled_from(EDITS), st.integers(0), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    into_body=st.booleans(),
)
def test_mutated_frames_only_raise_decode_error(
    wire: bytes, edits: list[tuple[str, int, int]], into_body: bool
) -> None:
    env = decode_envelope(wire)
    target = bytearray(env.body if into_body else wire)
    for op, pos, byte in edits:
        i = pos % (len(target) + 1)
        if op == "insert":
            target.insert(i, byte)
        elif target:
            i %= len(target)
            if op == "flip":
                target[i] ^= byte or 1
            else:
                del target[i]
    data = frame(bytes(target), type=env.type, codec=env.codec) if into_body else bytes(target)
    decodes_or_rejects(data)


@FAST
@given(
    msg=MESSAGES,
    data=st.data(),
    action=st.sampled_from(["replace", "delete", "add"]),
    value=MSGPACK_VALUES,
)
def test_structurally_wrong_bodies_only_raise_decode_error(
    msg: Any, data: st.DataObject, action: str, value: Any
) -> None:
    body = wire_body(msg)
    path = data.draw(st.sampled_from(paths(body)))
    *parents, last = path
    node = body
    for k in parents:
        node = node[k]
    if action == "replace":
        node[last] = value
    elif action == "delete":
        del node[last]
    else:
        target = node[last] if isinstance(node[last], dict) else body
        target[data.draw(st.text(max_size=6))] = value
    decodes_or_rejects(frame(body, type=msg.MESSAGE_TYPE))


@FAST
@given(
    key=st.sampled_from(["v", "type", "codec", "body", "sig", "extra"]),
    value=MSGPACK_VALUES,
    drop=st.booleans(),
)
def test_structurally_wrong_frames_only_raise_decode_error(
    key: str, value: Any, drop: bool
) -> None:
    keys = msgpack.unpackb(encode(golden_update()))
    if drop and key in keys:
        del keys[key]
    else:
        keys[key] = value
    decodes_or_rejects(msgpack.packb(keys, use_bin_type=True))


# --------------------------------------------------------------------------- explicit rejections


def zstd_bomb(size: int, *, with_size: bool = True) -> bytes:
    """A small zstd frame of ``size`` zero bytes, built without holding them in memory."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(write_content_size=with_size)
    with cctx.stream_writer(out, size=size if with_size else -1, closefd=False) as w:
        chunk = bytes(2**20)
        for start in range(0, size, len(chunk)):
            w.write(chunk[: min(len(chunk), size - start)])
    return out.getvalue()


def invalid_utf8_frame() -> bytes:
    wire = frame(wire_body(golden_update()), type="XXXX")
    return wire.replace(b"\xa4XXXX", b"\xa4\xff\xfe\xfd\xfc")


def deep_array(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


# fmt: off
FRAME_CASES = [
    ("too large", lambda: encode(golden_update()), DecodeLimits(max_message_bytes=100),
     "over the limit of 100 (DecodeLimits.max_message_bytes)"),
    ("not bytes", lambda: "text", DEFAULT_LIMITS, "frame: expected bytes, got str"),
    ("empty", lambda: b"", DEFAULT_LIMITS, "frame: not valid msgpack"),
    ("reserved byte", lambda: b"\xc1", DEFAULT_LIMITS, "frame: not valid msgpack (reserved"),
    ("trailing bytes", lambda: encode(golden_update()) + b"\x00", DEFAULT_LIMITS,
     "frame: trailing bytes"),
    ("body trailing bytes", lambda: frame(body_bytes(golden_update()) + b"\xc0"), DEFAULT_LIMITS,
     "update body: trailing bytes"),
    ("invalid utf-8", invalid_utf8_frame, DEFAULT_LIMITS, "frame: a string is not valid UTF-8"),
    ("not a map", lambda: msgpack.packb([1, 2]), DEFAULT_LIMITS, "frame: expected a map, got list"),
    ("missing sig", lambda: msgpack.packb({"v": 1, "type": "update", "codec": "none", "body": b""}),
     DEFAULT_LIMITS, "frame: missing field(s) 'sig'"),
    ("extra key", lambda: frame(wire_body(golden_update()), extra=1), DEFAULT_LIMITS,
     "frame: unknown field(s) 'extra'"),
    ("v as str", lambda: frame(wire_body(golden_update()), v="1"), DEFAULT_LIMITS,
     "frame.v: expected an integer, got str"),
    ("newer version", lambda: frame(wire_body(golden_update()), v=3), DEFAULT_LIMITS,
     "frame.v: frame version 3 is newer than this build's 2: upgrade this agent/coordinator"),
    ("version 1", lambda: frame(wire_body(golden_update()), v=1), DEFAULT_LIMITS,
     "frame.v: frame version 1 is no longer supported; this build speaks 2: upgrade"),
    ("unknown type", lambda: frame(wire_body(golden_update()), type="hello"), DEFAULT_LIMITS,
     "frame.type: unknown message type 'hello'"),
    ("unknown codec", lambda: frame(wire_body(golden_update()), codec="gzip"), DEFAULT_LIMITS,
     "frame.codec: unknown codec 'gzip'"),
    ("body not a map", lambda: frame([1]), DEFAULT_LIMITS, "update: expected a map, got list"),
    ("ext type", lambda: frame(msgpack.packb(msgpack.ExtType(5, b"x"))), DEFAULT_LIMITS,
     "msgpack extension types are not part of the protocol"),
    ("deep nesting", lambda: frame(deep_array(100_000)), DEFAULT_LIMITS,
     "update body: arrays or maps nested too deeply"),
    ("deep frame", lambda: deep_array(100_000), DEFAULT_LIMITS,
     "frame: arrays or maps nested too deeply"),
    ("huge array header", lambda: frame(b"\xdd\xff\xff\xff\xff"), DEFAULT_LIMITS,
     "an array is longer than DecodeLimits.max_tensors"),
    ("huge map header", lambda: frame(b"\xdf\xff\xff\xff\xff"), DEFAULT_LIMITS,
     "a map has more entries than DecodeLimits.max_map_entries"),
    ("huge string", lambda: frame({"run_id": "x" * 2000}), DEFAULT_LIMITS,
     "a string is longer than 4 * DecodeLimits.max_string_len bytes"),
    ("too many tensors", lambda: encode(golden_update()), DecodeLimits(max_tensors=1),
     "an array is longer than DecodeLimits.max_tensors"),
    ("zstd bomb", lambda: frame(zstd_bomb(DEFAULT_LIMITS.max_decompressed_bytes + 1), codec="zstd"),
     DEFAULT_LIMITS, "zstd frame declares 268435457 bytes, over the limit of 268435456"),
    ("zstd no size", lambda: frame(zstd_bomb(3 * 2**20, with_size=False), codec="zstd"),
     DEFAULT_LIMITS, "zstd frame does not declare its content size"),
    ("zstd garbage", lambda: frame(b"not zstd at all", codec="zstd"), DEFAULT_LIMITS,
     "update body: not a zstd frame"),
    ("zstd truncated", lambda: frame(zstd_bomb(1000)[:-3], codec="zstd"), DEFAULT_LIMITS,
     "update body: zstd decompression failed"),
    ("zstd trailing", lambda: frame(zstd_bomb(1000) + b"\x00", codec="zstd"), DEFAULT_LIMITS,
     "update body: zstd decompression failed"),
]
# fmt: on


@pytest.mark.parametrize(
    ("make", "limits", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in FRAME_CASES],
)
def test_frame_rejections_name_the_problem(make: Any, limits: DecodeLimits, expected: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(make(), limits=limits)
    assert expected in str(info.value)


def test_expected_type_mismatch() -> None:
    with pytest.raises(DecodeError, match="expected a 'task' message, got 'update'"):
        decode(encode(golden_update()), TaskMessage)


_DELETE = object()
NAN, INF = float("nan"), float("inf")
T0 = ("tensors", 0)
# Positions of a quantized tensor's fields on the wire.
BITS, SCHEME, AXIS, SCALE, ZERO_POINT, DATA = range(6)

# (message type, path into its body, new value or _DELETE, expected text).
# fmt: off
BODY_CASES = [
    ("missing field", "update", ("run_id",), _DELETE, "update: missing field(s) 'run_id'"),
    ("extra field", "update", ("colour",), "red", "update: unknown field(s) 'colour'"),
    ("nested extra", "update", ("usage", "joules"), 1.0, "update.usage: unknown field(s) 'joules'"),
    ("int as bool", "update", ("round",), True, "update.round: expected an integer, got bool"),
    ("int as float", "update", ("round",), 1.0, "update.round: expected an integer, got float"),
    ("float as bool", "update", ("usage", "train_seconds"), True,
     "update.usage.train_seconds: expected a number, got bool"),
    ("str as int", "update", ("client_id",), 5, "update.client_id: expected a string, got int"),
    ("str as nil", "update", ("client_id",), None, "update.client_id: expected a string, got nil"),
    ("bool as int", "task", ("compress",), 1, "task.compress: expected a bool, got int"),
    ("bytes as str", "update", (*T0, DATA), "abc",
     "update.tensors[0].data: expected bin, got str"),
    ("list as map", "update", ("tensors",), {}, "update.tensors: expected an array, got dict"),
    ("map as list", "update", ("metrics",), [], "update.metrics: expected a map, got list"),
    ("map key as bin", "update", ("metrics",), {b"loss": 0.5},
     "update.metrics key: expected a string, got bytes"),
    ("dataclass as int", "update", ("usage",), 3, "update.usage: expected a map, got int"),
    ("long string", "update", ("client_id",), "x" * 257,
     "update.client_id: string of 257 characters, over the limit of 256"),
    ("NaN metric", "update", ("metrics", "loss"), NAN,
     "update.metrics['loss']: nan is not a finite number"),
    ("Inf profile", "register", ("profile", "gflops"), INF,
     "register.profile.gflops: inf is not a finite number"),
    ("NaN learning rate", "task", ("learning_rate",), NAN,
     "task.learning_rate: nan is not a finite number"),
    ("-Inf option", "task", ("options", "lambda"), -INF,
     "task.options['lambda']: -inf is not a finite number"),
    ("bits 9", "update", (*T0, BITS), 9, "update.tensors[0].bits: 9 is not one of"),
    ("unknown scheme", "update", (*T0, SCHEME), 7,
     "update.tensors[0].scheme: code 7 is not one of [0, 1]"),
    ("scheme as str", "update", (*T0, SCHEME), "symmetric",
     "update.tensors[0].scheme: expected an integer, got str"),
    ("float form at 4 bits", "update", T0, [4, b"\x00" * 8],
     "update.tensors[0].scheme: 'float' does not go with 4 bits"),
    ("symmetric at 32 bits", "update", ("tensors", 1), [32, 0, -1, b"", b"", b"\x00" * 12],
     "update.tensors[1].scheme: 'symmetric' does not go with 32 bits"),
    ("tensor of 3 items", "update", ("tensors", 1), [32, b"", b""],
     "update.tensors[1]: expected [bits, data] or [bits, scheme, axis, scale, zero_point, data]"),
    ("tensor as map", "update", T0, {"bits": 4}, "update.tensors[0]: expected an array, got dict"),
    ("one tensor short", "update", ("tensors", 1), _DELETE,
     "update.tensors: 1 tensors, the layout"),
    ("unknown layout", "update", ("layout",), b"\x00" * 8,
     "update.layout: unknown model layout 0000000000000000"),
    ("short digest", "update", ("layout",), b"\x00" * 4,
     "update.layout: 4 bytes, expected a 8-byte digest"),
    ("layout as list", "update", ("layout",), [["conv.weight", [3, 5]]],
     "update.layout: expected bin, got list"),
    ("missing layout", "update", ("layout",), _DELETE, "update: missing field(s) 'layout'"),
    ("negative dim", "global_model", ("layout", 0, 1), [3, -5],
     "global_model.layout[0].shape[1]: -5 is negative"),
    ("too many elements", "global_model", ("layout", 0, 1), [2**40, 2**40],
     "global_model.layout[0].shape: [1099511627776, 1099511627776] has more than 67108864"),
    ("product beyond int64", "global_model", ("layout", 0, 1), [2**63] * 12,
     "has more than 67108864"),
    ("layout entry short", "global_model", ("layout", 0), ["conv.weight"],
     "global_model.layout[0]: expected [name, shape], got list"),
    ("shape of layout changed", "global_model", ("layout", 0, 1), [5, 3],
     "global_model.tensors[0].scale: 12 bytes, expected 20"),
    ("axis too big", "update", (*T0, AXIS), 2,
     "update.tensors[0].axis: 2 is neither -1 nor a dimension of 2"),
    ("axis -2", "update", (*T0, AXIS), -2, "update.tensors[0].axis: -2 is neither -1"),
    ("scale length", "update", (*T0, SCALE), b"\x00" * 8,
     "update.tensors[0].scale: 8 bytes, expected 12"),
    ("per-tensor scale", "update", (*T0, AXIS), -1,
     "update.tensors[0].scale: 12 bytes, expected 4"),
    ("symmetric zero point", "update", (*T0, ZERO_POINT), b"\x00\x00\x00",
     "update.tensors[0].zero_point: 3 bytes, expected 0"),
    ("scale NaN", "update", (*T0, SCALE), np.array([1, NAN, 1], "<f4").tobytes(),
     "update.tensors[0].scale: scales must be finite and >= 0"),
    ("scale negative", "update", (*T0, SCALE), np.array([1, -1, 1], "<f4").tobytes(),
     "update.tensors[0].scale: scales must be finite and >= 0"),
    ("data length", "update", (*T0, DATA), b"\x00" * 9,
     "update.tensors[0].data: 9 bytes, expected 8 for shape [3, 5] at 4 bits"),
    ("float32 NaN data", "update", ("tensors", 1, 1), np.array([1, NAN, INF], "<f4").tobytes(),
     "update.tensors[1].data: 2 of 3 float values are NaN or infinite"),
    ("duplicate names", "global_model", ("layout", 1, 0), "conv.weight",
     "global_model.layout: tensor names must be distinct and in sorted order"),
    ("unsorted names", "global_model", ("layout", 1, 0), "a.bias",
     "global_model.layout: tensor names must be distinct and in sorted order"),
    ("negative round", "update", ("round",), -1, "update.round: -1 must be at least 0"),
    ("negative samples", "register", ("num_samples",), -3,
     "register.num_samples: -3 must be at least 0"),
    ("negative rss", "update", ("usage", "peak_rss_bytes"), -1,
     "update.usage.peak_rss_bytes: -1 must be at least 0"),
    ("unknown kind", "update", ("kind",), "gradients",
     "update.kind: 'gradients' is not one of ['delta', 'weights']"),
    ("negative bits dropped", "update", ("bits_dropped", "conv.weight"), -1,
     "update.bits_dropped['conv.weight']: -1 must be at least 0"),
    ("task bits", "task", ("bits", "conv.weight"), 12,
     "task.bits['conv.weight']: 12 is not one of"),
    ("task scheme", "task", ("scheme",), "float", "task.scheme: 'float' is not one of"),
    ("task observer", "task", ("observer",), "histogram",
     "task.observer: 'histogram' is not one of"),
    ("status round -2", "status", ("round",), -2, "status.round: -2 must be at least -1"),
    ("batch size 0", "task", ("batch_size",), 0, "task.batch_size: 0 must be at least 1"),
    ("no cpus", "register", ("profile", "cpu_count"), 0,
     "register.profile.cpu_count: 0 must be at least 1"),
    ("battery 150", "register", ("profile", "battery_percent"), 150.0,
     "register.profile.battery_percent: 150.0 must be within [0, 100]"),
    ("status state", "status", ("state",), "sleeping", "status.state: 'sleeping' is not one of"),
    ("control state", "control", ("state",), "paused", "control.state: 'paused' is not one of"),
]
# fmt: on


@pytest.mark.parametrize(
    ("type_name", "path", "value", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in BODY_CASES],
)
def test_body_rejections_name_the_problem(
    type_name: str, path: tuple[Any, ...], value: Any, expected: str
) -> None:
    body = wire_body(samples()[type_name])
    *parents, last = path
    node = body
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    with pytest.raises(DecodeError) as info:
        decode(frame(body, type=type_name))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("tensor", "limits", "expected"),
    [
        pytest.param(
            TensorPayload("x", [7, 16], 4, SCHEME_SYMMETRIC, -1, b"\0" * 4, b"", b"\0" * 57),
            DEFAULT_LIMITS,
            "update.tensors[0].data: 57 bytes, expected 56 for shape [7, 16] at 4 bits",
            id="data length",
        ),
        pytest.param(
            dataclasses.replace(affine_tensor(), zero_point=b"\x00\x01"),
            DEFAULT_LIMITS,
            "update.tensors[0].zero_point: 2 bytes, expected 1",
            id="affine zero point",
        ),
        pytest.param(
            TensorPayload("h", [2], 16, SCHEME_FLOAT, -1, b"", b"", b"\x00\x7c\x00\x00"),
            DEFAULT_LIMITS,
            "update.tensors[0].data: 1 of 2 float values are NaN or infinite",
            id="float16 inf",
        ),
        pytest.param(
            q4_tensor(),
            DecodeLimits(max_elements=10),
            "update.tensors[0].shape: [3, 5] has more than 10 elements",
            id="max elements",
        ),
    ],
)
def test_tensor_rejections(tensor: TensorPayload, limits: DecodeLimits, expected: str) -> None:
    msg = dataclasses.replace(golden_update(), tensors=[tensor])
    with pytest.raises(DecodeError) as info:
        decode(encode(msg), limits=limits)
    assert expected in str(info.value)


def test_total_elements_over_a_message() -> None:
    limits = DecodeLimits(max_total_elements=30)
    msg = dataclasses.replace(golden_update(), tensors=[q4_tensor("a"), q4_tensor("b")])
    assert decode(encode(msg), limits=limits) == msg
    msg.tensors.append(f32_tensor("c"))
    with pytest.raises(DecodeError, match=r"update.tensors: 33 elements over all tensors"):
        decode(encode(msg), limits=limits)


def test_map_entries_limit() -> None:
    msg = golden_update()
    msg.metrics = {f"m{i}": float(i) for i in range(5)}
    with pytest.raises(DecodeError, match=r"update.metrics: 5 entries, over the limit of 4"):
        decode(encode(msg), limits=DecodeLimits(max_map_entries=4))
    # Records are maps too, but their width is fixed by the schema, not by this limit.
    assert decode(encode(golden_update()), limits=DecodeLimits(max_map_entries=2))


def test_affine_tensor_is_accepted() -> None:
    msg = dataclasses.replace(golden_update(), tensors=[affine_tensor()])
    assert decode(encode(msg, compress=True), UpdateMessage) == msg


def test_decode_body_checks_a_hand_made_envelope() -> None:
    env = decode_envelope(encode(golden_update(), compress=True))
    assert decode_body(env, UpdateMessage) == golden_update()
    for bad, expected in [
        (dataclasses.replace(env, version=1), "frame version 1 is no longer supported"),
        (dataclasses.replace(env, type="nope"), "unknown message type 'nope'"),
        (dataclasses.replace(env, codec="lz4"), "unknown codec 'lz4'"),
        (dataclasses.replace(env, codec="none"), "update body: "),
    ]:
        with pytest.raises(DecodeError, match=expected):
            decode_body(bad)


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_updates_stay_near_their_ideal_size(model_name: str, bits: int) -> None:
    """Framing costs at most 1% + 1 KiB over ``sum n_l * b_l / 8`` (+ float32 rest); the
    per-channel float32 scales come on top, and are all else a frame adds."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, (1, 28, 28))
    state = state_to_numpy(model)
    assignment = dict.fromkeys(quantizable_layers(model), bits)
    msg = dataclasses.replace(golden_update(), tensors=encode_state(state, assignment))
    size = len(encode(msg))
    ideal = ideal_nbytes(state, assignment)
    scales = sum(len(t.scale) + len(t.zero_point) for t in msg.tensors)
    allowed = 0.01 * ideal + 1024
    assert size - scales - ideal <= allowed
    assert size - scales - ideal <= 400 + 8 * len(state)  # envelope, fields, per-tensor headers
    if model_name == "cnn":
        assert size - ideal <= allowed


_MAKE_FRAMES = """
import sys
from pathlib import Path
import numpy as np
from fedmpq.wire.codec import encode
from fedmpq.wire.messages import GlobalModelMessage, ResourceUsage, UpdateMessage
from fedmpq.wire.tensors import encode_state

state = {"only.in.child.weight": np.ones((4, 3), np.float32), "only.in.child.bias": np.zeros(4)}
glob = GlobalModelMessage("r", 1, "m", "fp", encode_state(state, {}))
update = UpdateMessage(
    "r", 1, "d", 1, "fp", "weights", encode_state(state, {"only.in.child.weight": 2}),
    ResourceUsage(1.0, 1, 1.0), {},
)
out = Path(sys.argv[1])
(out / "global").write_bytes(encode(glob))
(out / "update").write_bytes(encode(update))
"""


def test_a_process_decodes_updates_of_the_layout_its_global_model_carried(tmp_path: Path) -> None:
    """Another process encodes; this one learns the layout from the global model alone."""
    subprocess.run([sys.executable, "-c", _MAKE_FRAMES, str(tmp_path)], check=True)
    update = (tmp_path / "update").read_bytes()
    with pytest.raises(DecodeError, match="unknown model layout"):
        decode(update, UpdateMessage)
    glob = decode((tmp_path / "global").read_bytes(), GlobalModelMessage)
    msg = decode(update, UpdateMessage)
    assert [t.name for t in msg.tensors] == [t.name for t in glob.tensors]
    assert [t.bits for t in msg.tensors] == [32, 2]
