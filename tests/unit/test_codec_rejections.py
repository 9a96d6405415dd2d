"""The strict wire codec's explicit rejections: each bad frame, body or tensor gets a
``DecodeError`` that names the problem, and the decode limits hold."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from codec_samples import (
    affine_tensor,
    f32_tensor,
    frame,
    golden_update,
    q4_tensor,
    samples,
    wire_body,
)

from fedmpq.errors import DecodeError
from fedmpq.quant_spec import SCHEME_FLOAT, SCHEME_SYMMETRIC
from fedmpq.wire.codec import (
    DEFAULT_LIMITS,
    DecodeLimits,
    body_bytes,
    decode,
    decode_body,
    decode_envelope,
    encode,
)
from fedmpq.wire.messages import TaskMessage, TensorPayload, UpdateMessage


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
    ("newer version", lambda: frame(wire_body(golden_update()), v=5), DEFAULT_LIMITS,
     "frame.v: frame version 5 is newer than this build's 4: upgrade this agent/coordinator"),
    ("version 1", lambda: frame(wire_body(golden_update()), v=1), DEFAULT_LIMITS,
     "frame.v: frame version 1 is no longer supported; this build speaks 4: upgrade"),
    ("version 2", lambda: frame(wire_body(golden_update()), v=2), DEFAULT_LIMITS,
     "frame.v: frame version 2 is no longer supported; this build speaks 4: upgrade"),
    ("version 3", lambda: frame(wire_body(golden_update()), v=3), DEFAULT_LIMITS,
     "frame.v: frame version 3 is no longer supported; this build speaks 4: upgrade"),
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
    ("global model of an unknown layout", "global_model", ("layout",), b"\x01" * 8,
     "global_model.layout: unknown model layout 0101010101010101"),
    ("layout as a string", "global_model", ("layout",), "cnn",
     "global_model.layout: expected an array or a digest, got str"),
    ("negative dim", "global_model", ("layout", 0, 1), [3, -5],
     "global_model.layout[0].shape[1]: -5 is negative"),
    ("too many elements", "global_model", ("layout", 0, 1), [2**40, 2**40],
     "global_model.layout[0].shape: [1099511627776, 1099511627776] has more than 67108864"),
    ("product beyond int64", "global_model", ("layout", 0, 1), [2**63] * 12,
     "has more than 67108864"),
    ("layout entry short", "global_model", ("layout", 0), ["conv.weight"],
     "global_model.layout[0]: expected [name, shape], got list"),
    ("shape of layout changed", "global_model", ("layout", 0, 1), [5, 3],
     "global_model.tensors[0].scale: 5 bytes, expected 7"),
    ("axis too big", "update", (*T0, AXIS), 2,
     "update.tensors[0].axis: 2 is neither -1 nor a dimension of 2"),
    ("axis -2", "update", (*T0, AXIS), -2, "update.tensors[0].axis: -2 is neither -1"),
    ("scale length", "update", (*T0, SCALE), b"\x00" * 8,
     "update.tensors[0].scale: 8 bytes, expected 5"),
    ("per-channel scales as float32s (version 2)", "update", (*T0, SCALE),
     np.array([0.5, 0.25, 0.125], "<f4").tobytes(),
     "update.tensors[0].scale: 12 bytes, expected 5"),
    ("per-tensor scale", "update", (*T0, AXIS), -1,
     "update.tensors[0].scale: 5 bytes, expected 4"),
    ("symmetric zero point", "update", (*T0, ZERO_POINT), b"\x00\x00\x00",
     "update.tensors[0].zero_point: 3 bytes, expected 0"),
    ("scale exponent too big", "update", (*T0, SCALE), np.array([2048], "<i2").tobytes() + b"abc",
     "update.tensors[0].scale: exponent 2048 is outside [-2400, 2047]"),
    ("scale exponent too small", "update", (*T0, SCALE),
     np.array([-2401], "<i2").tobytes() + b"abc",
     "update.tensors[0].scale: exponent -2401 is outside [-2400, 2047]"),
    ("scale overflows", "update", (*T0, SCALE), np.array([2047], "<i2").tobytes() + b"\0\1\2",
     "update.tensors[0].scale: scales must be finite and >= 0"),
    ("per-tensor scale infinite", "update", T0,
     [4, 0, -1, np.array([INF], "<f4").tobytes(), b"", b"\x00" * 8],
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
    # A global model's layout whole, as a file has it, to reach into.
    body = wire_body(samples()[type_name], inline_layout=type_name == "global_model")
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


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("secagg", "layers", 0, "bits"), 9, "within"),
        (("secagg", "layers", 0, "scale"), 0.0, "must be > 0"),
        (("secagg", "layers", 0, "size"), -1, "at least"),
        (("secagg", "threshold"), 0, "at least"),
        (("secagg", "layers", 0, "size"), 2**40, "max_total_elements"),
    ],
)
def test_secure_task_setup_out_of_range_is_rejected(path: tuple, value: object, match: str) -> None:
    body = wire_body(samples()["secure_task"])
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(DecodeError, match=match):
        decode(frame(body, type="task"))


def test_masked_input_ring_bits_out_of_range_is_rejected() -> None:
    body = wire_body(samples()["secagg_masked"])
    body["tensors"][0]["ring_bits"] = 33
    with pytest.raises(DecodeError, match="ring_bits"):
        decode(frame(body, type="secagg_masked"))
