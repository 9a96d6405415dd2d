"""FedMPQ: allocation math, bit-plane form, plane dropping, regulariser."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmpq.bitplanes import BitPlaneWeight, PlaneLayer, drop_planes, plane_bits, to_planes
from fedmpq.models import build_model, quantizable_layers
from fedmpq.policies import ClientResult, LayerInfo, make_policy
from fedmpq.policies.base import ClientInfo
from fedmpq.policies.fedmpq import FedMPQHooks, fit_to_budget, layer_priorities
from fedmpq.quant import dequantize, quantize
from fedmpq.wire.messages import DeviceProfile

LAYERS = [LayerInfo("a", 100), LayerInfo("b", 300), LayerInfo("c", 600)]
PROFILE = DeviceProfile(2**30, 2**29, 4, 1500.0, 0.1, 10.0, "linux", "aarch64")


def avg(bits):
    return sum(bits[layer.name] * layer.numel for layer in LAYERS) / 1000


def test_priorities_weigh_size_by_rounded_mean_dropped_plus_one():
    p = layer_priorities(LAYERS, {"a": 2.0, "b": 0.4, "c": 0.0})
    assert p == pytest.approx({"a": 0.1 * 3, "b": 0.3 * 1, "c": 0.6 * 1})


def test_over_budget_cuts_the_highest_priority_layer_first():
    priorities = {"a": 0.9, "b": 0.3, "c": 0.6}
    bits = fit_to_budget({"a": 6, "b": 6, "c": 6}, LAYERS, priorities, budget=5.5)
    # One bit off "a" (the highest priority) gives 5.9, then one off "c" gives 5.3.
    assert bits == {"a": 5, "b": 6, "c": 5}
    assert avg(bits) <= 5.5


def test_under_budget_grows_the_lowest_priority_layer_first_and_stays_within():
    priorities = {"a": 0.9, "b": 0.3, "c": 0.6}
    bits = fit_to_budget({"a": 2, "b": 2, "c": 2}, LAYERS, priorities, budget=2.5)
    # b (lowest priority) takes a bit; c would exceed; a takes one, and another next turn.
    assert bits == {"a": 4, "b": 3, "c": 2}
    assert avg(bits) <= 2.5
    # No single further bit fits.
    assert all(avg(bits | {n: bits[n] + 1}) > 2.5 for n in bits)


def test_allocation_respects_the_1_and_8_bit_limits():
    priorities = {"a": 0.1, "b": 0.3, "c": 0.6}
    assert fit_to_budget({"a": 1, "b": 1, "c": 1}, LAYERS, priorities, 8.0) == dict.fromkeys(
        "abc", 8
    )
    assert fit_to_budget({"a": 8, "b": 8, "c": 8}, LAYERS, priorities, 1.0) == dict.fromkeys(
        "abc", 1
    )
    assert fit_to_budget({"a": 9, "b": 0, "c": 4}, LAYERS, priorities, 4.0)["a"] <= 8


def test_policy_moves_from_the_clients_mean_bits_to_each_budget():
    policy = make_policy("fedmpq")
    policy.setup(LAYERS)
    clients = [ClientInfo("lo", PROFILE, 10, 2.0), ClientInfo("hi", PROFILE, 10, 8.0)]
    first = policy.allocate(1, clients)
    assert first["lo"].bits == dict.fromkeys("abc", 2)
    assert first["hi"].bits == dict.fromkeys("abc", 8)
    policy.observe(
        1,
        [
            ClientResult("lo", 10, {"a": 2, "b": 2, "c": 1}, {"c": 1}, {}),
            ClientResult("hi", 10, {"a": 8, "b": 8, "c": 7}, {"c": 1}, {}),
        ],
    )
    second = policy.allocate(2, [*clients, ClientInfo("mid", PROFILE, 10, 4.0)])
    # c (largest, most dropped) is cut first; the 4-bit client starts from (5, 5, 4).
    assert second["mid"].average_bits(LAYERS) <= 4.0
    assert second["mid"].bits["c"] < second["mid"].bits["a"]
    assert second["hi"].average_bits(LAYERS) == pytest.approx(8.0)
    assert second["lo"].average_bits(LAYERS) <= 2.0


@settings(max_examples=40, deadline=None)
@given(
    # Scales below ~1e-30 make the step s / M subnormal (see fedmpq.quant); keep clear.
    arrays(
        np.float32,
        (4, 6),
        elements=st.just(0.0)
        | st.floats(2**-20, 3.0, width=32)
        | st.floats(-3.0, -(2**-20), width=32),
    ),
    st.integers(2, 8),
    st.sampled_from([-1, 0]),
)
def test_bit_planes_stand_for_the_symmetric_quantization(w, bits, axis):
    expected = dequantize(quantize(w, bits, axis=axis))
    layer = to_planes(w, bits, axis)
    np.testing.assert_array_equal(layer.weight(), expected)
    planes = plane_bits(layer.magnitude, layer.planes)
    powers = (1 << np.arange(layer.planes)).reshape(-1, 1, 1)
    np.testing.assert_array_equal((planes * powers).sum(0), layer.magnitude)
    # The trainable parametrization starts at the same quantized weight.
    module = BitPlaneWeight(w, bits, axis)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(w)).numpy(), expected, atol=1e-6)
    restored = module.to_layer()
    np.testing.assert_array_equal(restored.magnitude, layer.magnitude)


def test_empty_msb_is_dropped_without_changing_the_weights():
    magnitude = np.array([[1, 2, 3, 0], [2, 3, 1, 1]])  # 3 planes, MSB (4) never set
    layer = PlaneLayer(magnitude, magnitude == 2, np.full((1, 1), 0.5, np.float32), 3)
    kept = drop_planes(layer)
    assert kept.planes == 2
    np.testing.assert_array_equal(kept.weight(), layer.weight())
    # The wire scale s' = unit * M' shrinks with the levels.
    assert float(kept.unit[0, 0]) * 3 < float(layer.unit[0, 0]) * 7


def test_sparse_lsb_is_dropped_with_the_step_doubled():
    magnitude = np.full((10, 10), 6)
    magnitude[0, 0] = 7  # 1% of the least significant bits set
    layer = PlaneLayer(magnitude, np.zeros((10, 10), bool), np.full((1, 1), 0.1, np.float32), 3)
    kept = drop_planes(layer)
    assert kept.planes == 2
    assert float(kept.unit[0, 0]) == pytest.approx(0.2)
    change = np.abs(kept.weight() - layer.weight())
    assert change.max() <= 0.1 + 1e-6  # at most one old step, where the dropped bit was set
    assert np.count_nonzero(change) == 1


def test_dense_planes_and_the_last_plane_are_kept():
    magnitude = np.array([[1, 0], [1, 1]])
    layer = PlaneLayer(magnitude, np.zeros((2, 2), bool), np.ones((1, 1), np.float32), 1)
    assert drop_planes(layer).planes == 1
    dense = PlaneLayer(
        np.array([[5, 6, 7, 4]]), np.zeros((1, 4), bool), np.ones((1, 1), np.float32), 3
    )
    assert drop_planes(dense).planes == 3


def test_group_lasso_has_a_gradient_on_every_plane():
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28))
    bits = dict.fromkeys(quantizable_layers(model), 4)
    hooks = FedMPQHooks(bits, "symmetric", True, {"lambda": 1e-3})
    hooks.attach(model)
    try:
        penalty = hooks.penalty(model)
        assert penalty is not None and float(penalty.detach()) > 0
        penalty.backward()
        for _, planes in hooks._planes.values():
            grad = planes.positive.grad + planes.negative.grad
            assert grad.reshape(planes.planes, -1).abs().sum(1).gt(0).all()
    finally:
        hooks.detach(model)
    assert set(dict(model.named_parameters())) >= set(bits)


def test_client_reports_dropped_planes_and_sends_fewer_bits():
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28))
    name = quantizable_layers(model)[0]
    with torch.no_grad():
        weight = model.get_submodule(name.rpartition(".")[0]).weight
        weight.mul_(0.0).add_(0.01)  # every magnitude is far below the scale's top plane...
        weight[0, 0] = 1.0  # ...but one
    bits = dict.fromkeys(quantizable_layers(model), 6)
    hooks = FedMPQHooks(bits, "symmetric", False, {"lambda": 0.0})
    state = {n: p.detach().numpy().copy() for n, p in model.state_dict().items()}
    hooks.attach(model)
    hooks.detach(model)
    local = {n: p.detach().numpy().copy() for n, p in model.state_dict().items()}
    tensors, dropped = hooks.make_update(local, state, "weights")
    sent = {p.name: p.bits for p in tensors}
    assert dropped[name] > 0
    assert sent[name] == 6 - dropped[name]


def test_weights_that_outgrow_the_scale_are_requantized_with_a_larger_scale():
    w = np.array([[0.5, -1.0, 0.25, 0.0]], np.float32)
    module = BitPlaneWeight(w, 3, -1)  # 2 planes, M = 3, unit = 1/3
    with torch.no_grad():
        module.positive[:, 0, 0] = 2.0  # level 6 = 2M: the weight doubled past the scale
    layer = module.to_layer()
    assert layer.magnitude.max() == 3  # back to M levels...
    assert float(layer.unit.max()) == pytest.approx(2 / 3)  # ...with the scale doubled
    np.testing.assert_allclose(layer.weight()[0, 0], 2.0, rtol=1e-6)


def test_only_the_planes_of_a_weights_sign_move():
    w = np.array([[0.9, -0.9]], np.float32)
    module = BitPlaneWeight(w, 4, -1)
    out = module(torch.from_numpy(w)).sum()
    out.backward()
    module.precondition_()
    assert float(module.negative.grad[:, 0, 0].abs().sum()) == 0.0  # positive weight
    assert float(module.positive.grad[:, 0, 1].abs().sum()) == 0.0  # negative weight
    assert float(module.positive.grad[:, 0, 0].abs().sum()) > 0.0
