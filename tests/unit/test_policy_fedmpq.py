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


def test_group_lasso_gradient_is_the_plane_norms_gradient():
    rng = np.random.default_rng(0)
    module = BitPlaneWeight(rng.normal(size=(4, 6)).astype(np.float32), 4, 0)
    (0.3 * module.plane_norms().sum()).backward()
    expected = (module.positive.grad.clone(), module.negative.grad.clone())
    module.positive.grad, module.negative.grad = None, None
    module.add_lasso_grad_(0.3)
    torch.testing.assert_close(module.positive.grad, expected[0])
    torch.testing.assert_close(module.negative.grad, expected[1])
    grad = module.positive.grad + module.negative.grad
    assert grad.reshape(module.planes, -1).abs().sum(1).gt(0).all()  # every plane


def test_client_step_adds_the_lasso_after_preconditioning():
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28))
    bits = dict.fromkeys(quantizable_layers(model), 4)
    hooks = FedMPQHooks(bits, "symmetric", True, {"lambda": 1e-3})
    hooks.attach(model)
    try:
        assert hooks.penalty(model) is None  # the lasso is applied in step(), not via autograd
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        before = {
            n: (p.positive.detach().clone(), p.plane_norms().detach())
            for n, (_, p) in hooks._planes.items()
        }
        for param in model.parameters():
            param.grad = torch.zeros_like(param)  # no cross-entropy gradient
        hooks.step(model, optimizer)
        for name, (_, planes) in hooks._planes.items():
            start, norms = before[name]
            shape = (-1,) + (1,) * (start.dim() - 1)
            expected = start - 1e-3 * hooks._coef[name] * start / norms.reshape(shape)
            torch.testing.assert_close(planes.positive.detach(), expected.clamp(0, 2))
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
    trained = np.array([[2.0, -1.0, 1 / 3, 0.0]], np.float32)  # levels 6, -3, 1, 0
    assert layer.magnitude.max() == 3  # back to M levels...
    assert float(layer.unit.max()) > 1 / 3  # ...with a larger scale...
    stretched = np.rint(np.array([6, -3, 1, 0]) / 2) * (2 / 3)  # the grid stretched to 2.0
    error = float(np.square(layer.weight() - trained).sum())
    assert error <= float(np.square(stretched - trained).sum())  # ...and no worse a fit


def test_a_grown_one_plane_layer_keeps_its_level_one_weights():
    # 2 wire bits: one plane, M = 1.  One weight grows to level 2; stretching the grid
    # to it would round every level-1 weight (0.5 of the new step) to zero.
    w = np.array([[1.0, 1.0, -1.0, 1.0, 0.0, 1.0]], np.float32)
    module = BitPlaneWeight(w, 2, -1)
    with torch.no_grad():
        module.positive[0, 0, 0] = 2.0
    layer = module.to_layer()
    assert layer.magnitude.max() == 1
    assert int(np.count_nonzero(layer.magnitude)) == 5
    assert float(layer.unit.max()) < 2.0  # not the grid stretched to the peak


def test_only_the_planes_of_a_weights_sign_move():
    w = np.array([[0.9, -0.9]], np.float32)
    module = BitPlaneWeight(w, 4, -1)
    out = module(torch.from_numpy(w)).sum()
    out.backward()
    module.precondition_()
    assert float(module.negative.grad[:, 0, 0].abs().sum()) == 0.0  # positive weight
    assert float(module.positive.grad[:, 0, 1].abs().sum()) == 0.0  # negative weight
    assert float(module.positive.grad[:, 0, 0].abs().sum()) > 0.0


def test_clipping_a_plane_moves_its_share_onto_planes_with_room():
    module = BitPlaneWeight(np.array([[0.5, 0.5]], np.float32), 4, -1)  # 3 planes
    with torch.no_grad():
        # Planes (LSB first) after a step: level 10 with the MSB at 2.5, and level -1
        # with the MSB at -0.5.
        module.positive.copy_(torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]], [[2.5, -0.5]]]))
    module.clip_()
    assert float(module.positive.min()) >= 0.0 and float(module.positive.max()) <= 2.0
    levels = (module.positive * module.powers).sum(0)
    # 10 is reachable within [0, 2] per plane (LSB 2, MSB 2); -1 is not, 0 is closest.
    torch.testing.assert_close(levels, torch.tensor([[10.0, 0.0]]))


def test_the_loss_sees_the_weights_that_will_be_sent():
    w = np.random.default_rng(3).standard_normal((4, 30)).astype(np.float32)
    for bits in (2, 4):
        module = BitPlaneWeight(w, bits, 0)
        with torch.no_grad():
            module.positive.mul_(1.6)  # grow every positive weight past M on most slices
        forward = module(torch.from_numpy(w)).detach().numpy()
        np.testing.assert_allclose(forward, module.to_layer().weight(), rtol=1e-6)


def test_weights_beyond_a_clipped_scale_start_above_m():
    w = np.array([[0.1, -0.2, 0.15, 0.12, -0.18, 0.2, 1.0]], np.float32)  # one outlier
    module = BitPlaneWeight(w, 3, -1, observer="mse")  # M = 3; the scale clips the outlier
    levels = (module.positive - module.negative) * module.powers
    start = levels.sum(0).detach().numpy()[0]
    assert 3.0 < start[-1] <= 6.0  # the outlier starts beyond M, up to 2M
    unit = float(module.unit.reshape(-1)[0])
    np.testing.assert_allclose(start * unit, w[0], rtol=1e-5)  # every weight exactly
