"""FedMPQ: allocation order, bit-plane form and pruning rules, lasso, and fixed-QAT equality."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_client.task import execute_task
from fedmpq.bitplanes import (
    PlaneLayer,
    drop_planes,
    plane_bits,
    plane_lasso_grad,
    planes_on_grid,
    to_planes,
)
from fedmpq.errors import ConfigError
from fedmpq.models import build_model, quantizable_layers
from fedmpq.policies import ClientResult, LayerInfo, make_policy
from fedmpq.policies.base import ClientInfo
from fedmpq.policies.fedmpq import (
    FedMPQHooks,
    GridFakeQuantize,
    fit_to_budget,
    layer_priorities,
    without_radial,
)
from fedmpq.quant import dequantize, quantize
from fedmpq.state import state_to_numpy
from fedmpq.wire.messages import DeviceProfile, TaskMessage
from fedmpq.wire.tensors import decode_tensor

LAYERS = [LayerInfo("a", 100), LayerInfo("b", 300), LayerInfo("c", 600)]
PROFILE = DeviceProfile(2**30, 2**29, 4, 1500.0, 0.1, 10.0, "linux", "aarch64")


def avg(bits):
    return sum(bits[layer.name] * layer.numel for layer in LAYERS) / 1000


def test_priorities_weigh_size_by_rounded_mean_dropped_plus_one():
    p = layer_priorities(LAYERS, {"a": 2.0, "b": 0.4, "c": 0.0})
    assert p == pytest.approx({"a": 0.1 * 3, "b": 0.3 * 1, "c": 0.6 * 1})


def test_over_budget_empties_the_highest_priority_layer_before_the_next():
    priorities = {"a": 0.9, "b": 0.3, "c": 0.6}
    bits = fit_to_budget({"a": 6, "b": 6, "c": 6}, LAYERS, priorities, budget=5.5)
    # a goes down to the floor (2) first, still 5.6; then c loses one (5.0); the
    # growing pass then fills b (lowest priority) to 7 and a back up to 4: exactly 5.5.
    assert bits == {"a": 4, "b": 7, "c": 5}
    assert avg(bits) == pytest.approx(5.5)


def test_under_budget_fills_the_lowest_priority_layer_first_and_never_overshoots():
    priorities = {"a": 0.9, "b": 0.3, "c": 0.6}
    bits = fit_to_budget({"a": 2, "b": 2, "c": 2}, LAYERS, priorities, budget=3.5)
    # b takes bits up to 8 would be 3.8: it takes 5 (2.9 + 0.3 = 3.2 -> 3.5 at b=7);
    assert bits == {"a": 2, "b": 7, "c": 2}
    assert avg(bits) <= 3.5
    assert all(avg(bits | {n: bits[n] + 1}) > 3.5 for n in bits if bits[n] < 8)


def test_allocation_respects_the_floor_and_8_bits():
    priorities = {"a": 0.1, "b": 0.3, "c": 0.6}
    assert fit_to_budget(dict.fromkeys("abc", 2), LAYERS, priorities, 8.0) == dict.fromkeys(
        "abc", 8
    )
    assert fit_to_budget(dict.fromkeys("abc", 8), LAYERS, priorities, 1.0) == dict.fromkeys(
        "abc", 2
    )
    assert fit_to_budget({"a": 9, "b": 0, "c": 4}, LAYERS, priorities, 4.0)["a"] <= 8


def test_policy_moves_from_the_weighted_mean_bits_to_each_budget():
    policy = make_policy("fedmpq", fleet_budgets=())
    policy.setup(LAYERS)
    clients = [ClientInfo("lo", PROFILE, 10, 3.0), ClientInfo("hi", PROFILE, 10, 8.0)]
    first = policy.allocate(1, clients)
    assert first["lo"].bits == dict.fromkeys("abc", 3)
    assert first["hi"].bits == dict.fromkeys("abc", 8)
    policy.observe(
        1,
        [
            ClientResult("lo", 10, {"a": 3, "b": 3, "c": 2}, {"c": 1}, {}),
            ClientResult("hi", 10, {"a": 8, "b": 8, "c": 7}, {"c": 1}, {}),
        ],
    )
    # Weighted by samples x budget: (3 * 3 + 8 * 8) / 11 = 6.6 -> a, b start at 7, c at 6.
    assert policy.mean_bits["a"] == pytest.approx(73 / 11)
    second = policy.allocate(2, [*clients, ClientInfo("mid", PROFILE, 10, 5.0)])
    # c (largest, most dropped) is cut first, and cut to the floor.
    assert second["mid"].average_bits(LAYERS) <= 5.0
    assert second["mid"].bits["c"] < second["mid"].bits["a"]
    assert second["hi"].average_bits(LAYERS) == pytest.approx(8.0)
    assert second["lo"].average_bits(LAYERS) <= 3.0


def test_reallocation_keeps_two_planes_unless_the_budget_is_lower():
    policy = make_policy("fedmpq", fleet_budgets=())
    policy.setup(LAYERS)
    clients = [ClientInfo("lo", PROFILE, 10, 3.0), ClientInfo("two", PROFILE, 10, 2.0)]
    policy.allocate(1, [*clients, ClientInfo("hi", PROFILE, 10, 8.0)])
    # c dropped planes everywhere: it has the top priority to lose bits.
    policy.observe(
        1,
        [
            ClientResult("lo", 10, {"a": 3, "b": 3, "c": 2}, {"c": 1}, {}),
            ClientResult("hi", 10, {"a": 8, "b": 8, "c": 6}, {"c": 2}, {}),
        ],
    )
    second = policy.allocate(2, clients)
    assert min(second["lo"].bits.values()) == 3  # the default floor, two planes
    assert second["two"].bits == dict.fromkeys("abc", 2)  # a 2-bit budget: one plane
    official = make_policy("fedmpq", fleet_budgets=(), min_bits=2)
    official.setup(LAYERS)
    official.load_state_dict(policy.state_dict())
    cut = official.allocate(2, clients[:1])["lo"].bits
    assert cut["c"] == 2 and cut["a"] > 3  # the official floor: c to one plane, a grows
    with pytest.raises(ConfigError, match="min_bits"):
        make_policy("fedmpq", min_bits=1)


def test_default_fleet_spreads_identical_devices_over_mixed_budgets():
    policy = make_policy("fedmpq")
    policy.setup(LAYERS)
    clients = [ClientInfo(f"d{i}", PROFILE, 10, 8.0) for i in range(4)]
    allocation = policy.allocate(1, clients)
    averages = sorted(a.average_bits(LAYERS) for a in allocation.values())
    assert averages == [3.0, 3.0, 5.0, 5.0]
    # A device's own (profile) budget still caps it.
    weak = policy.allocate(2, [ClientInfo("d3", PROFILE, 10, 2.0)])
    assert weak["d3"].average_bits(LAYERS) <= 2.0


def test_paper_budgets_count_magnitude_planes():
    policy = make_policy("fedmpq", budget_units="paper", fleet_budgets=())
    policy.setup(LAYERS)
    allocation = policy.allocate(
        1, [ClientInfo("a", PROFILE, 10, 2.0), ClientInfo("b", PROFILE, 10, 8.0)]
    )
    assert allocation["a"].bits == dict.fromkeys("abc", 3)  # 2 planes + sign
    assert allocation["b"].bits == dict.fromkeys("abc", 8)  # 8 planes capped at 8 wire bits


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
    st.sampled_from(["minmax", "mse"]),
)
def test_bit_planes_and_their_payload_stand_for_the_symmetric_quantization(w, bits, axis, obs):
    expected = dequantize(quantize(w, bits, axis=axis, observer=obs))
    layer = to_planes(w, bits, axis, obs)
    np.testing.assert_allclose(layer.weight(), expected, rtol=1e-6, atol=1e-30)
    planes = plane_bits(layer.magnitude, layer.planes)
    powers = (1 << np.arange(layer.planes)).reshape(-1, 1, 1)
    np.testing.assert_array_equal((planes * powers).sum(0), layer.magnitude)
    np.testing.assert_allclose(decode_tensor(layer.payload("w", axis)), expected, rtol=1e-6)


def _layer(magnitude, planes, unit=0.1):
    magnitude = np.asarray(magnitude)
    return PlaneLayer(
        magnitude, np.zeros(magnitude.shape, bool), np.full((1, 1), unit, np.float32), planes
    )


def test_empty_top_plane_is_dropped_without_changing_the_weights():
    layer = _layer([[1, 2, 3, 0], [2, 3, 1, 1]], 3)  # the 4s plane is never set
    kept = drop_planes(layer)
    assert kept.planes == 2
    np.testing.assert_array_equal(kept.weight(), layer.weight())


def test_sparse_top_plane_is_merged_by_clipping_to_the_new_top():
    magnitude = np.full((10, 10), 3)
    magnitude[0, 0] = 7  # 1% of the 4s plane set: under 2%
    kept = drop_planes(_layer(magnitude, 3))
    assert kept.planes == 2
    assert int(kept.magnitude.max()) == 3  # clipped to M' = 3, step unchanged
    assert float(kept.unit[0, 0]) == pytest.approx(0.1)
    dense = np.full((10, 10), 3)
    dense[0, :3] = 7  # 3%: stays
    assert drop_planes(_layer(dense, 3)).planes == 3
    assert drop_planes(_layer(magnitude, 3), msb_density=0.0).planes == 3  # empty-only rule


def test_sparse_bottom_plane_is_dropped_with_the_step_doubled():
    magnitude = np.full((10, 10), 6)
    magnitude[0, 0] = 7  # 1% of the least significant bits set
    kept = drop_planes(_layer(magnitude, 3))
    assert kept.planes == 2
    assert float(kept.unit[0, 0]) == pytest.approx(0.2)
    change = np.abs(kept.weight() - _layer(magnitude, 3).weight())
    assert change.max() <= 0.1 + 1e-6 and np.count_nonzero(change) == 1


def test_dense_planes_and_the_last_plane_are_kept():
    assert drop_planes(_layer([[1, 0], [1, 1]], 1)).planes == 1
    assert drop_planes(_layer([[5, 6, 7, 4]], 3)).planes == 3


def test_lasso_gradient_is_the_preconditioned_plane_gradient_in_weight_space():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 30)).astype(np.float32)
    for axis in (-1, 0):
        layer = to_planes(w, 4, axis)
        planes = torch.tensor(
            plane_bits(layer.magnitude, 3), dtype=torch.float64, requires_grad=True
        )
        norms = torch.sqrt((planes.reshape(3, -1) ** 2).sum(1) + 1e-8)
        norms.sum().backward()
        unit = torch.from_numpy(layer.unit).double()
        sign = torch.from_numpy(np.where(layer.negative, -1.0, 1.0) * (layer.magnitude > 0))
        powers = 2.0 ** torch.arange(3, dtype=torch.float64).reshape(-1, 1, 1)
        # A plane step of -lr * pre * dP moves w by sign * unit * sum_k 2**k * (that step).
        pre = 1.0 / (unit**2 * 21.0)
        expected = sign * unit * (powers * planes.grad).sum(0) * pre
        got = plane_lasso_grad(torch.from_numpy(layer.weight()), 3, axis)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float32, (5, 12), elements=st.floats(-4.0, 4.0, width=32)),
    st.integers(2, 8),
    st.sampled_from([-1, 0]),
)
def test_lasso_gradient_per_plane_sums_match_the_magnitude_table(w, bits, axis):
    layer = to_planes(w, bits, axis)
    planes = bits - 1
    per_plane = plane_bits(layer.magnitude, planes).astype(np.float64)
    norms = np.sqrt(per_plane.reshape(planes, -1).sum(1) + 1e-8)
    weights = (2.0 ** np.arange(planes) / norms).reshape((planes,) + (1,) * w.ndim)
    sign = np.where(layer.negative, -1.0, 1.0) * (layer.magnitude > 0)
    unit = np.where(layer.unit > 0, layer.unit, np.inf)
    expected = sign * (weights * per_plane).sum(0) / (unit * sum(4**k for k in range(planes)))
    got = plane_lasso_grad(torch.from_numpy(layer.weight()), planes, axis)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-7)


def _task(policy, bits, options):
    return TaskMessage(
        run_id="r",
        round=1,
        client_id="c",
        model_name="cnn",
        model_fingerprint="f",
        policy=policy,
        bits=bits,
        scheme="symmetric",
        per_channel=True,
        epochs=1,
        batch_size=16,
        learning_rate=0.05,
        deadline_s=60.0,
        compress=False,
        options=options,
        observer="mse",
    )


def _seeded_client(model, wire_bits):
    """A seeded model, its start state, ``wire_bits`` on every layer and a random batch."""
    torch.manual_seed(0)
    net = build_model(model, 10, (1, 28, 28))
    bits = dict.fromkeys(quantizable_layers(net), wire_bits)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    return net, state_to_numpy(net), bits, x, y


def test_lambda_zero_and_frozen_is_fixed_qat_bit_for_bit():
    net, start, bits, x, y = _seeded_client("cnn", 3)
    frozen = make_policy("fedmpq", lam=0.0, frozen=True).client_options()
    sent = {}
    for policy, options in (("fixed", {}), ("fedmpq", frozen)):
        update, _ = execute_task(_task(policy, bits, options), net, start, x, y, seed=7)
        sent[policy] = (
            [(p.name, p.bits, p.axis, p.scale, p.data) for p in update.tensors],
            update.bits_dropped,
            {k: v for k, v in update.metrics.items() if "loss" in k or "acc" in k},
        )
        sent[policy + "-state"] = state_to_numpy(net)
    assert sent["fixed"][0] and sent["fixed"] == sent["fedmpq"]
    for name, w in sent["fixed-state"].items():
        np.testing.assert_array_equal(w, sent["fedmpq-state"][name])


def test_lasso_shrinks_sparse_planes_and_the_client_reports_drops():
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28))
    bits = dict.fromkeys(quantizable_layers(model), 6)
    hooks = FedMPQHooks(bits, "symmetric", True, {"lambda": 1e-2})
    hooks.attach(model)
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 1, 28, 28))
        for param in model.parameters():
            param.grad = torch.zeros_like(param)  # lasso only
        before = {n: p.detach().abs().sum().item() for n, (p, _) in hooks._planes.items()}
        hooks.step(model, optimizer)
        after = {n: p.detach().abs().sum().item() for n, (p, _) in hooks._planes.items()}
    finally:
        hooks.detach(model)
    assert all(after[n] < before[n] for n in before)
    name = quantizable_layers(model)[0]
    with torch.no_grad():
        weight = model.get_submodule(name.rpartition(".")[0]).weight
        weight.mul_(0.0).add_(0.01)  # every magnitude far below the scale's top plane...
        weight[0, 0] = 1.0  # ...but one: a 0.0006% top plane
    local = state_to_numpy(model)
    per_tensor = FedMPQHooks(bits, "symmetric", False, {"lambda": 1e-2})  # one scale: max|w|
    tensors, dropped = per_tensor.make_update(local, local, "weights")
    sent = {p.name: p for p in tensors}
    assert dropped[name] > 0
    assert sent[name].bits == 6 - dropped[name]
    assert [p.name for p in tensors] == list(local)


def test_held_grid_forward_and_plane_cut_agree_bit_for_bit_and_saturate():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 5)).astype(np.float32)
    for axis in (-1, 0):
        unit = to_planes(w, 4, axis).unit * np.float32(0.5)  # a grid half as wide: clipping
        fq = GridFakeQuantize(4, axis, torch.from_numpy(unit))
        forward = fq(torch.from_numpy(w)).numpy()
        layer = planes_on_grid(w, unit, 4)
        np.testing.assert_array_equal(forward, layer.weight())
        assert layer.magnitude.max() == 7  # saturated at M, not re-fitted
        assert (np.abs(forward) <= 7 * unit + 1e-7).all()
    zero = planes_on_grid(np.ones((2, 2), np.float32), np.zeros((1, 1), np.float32), 3)
    assert not zero.magnitude.any()


def test_lasso_gradient_on_a_held_grid_uses_that_grid():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 30)).astype(np.float32)
    layer = to_planes(w, 4, -1)
    fitted = plane_lasso_grad(torch.from_numpy(layer.weight()), 3, -1)
    given_unit = plane_lasso_grad(
        torch.from_numpy(layer.weight()), 3, -1, torch.from_numpy(layer.unit)
    )
    torch.testing.assert_close(given_unit, fitted)
    # The same weights on a grid twice as fine: levels double, the step halves.
    finer = torch.from_numpy(layer.unit / np.float32(2))
    assert not torch.equal(plane_lasso_grad(torch.from_numpy(layer.weight()), 3, -1, finer), fitted)


def test_round_scale_holds_the_start_grid_while_the_lasso_acts():
    net, start, bits, x, y = _seeded_client("mlp", 5)
    options = make_policy("fedmpq", lam=0.5, frozen=True, round_scale=True).client_options()
    task = _task("fedmpq", bits, options)
    task = dataclasses.replace(task, model_name="mlp", per_channel=False, observer="minmax")
    update, _ = execute_task(task, net, start, x, y, seed=3)
    trained = state_to_numpy(net)
    for payload in update.tensors:
        if payload.name not in bits:
            continue
        held = np.frombuffer(payload.scale, "<f4")
        start_scale = to_planes(start[payload.name], 5, -1).unit.reshape(-1) * np.float32(15)
        np.testing.assert_allclose(held, start_scale, rtol=1e-6)
        assert np.abs(trained[payload.name]).max() != pytest.approx(float(held[0]), rel=1e-6)
        np.testing.assert_array_equal(
            decode_tensor(payload), planes_on_grid(trained[payload.name], held / 15, 5).weight()
        )


def test_keep_norm_takes_the_lasso_step_without_shrinking_the_layer():
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.normal(size=(8, 20)).astype(np.float32))
    layer = to_planes(w.numpy(), 5, -1)
    grad = plane_lasso_grad(torch.from_numpy(layer.weight()), 4, -1, torch.from_numpy(layer.unit))
    assert float((grad * w).sum()) > 0  # the plain lasso step shrinks w...
    tangent = without_radial(grad, w)
    assert abs(float((tangent * w).sum())) < 1e-4 * float(grad.norm() * w.norm())  # ...this not
    assert float((tangent * grad).sum()) > 0  # and still pushes the way the lasso does
    assert torch.equal(without_radial(grad, torch.zeros_like(w)), grad)
    assert make_policy("fedmpq", keep_norm=True).client_options()["keep_norm"] == 1.0
