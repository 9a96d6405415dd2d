"""The strict wire codec on hostile input: random, truncated, mutated and structurally
wrong frames only ever raise ``DecodeError``."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from codec_samples import (
    FAST,
    MESSAGES,
    NAMES,
    decodes_or_rejects,
    frame,
    frames,
    golden_update,
    samples,
    wire_body,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmpq.errors import DecodeError
from fedmpq.wire.codec import decode, decode_envelope, encode

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
