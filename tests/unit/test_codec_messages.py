"""The strict wire codec on valid messages: round trips, canonical bytes, the golden
frame, layouts by digest (and whole in files), and frame sizes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from codec_samples import FAST, f32_tensor, frame, golden_update, q4_tensor, strategy_for, wire_body
from hypothesis import given
from hypothesis import strategies as st

from fedmpq.errors import DecodeError
from fedmpq.models import build_model, quantizable_layers
from fedmpq.state import model_layout, state_to_numpy
from fedmpq.wire.codec import body_bytes, decode, decode_body, decode_envelope, encode
from fedmpq.wire.downlink import global_model_at
from fedmpq.wire.layout import ModelLayout, known_layout
from fedmpq.wire.messages import MESSAGE_TYPES, GlobalModelMessage, ResourceUsage, UpdateMessage
from fedmpq.wire.tensors import encode_state, ideal_nbytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "update_v4.msgpack"
#: update_v1/v2/v3.msgpack next to it are frames as earlier releases wrote them: version 1
#: (named, shaped tensors), version 2 (positional, per-channel scales as float32s) and
#: version 3 (per-channel steps on a grid, the global model's layout whole on the link).


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


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_old_version_frame_gets_a_clear_error(version: int) -> None:
    old = GOLDEN.with_name(f"update_v{version}.msgpack").read_bytes()
    with pytest.raises(DecodeError, match=f"frame version {version} is no longer supported; this"):
        decode(old, UpdateMessage)


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


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    ("model_name", "in_shape"),
    [("mlp", (1, 28, 28)), ("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))],
)
def test_updates_stay_near_their_ideal_size(
    model_name: str, in_shape: tuple[int, int, int], bits: int
) -> None:
    """An update and the global model at the same bits are each at most 1% + 1 KiB over
    ``sum n_l * b_l / 8`` (+ float32 rest), scales included (resnet18 is in
    ``benchmarks/codec.py``)."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, in_shape)
    state = state_to_numpy(model)
    assignment = dict.fromkeys(quantizable_layers(model), bits)
    msg = dataclasses.replace(golden_update(), tensors=encode_state(state, assignment))
    size = len(encode(msg))
    ideal = ideal_nbytes(state, assignment)
    assert size - ideal <= 0.01 * ideal + 1024
    # Per-channel scales: a 2-byte exponent per tensor and a byte per channel.
    channels = sum(w.shape[0] for name, w in state.items() if name in assignment)
    scales = sum(len(t.scale) + len(t.zero_point) for t in msg.tensors)
    assert scales == 2 * len(assignment) + channels
    assert size - scales - ideal <= 400 + 8 * len(state)  # envelope, fields, per-tensor headers
    downlink = encode(global_model_at(state, assignment, run_id="r", round=1,
                                      model_name=model_name, fingerprint="fp"))  # fmt: skip
    assert len(downlink) - ideal <= 0.01 * ideal + 1024


# --------------------------------------------------------------------------- layouts


def _cnn() -> tuple[torch.nn.Module, GlobalModelMessage]:
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 28, 28))
    state = state_to_numpy(model)
    bits = dict.fromkeys(quantizable_layers(model), 4)
    return model, global_model_at(state, bits, run_id="r", round=1, model_name="cnn",
                                  fingerprint="fp")  # fmt: skip


def test_a_global_model_on_the_link_names_its_layout_by_digest() -> None:
    model, glob = _cnn()
    layout = model_layout(model)
    body = wire_body(glob)
    assert body["layout"] == layout.digest
    assert all(t.name.encode() not in body_bytes(glob) for t in glob.tensors)
    back = decode(encode(glob), GlobalModelMessage, layout=layout)
    assert back.tensors == sorted(glob.tensors, key=lambda t: t.name)  # in layout order


def test_a_global_model_of_another_layout_names_both_digests() -> None:
    _, glob = _cnn()
    other = model_layout(build_model("cnn", 7, (1, 28, 28)))  # 7 classes: another fc shape
    theirs = ModelLayout.of_entries((t.name, t.shape) for t in glob.tensors)
    with pytest.raises(DecodeError, match=f"layout is {theirs.hex}, this model's is {other.hex}"):
        decode(encode(glob), GlobalModelMessage, layout=other)
    with pytest.raises(DecodeError, match=f"layout is {theirs.hex}, this model's is {other.hex}"):
        decode(encode(glob, inline_layout=True), GlobalModelMessage, layout=other)


def test_a_layout_read_whole_is_not_learned() -> None:
    state = {"x": np.ones((2, 2), np.float32)}
    body = wire_body(GlobalModelMessage("r", 1, "m", "fp", encode_state(state, {})))
    never_encoded = ModelLayout(("read.whole.weight",), ((2, 2),))
    body["layout"] = never_encoded.to_wire()
    glob = decode(frame(body, type="global_model"), GlobalModelMessage)
    assert [(t.name, t.shape) for t in glob.tensors] == [("read.whole.weight", [2, 2])]
    assert known_layout(never_encoded.digest) is None


def test_only_a_global_model_carries_its_layout_whole() -> None:
    with pytest.raises(TypeError, match="UpdateMessage with its layout inline"):
        encode(golden_update(), inline_layout=True)
    body = wire_body(golden_update())
    body["layout"] = [["conv.weight", [3, 5]], ["fc.bias", [3]]]
    with pytest.raises(DecodeError, match=r"update\.layout: expected bin"):
        decode(frame(body), UpdateMessage)


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
(out / "link").write_bytes(encode(glob))
(out / "file").write_bytes(encode(glob, inline_layout=True))
(out / "update").write_bytes(encode(update))
"""


def test_another_process_reads_a_model_file_but_needs_the_layout_for_the_link(
    tmp_path: Path,
) -> None:
    """Another process encodes; this one has built no such model: it reads the file (the
    layout whole), and decodes link frames only against the layout it is given."""
    subprocess.run([sys.executable, "-c", _MAKE_FRAMES, str(tmp_path)], check=True)
    link, update = (tmp_path / "link").read_bytes(), (tmp_path / "update").read_bytes()
    for unknown in (link, update):
        with pytest.raises(DecodeError, match="unknown model layout"):
            decode(unknown)
    glob = decode((tmp_path / "file").read_bytes(), GlobalModelMessage)
    layout = ModelLayout.of_entries((t.name, t.shape) for t in glob.tensors)
    assert decode(link, GlobalModelMessage, layout=layout) == glob
    msg = decode(update, UpdateMessage, layout=layout)
    assert [t.name for t in msg.tensors] == [t.name for t in glob.tensors]
    assert [t.bits for t in msg.tensors] == [32, 2]
