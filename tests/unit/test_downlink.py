"""The quantized downlink: a device's start, sent exactly; one payload per allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmpq.fake_quant import fake_quantize
from fedmpq.models import build_model, quantizable_layers
from fedmpq.quant import dequantize, quantize
from fedmpq.quant_spec import (
    OBSERVER_MINMAX,
    OBSERVER_MSE,
    SCHEME_AFFINE,
    SCHEME_FLOAT,
    SCHEME_SYMMETRIC,
)
from fedmpq.state import fingerprint, state_to_numpy
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.downlink import allocation_key, global_model_at, group_by_allocation
from fedmpq.wire.messages import GlobalModelMessage
from fedmpq.wire.tensors import decode_state

QUANTIZERS = [
    (SCHEME_SYMMETRIC, OBSERVER_MINMAX, True),
    (SCHEME_SYMMETRIC, OBSERVER_MSE, True),
    (SCHEME_SYMMETRIC, OBSERVER_MINMAX, False),
    (SCHEME_AFFINE, OBSERVER_MINMAX, True),
]


def start_on_device(w: np.ndarray, bits: int, scheme: str, observer: str, axis: int) -> np.ndarray:
    """What a device trains from: its fake quantization of the float weight."""
    out = fake_quantize(torch.from_numpy(w.copy()), bits, scheme, axis, observer)
    return out.detach().numpy()


@pytest.mark.parametrize(("scheme", "observer", "per_channel"), QUANTIZERS)
def test_a_device_starts_from_the_same_bits(scheme: str, observer: str, per_channel: bool) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 28, 28))
    state = state_to_numpy(model)
    layers = quantizable_layers(model)
    bits = {name: b for name, b in zip(layers, (2, 4, 8, 3), strict=False)}
    msg = global_model_at(
        state,
        bits,
        run_id="r",
        round=3,
        model_name="cnn",
        fingerprint=fingerprint(state),
        scheme=scheme,
        per_channel=per_channel,
        observer=observer,
    )
    received = decode_state(decode(encode(msg), GlobalModelMessage).tensors)
    axis = 0 if per_channel else -1
    assert received.keys() == state.keys()
    for name, w in state.items():
        expected = start_on_device(w, bits[name], scheme, observer, axis) if name in bits else w
        assert received[name].dtype == np.float32
        assert received[name].tobytes() == expected.tobytes(), name
    assert msg.allocation == allocation_key(
        bits, scheme, per_channel=per_channel, observer=observer
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    bits=st.integers(1, 8),
    quantizer=st.sampled_from(QUANTIZERS),
    seed=st.integers(0, 2**32 - 1),
    spread=st.floats(1e-6, 1e6),
)
def test_decoded_start_is_q_of_w_bit_for_bit(
    shape: list[int], bits: int, quantizer: tuple[str, str, bool], seed: int, spread: float
) -> None:
    scheme, observer, per_channel = quantizer
    w = (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)
    state = {"layer.weight": w, "layer.bias": w.reshape(-1)[:1].copy()}
    msg = global_model_at(
        state,
        {"layer.weight": bits, "layer.bias": 32},
        run_id="r",
        round=0,
        model_name="m",
        fingerprint="f",
        scheme=scheme,
        per_channel=per_channel,
        observer=observer,
    )
    got = decode_state(decode(encode(msg), GlobalModelMessage).tensors)
    axis = 0 if per_channel and w.ndim >= 2 else -1
    q = dequantize(quantize(w, bits, scheme, axis=axis, observer=observer))
    assert got["layer.weight"].tobytes() == q.tobytes()
    assert got["layer.bias"].tobytes() == state["layer.bias"].tobytes()
    by_name = {t.name: t for t in msg.tensors}
    assert by_name["layer.bias"].scheme == SCHEME_FLOAT and by_name["layer.bias"].bits == 32


def test_devices_with_one_allocation_share_one_payload() -> None:
    a = {"conv.weight": 4, "fc.weight": 2}
    groups = group_by_allocation(
        {"d1": a, "d2": {"fc.weight": 2, "conv.weight": 4}, "d3": {**a, "fc.weight": 3}, "d4": {}}
    )
    assert list(groups.values()) == [["d1", "d2"], ["d3"], ["d4"]]
    assert "" in groups and groups[""] == ["d4"]
    assert allocation_key(a) != allocation_key(a, per_channel=False)
    assert allocation_key(a) != allocation_key(a, observer=OBSERVER_MSE)
    assert allocation_key({"fc.bias": 32}) == ""


def test_the_quantized_downlink_is_near_its_ideal_size() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 28, 28))
    state = state_to_numpy(model)
    bits = dict.fromkeys(quantizable_layers(model), 4)
    msg = global_model_at(
        state, bits, run_id="r", round=1, model_name="cnn", fingerprint=fingerprint(state)
    )
    ideal = sum(w.size * bits.get(n, 32) / 8 for n, w in state.items())
    float32 = sum(w.nbytes for w in state.values())
    assert len(encode(msg)) <= ideal * 1.01 + 1024
    assert len(encode(msg)) < float32 / 7
