"""Tests for fedmpq.fake_quant: forward equals the numpy quantizer, STE gradients, and
attaching to / detaching from a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from fedmpq.errors import ConfigError
from fedmpq.fake_quant import FakeQuantize, attach_fake_quant, detach_fake_quant, fake_quantize
from fedmpq.quant import QuantizationError, dequantize, quantize
from fedmpq.quant_spec import SCHEME_AFFINE, SCHEME_SYMMETRIC

SCHEMES = (SCHEME_SYMMETRIC, SCHEME_AFFINE)


def numpy_path(w: torch.Tensor, bits: int, scheme: str, axis: int) -> torch.Tensor:
    q = quantize(w.detach().to(torch.float32).numpy(), bits, scheme, axis=axis)
    return torch.from_numpy(dequantize(q))


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


# --- fake_quantize -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_forward_equals_numpy_quantizer(bits: int, scheme: str, axis: int):
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(bits))
    out = fake_quantize(w, bits, scheme, axis)
    assert out.dtype == torch.float32 and out.shape == w.shape
    # Bit-for-bit: the forward pass is the numpy quantizer itself.
    assert torch.equal(out, numpy_path(w, bits, scheme, axis))
    assert not torch.equal(out, w)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        elements=st.floats(-100, 100, width=32),
    ),
    st.integers(1, 8),
    st.sampled_from(SCHEMES),
)
def test_forward_equals_numpy_quantizer_on_arbitrary_tensors(
    w_np: np.ndarray, bits: int, scheme: str
):
    w = torch.from_numpy(w_np.copy())
    for axis in (-1, 0):
        assert torch.equal(fake_quantize(w, bits, scheme, axis), numpy_path(w, bits, scheme, axis))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_gradient_is_straight_through(bits: int, scheme: str, axis: int):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 7, generator=gen)
    w[2, 3] = 10.0  # the element that sets the scale gets no extra gradient either
    w.requires_grad_(True)
    upstream = torch.randn(4, 7, generator=gen)
    fake_quantize(w, bits, scheme, axis).backward(upstream)
    assert w.grad is not None
    assert torch.equal(w.grad, upstream)


def test_gradient_flows_through_a_loss():
    w = torch.tensor([0.3, -0.8, 0.05], requires_grad=True)
    (fake_quantize(w, 3) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert w.grad is not None
    assert w.grad.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("bits", [16, 32])
def test_float_bits_are_identity(bits: int):
    w = torch.randn(3, 3, requires_grad=True)
    assert fake_quantize(w, bits) is w
    assert FakeQuantize(bits)(w) is w


def test_dtype_is_preserved():
    w = torch.randn(5, 4, dtype=torch.float64)
    out = fake_quantize(w, 4, SCHEME_AFFINE, 0)
    assert out.dtype == torch.float64
    assert torch.equal(out.float(), numpy_path(w, 4, SCHEME_AFFINE, 0))


def test_invalid_arguments_raise():
    with pytest.raises(QuantizationError, match="bits"):
        FakeQuantize(12)
    with pytest.raises(QuantizationError, match="scheme"):
        FakeQuantize(4, "float")
    with pytest.raises(QuantizationError, match="axis"):
        fake_quantize(torch.ones(3), 4, axis=1)
    with pytest.raises(QuantizationError, match="NaN"):
        fake_quantize(torch.tensor([1.0, float("nan")]), 4)


def test_fake_quantize_module_repr_and_forward():
    module = FakeQuantize(3, SCHEME_AFFINE, 0)
    assert "bits=3, scheme=affine, axis=0" in repr(module)
    w = torch.randn(4, 4)
    assert torch.equal(module(w), numpy_path(w, 3, SCHEME_AFFINE, 0))


# --- attach / detach ---------------------------------------------------------------------


def test_attach_quantizes_weights_per_channel_and_renames_parameters():
    model = tiny_model()
    latent = model[0].weight.detach().clone()
    attach_fake_quant(model, {"0.weight": 4, "3.weight": 32})
    assert torch.equal(model[0].weight, numpy_path(latent, 4, SCHEME_SYMMETRIC, 0))
    # 32 bits: registered but the identity.
    assert torch.equal(model[3].weight, model[3].parametrizations.weight.original)
    names = {name for name, _ in model.named_parameters()}
    assert names == {
        "0.parametrizations.weight.original",
        "0.bias",
        "3.parametrizations.weight.original",
        "3.bias",
    }


def test_attach_rejects_unknown_names_listing_known_ones_and_attaches_nothing():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"'0\.wieght'.*'0\.weight'"):
        attach_fake_quant(model, {"0.weight": 4, "0.wieght": 4})
    with pytest.raises(ConfigError, match="not a parameter"):
        attach_fake_quant(model, {"7.weight": 4})
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())


def test_attach_rejects_invalid_bits_and_attaches_nothing():
    model = tiny_model()
    with pytest.raises(QuantizationError):
        attach_fake_quant(model, {"0.weight": 4, "3.weight": 0})
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())


def test_attach_twice_is_rejected():
    model = tiny_model()
    attach_fake_quant(model, {"0.weight": 4})
    with pytest.raises(ConfigError, match="detach_fake_quant first"):
        attach_fake_quant(model, {"0.weight": 4})
    detach_fake_quant(model)
    attach_fake_quant(model, {"0.weight": 2})
    assert isinstance(model[0].parametrizations.weight[0], FakeQuantize)


def test_detach_on_a_plain_model_changes_nothing():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detach_fake_quant(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_through_ste_reduces_loss_and_detach_keeps_latent_weights():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    plain_keys = list(model.state_dict())
    attach_fake_quant(model, {"0.weight": 4, "3.weight": 4})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.8 * initial

    quantized_weight = model[0].weight.detach().clone()
    detach_fake_quant(model)
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())
    # The latent float weights stay (they are off the 4-bit grid) under the plain names.
    assert not torch.equal(model[0].weight, quantized_weight)
    assert torch.equal(numpy_path(model[0].weight, 4, SCHEME_SYMMETRIC, 0), quantized_weight)
    state = model.state_dict()
    assert sorted(state) == sorted(plain_keys)

    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_mse_observer_forward_equals_numpy_quantizer(bits: int):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits))
    out = FakeQuantize(bits, SCHEME_SYMMETRIC, axis=0, observer="mse")(w)
    expected = dequantize(quantize(w.numpy(), bits, SCHEME_SYMMETRIC, axis=0, observer="mse"))
    np.testing.assert_array_equal(out.numpy(), expected)
    minmax = FakeQuantize(bits, SCHEME_SYMMETRIC, axis=0)(w)
    assert float(((out - w) ** 2).sum()) <= float(((minmax - w) ** 2).sum()) + 1e-6
