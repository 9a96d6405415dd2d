"""Tests for fedmpq.quant: exact definitions, error bounds, stochastic rounding, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmpq.quant import (
    QuantizationError,
    QuantizedTensor,
    Rounding,
    dequantize,
    quant_step,
    quantize,
    symmetric_to_signed,
)
from fedmpq.quant_scales import grid_units
from fedmpq.quant_spec import OBSERVER_MINMAX, OBSERVER_MSE, SCHEME_AFFINE, SCHEME_SYMMETRIC

SCHEMES = (SCHEME_SYMMETRIC, SCHEME_AFFINE)
OBSERVER_CHOICES = (OBSERVER_MINMAX, OBSERVER_MSE)
BITS = st.integers(min_value=1, max_value=8)
# Magnitudes stay clear of float32's subnormal range, where the grid itself cannot be
# represented to the bound's tolerance (see the module docstring).
TINY = float(np.float32(1e-30))
VALUES = st.one_of(
    st.just(0.0),
    st.floats(min_value=TINY, max_value=1e6, width=32),
    st.floats(min_value=-1e6, max_value=-TINY, width=32),
)
REL_TOL = 1e-6
#: Per slice the step is rounded down to a grid of powers of 2**(1/16): the weights above
#: the narrowed range (by at most this fraction of it) saturate.
GRID_CLIP = 2 ** (1 / 16) - 1 + 1e-4


@st.composite
def tensors_and_axis(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    w = draw(hnp.arrays(np.float32, shape, elements=VALUES))
    axis = draw(st.sampled_from([-1, *range(len(shape))]))
    return w, axis


def per_element(q: QuantizedTensor, values: np.ndarray) -> np.ndarray:
    """Broadcast one value per scale to the codes' shape (float64)."""
    shape = [1] * q.codes.ndim
    if q.axis != -1:
        shape[q.axis] = -1
    return np.broadcast_to(np.asarray(values, np.float64).reshape(shape), q.codes.shape)


def range_of(q: QuantizedTensor) -> np.ndarray:
    """The value range each scale covers: max|w| (symmetric) or hi - lo (affine)."""
    if q.scheme == SCHEME_SYMMETRIC:
        return per_element(q, q.scale)
    return per_element(q, q.scale.astype(np.float64) * ((1 << q.bits) - 1))


def clip_allowance(q: QuantizedTensor) -> np.ndarray:
    """What saturation may add to an error bound: nothing per tensor (minmax)."""
    return GRID_CLIP * range_of(q) if q.axis != -1 else np.zeros(q.codes.shape)


def check_fields(q: QuantizedTensor, w: np.ndarray, bits: int, scheme: str, axis: int) -> None:
    assert q.codes.dtype == np.uint8 and q.codes.shape == w.shape
    assert q.codes.size == 0 or int(q.codes.max()) < (1 << bits)
    assert (q.bits, q.scheme, q.axis) == (bits, scheme, axis)
    nscales = 1 if axis == -1 else w.shape[axis]
    assert q.scale.dtype == np.float32 and q.scale.shape == (nscales,)
    assert q.zero_point.dtype == np.uint8
    assert q.zero_point.shape == ((nscales,) if scheme == SCHEME_AFFINE else (0,))


# --- exact definitions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "codes", "w_hat", "step"),
    [
        (1, [1, 1, 0, 0, 0], [-1, -1, 1, 1, 1], 2.0),
        (2, [3, 0, 0, 1, 1], [-1, 0, 0, 1, 1], 1.0),
        (3, [7, 5, 0, 2, 3], [-1, -1 / 3, 0, 2 / 3, 1], 1 / 3),
    ],
)
def test_symmetric_known_values(bits: int, codes: list[int], w_hat: list[float], step: float):
    q = quantize(np.array([-1, -0.4, 0, 0.6, 1], np.float32), bits)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_allclose(dequantize(q), w_hat, rtol=1e-6)
    np.testing.assert_allclose(quant_step(q), [step], rtol=1e-6)
    assert q.scale.tolist() == [1.0] and q.zero_point.shape == (0,)


def test_symmetric_8_bit_extremes_use_the_top_codes():
    q = quantize(np.array([-2.0, 2.0, -1e-9], np.float32), 8)
    # -s is sign 1, magnitude 127; a magnitude rounded to 0 drops its sign.
    assert q.codes.tolist() == [255, 127, 0]
    assert symmetric_to_signed(q.codes, 8).tolist() == [-127, 127, 0]


def test_affine_known_values():
    q = quantize(np.array([-1.0, 0.0, 2.0], np.float32), 2, SCHEME_AFFINE)
    assert q.scale.tolist() == [1.0] and q.zero_point.tolist() == [1]
    assert q.codes.tolist() == [0, 1, 3]
    assert dequantize(q).tolist() == [-1.0, 0.0, 2.0]
    assert quant_step(q).tolist() == [1.0]


def test_affine_range_always_includes_zero():
    q = quantize(np.array([2.0, 3.0], np.float32), 2, SCHEME_AFFINE)
    assert q.zero_point.tolist() == [0]
    np.testing.assert_allclose(q.scale, [1.0])
    assert q.codes.tolist() == [2, 3]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_zero_tensor_has_zero_scale(scheme: str):
    q = quantize(np.zeros((3, 4), np.float32), 4, scheme, axis=0)
    assert not q.scale.any()
    assert not q.codes.any()
    assert not dequantize(q).any()


def test_zero_channel_next_to_nonzero_channel():
    w = np.array([[0.0, 0.0], [-1.0, 0.5]], np.float32)
    for scheme in SCHEMES:
        q = quantize(w, 4, scheme, axis=0)
        assert q.scale[0] == 0 and q.scale[1] > 0
        np.testing.assert_allclose(dequantize(q), w, atol=0.5 * float(quant_step(q)[1]))


# --- properties --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(tensors_and_axis(), BITS, st.sampled_from(SCHEMES))
def test_nearest_error_is_at_most_half_a_step(wa: tuple[np.ndarray, int], bits: int, scheme: str):
    w, axis = wa
    q = quantize(w, bits, scheme, axis=axis)
    check_fields(q, w, bits, scheme, axis)
    w_hat = dequantize(q)
    assert w_hat.dtype == np.float32 and w_hat.shape == w.shape
    err = np.abs(w.astype(np.float64) - w_hat)
    tol = REL_TOL * range_of(q)
    if scheme == SCHEME_SYMMETRIC and bits == 1:
        assert np.all(err <= per_element(q, q.scale) + tol)
        assert np.all(np.abs(w_hat) == per_element(q, q.scale))
    else:
        # Affine: the zero point's rounding moves the range by up to half a step.
        half = per_element(q, quant_step(q)) * (
            1 if q.axis != -1 and scheme == SCHEME_AFFINE else 0.5
        )
        assert np.all(err <= half + clip_allowance(q) + tol)
        assert np.all(w_hat[w == 0] == 0)  # zero is exact


@settings(max_examples=200, deadline=None)
@given(tensors_and_axis(), BITS, st.sampled_from(SCHEMES), st.integers(0, 2**32 - 1))
def test_stochastic_error_is_below_a_step(
    wa: tuple[np.ndarray, int], bits: int, scheme: str, seed: int
):
    w, axis = wa
    q = quantize(w, bits, scheme, axis=axis, rounding="stochastic", rng=np.random.default_rng(seed))
    check_fields(q, w, bits, scheme, axis)
    err = np.abs(w.astype(np.float64) - dequantize(q))
    # err == 0 covers all-zero slices, whose step is 0.
    bound = per_element(q, quant_step(q)) + clip_allowance(q) + REL_TOL * range_of(q)
    assert np.all((err < bound) | (err == 0))


@settings(max_examples=150, deadline=None)
@given(tensors_and_axis(), st.integers(min_value=2, max_value=8))
def test_symmetric_has_no_negative_zero(wa: tuple[np.ndarray, int], bits: int):
    w, axis = wa
    q = quantize(w, bits, axis=axis)
    magnitude = q.codes & ((1 << (bits - 1)) - 1)
    assert not np.any(q.codes[magnitude == 0])


@settings(max_examples=150, deadline=None)
@given(tensors_and_axis(), BITS)
def test_symmetric_codes_are_onnx_signed_integers(wa: tuple[np.ndarray, int], bits: int):
    w, axis = wa
    q = quantize(w, bits, axis=axis)
    signed = symmetric_to_signed(q.codes, bits)
    assert signed.dtype == np.int8 and signed.shape == w.shape
    top = max((1 << (bits - 1)) - 1, 1)
    assert np.all(np.abs(signed) <= top)
    if bits == 1:
        assert np.all(np.abs(signed) == 1)
    # DequantizeLinear(signed, scale / M, zero point 0) is exactly dequantize.
    unit = per_element(q, q.scale / np.float32(top)).astype(np.float32)
    np.testing.assert_array_equal(signed.astype(np.float32) * unit, dequantize(q))


@settings(max_examples=150, deadline=None)
@given(tensors_and_axis(), BITS, st.sampled_from(SCHEMES), st.sampled_from(OBSERVER_CHOICES))
def test_per_channel_steps_are_each_slices_own_step_rounded_down_to_the_grid(
    wa: tuple[np.ndarray, int], bits: int, scheme: str, observer: str
):
    w, axis = wa
    if axis == -1 or (scheme == SCHEME_AFFINE and observer != OBSERVER_MINMAX):
        return
    q = quantize(w, bits, scheme, axis=axis, observer=observer)
    alone = [
        quantize(np.take(w, c, axis=axis), bits, scheme, observer=observer)
        for c in range(w.shape[axis])
    ]
    observed = np.array([a.scale[0] for a in alone], np.float32)
    unit = np.float32(max(2 ** (bits - 1) - 1, 1) if scheme == SCHEME_SYMMETRIC else 1)
    # A clipping observer's step goes to its nearest grid value within max|w|; minmax's down.
    peaks = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), initial=0.0)
    ceilings = None if observer == OBSERVER_MINMAX else peaks / unit
    np.testing.assert_array_equal(q.scale, grid_units(observed / unit, ceilings) * unit)
    for c, a in enumerate(alone):
        if q.scale[c] == a.scale[0]:  # already on the grid: nothing saturates
            np.testing.assert_array_equal(np.take(q.codes, c, axis=axis), a.codes)
            assert q.zero_point[c : c + 1].tolist() == a.zero_point.tolist()


@settings(max_examples=100, deadline=None)
@given(tensors_and_axis(), BITS, st.sampled_from(SCHEMES))
def test_dequantize_depends_only_on_the_wire_fields(
    wa: tuple[np.ndarray, int], bits: int, scheme: str
):
    w, axis = wa
    q = quantize(w, bits, scheme, axis=axis)
    # Rebuild from what a TensorPayload carries: little-endian scale bytes, zero-point
    # bytes, the shape and the codes.
    rebuilt = QuantizedTensor(
        codes=np.frombuffer(q.codes.tobytes(), np.uint8).reshape(w.shape),
        bits=bits,
        scheme=scheme,
        axis=axis,
        scale=np.frombuffer(q.scale.astype("<f4").tobytes(), "<f4").astype(np.float32),
        zero_point=np.frombuffer(q.zero_point.tobytes(), np.uint8),
    )
    np.testing.assert_array_equal(dequantize(rebuilt), dequantize(q))


# --- stochastic rounding -----------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stochastic_rounding_is_seedable(scheme: str):
    w = np.random.default_rng(0).standard_normal(2000).astype(np.float32)

    def codes(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return quantize(w, 3, scheme, rounding=Rounding.STOCHASTIC, rng=rng).codes

    np.testing.assert_array_equal(codes(7), codes(7))
    assert np.any(codes(7) != codes(8))


@pytest.mark.parametrize(
    ("scheme", "bits"),
    [
        (SCHEME_SYMMETRIC, 1),
        (SCHEME_SYMMETRIC, 2),
        (SCHEME_SYMMETRIC, 4),
        (SCHEME_AFFINE, 2),
        (SCHEME_AFFINE, 4),
    ],
)
def test_stochastic_rounding_is_unbiased(scheme: str, bits: int):
    draws = 4000
    w = np.random.default_rng(1).uniform(-1.0, 2.0, 64).astype(np.float32)
    # Every row is the same tensor, so the per-tensor scale is the same for every draw.
    q = quantize(
        np.tile(w, (draws, 1)), bits, scheme, rounding="stochastic", rng=np.random.default_rng(2)
    )
    mean = dequantize(q).astype(np.float64).mean(axis=0)
    step = float(quant_step(q)[0])
    # One draw is off by at most a step (std <= step / 2); allow six standard errors.
    bound = 6 * (step / 2) / np.sqrt(draws)
    inside = np.ones(w.shape, bool)
    if scheme == SCHEME_AFFINE:
        # Values in the sliver the rounded zero point leaves outside the grid clip.
        zp, qmax = float(q.zero_point[0]), (1 << bits) - 1
        inside = (w >= -zp * q.scale[0]) & (w <= (qmax - zp) * q.scale[0])
        assert inside.sum() > 50
    assert np.all(np.abs(mean - w)[inside] <= bound)
    # Round to nearest is biased at this resolution, which the bound would catch.
    nearest = dequantize(quantize(w, bits, scheme))
    assert np.any(np.abs(nearest - w)[inside] > bound)


def test_stochastic_never_moves_a_value_on_the_grid():
    cases = [(SCHEME_AFFINE, [-1.0, 0.0, 1.0, 2.0]), (SCHEME_SYMMETRIC, [-1.0, 0.0, 1.0])]
    for scheme, values in cases:
        w = np.array(values, np.float32)
        for seed in range(20):
            q = quantize(w, 2, scheme, rounding="stochastic", rng=np.random.default_rng(seed))
            np.testing.assert_array_equal(dequantize(q), w)


def test_nearest_ignores_and_does_not_draw_from_the_rng():
    rng = np.random.default_rng(3)
    quantize(np.ones(10, np.float32), 4, rng=rng)
    assert rng.random() == np.random.default_rng(3).random()


# --- shapes, dtypes, edge cases ----------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    ("shape", "axis", "nscales"),
    [((0,), -1, 1), ((3, 0), 0, 3), ((0, 3), 0, 0), ((0, 3), 1, 3), ((), -1, 1), ((1,), 0, 1)],
)
def test_edge_shapes(scheme: str, shape: tuple[int, ...], axis: int, nscales: int):
    w = np.full(shape, -0.75, np.float32)
    q = quantize(w, 4, scheme, axis=axis)
    assert q.codes.shape == shape and q.scale.shape == (nscales,)
    w_hat = dequantize(q)
    assert w_hat.shape == shape and isinstance(w_hat, np.ndarray)
    step = float(quant_step(q).max(initial=0))
    np.testing.assert_allclose(
        w_hat, w, atol=(1.0 if axis != -1 else 0.5) * step + GRID_CLIP * 0.75
    )


def test_float64_input_is_quantized_as_float32_and_not_modified():
    w64 = np.random.default_rng(4).standard_normal((4, 5))
    before = w64.copy()
    q64 = quantize(w64, 5, axis=1)
    q32 = quantize(w64.astype(np.float32), 5, axis=1)
    np.testing.assert_array_equal(w64, before)
    np.testing.assert_array_equal(q64.codes, q32.codes)
    np.testing.assert_array_equal(q64.scale, q32.scale)


def test_float32_input_is_not_modified():
    w = np.random.default_rng(5).standard_normal((3, 6)).astype(np.float32)
    before = w.copy()
    for scheme in SCHEMES:
        quantize(w, 3, scheme, axis=0, rounding="stochastic", rng=np.random.default_rng(0))
        quantize(w, 3, scheme)
    np.testing.assert_array_equal(w, before)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, 16, 32, -1, True, 4.0])
def test_bits_outside_1_to_8_are_rejected(bits: int):
    with pytest.raises(QuantizationError, match="bits"):
        quantize(np.ones(3, np.float32), bits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_finite_values_are_rejected(bad: float, scheme: str):
    w = np.array([[1.0, bad], [0.0, 2.0]], np.float32)
    for axis in (-1, 0, 1):
        with pytest.raises(ValueError, match="1 of 4 elements are NaN or infinite"):
            quantize(w, 4, scheme, axis=axis)


@pytest.mark.parametrize(("shape", "axis"), [((2, 3), 2), ((2, 3), -2), ((), 0), ((4,), 1)])
def test_axis_out_of_range_is_rejected(shape: tuple[int, ...], axis: int):
    with pytest.raises(QuantizationError, match="axis"):
        quantize(np.ones(shape, np.float32), 4, axis=axis)


def test_unknown_scheme_and_rounding_are_rejected():
    with pytest.raises(QuantizationError, match="scheme"):
        quantize(np.ones(3, np.float32), 4, "float")
    with pytest.raises(QuantizationError, match="rounding"):
        quantize(np.ones(3, np.float32), 4, rounding="up")


def test_affine_range_too_wide_for_a_float32_scale_is_rejected():
    w = np.array([-3e38, 3e38], np.float32)
    with pytest.raises(QuantizationError, match="too wide"):
        quantize(w, 1, SCHEME_AFFINE)
    assert np.isfinite(quantize(w, 8, SCHEME_AFFINE).scale).all()


def test_quantized_tensor_rejects_inconsistent_fields():
    codes = np.zeros((2, 3), np.uint8)
    one = np.ones(1, np.float32)
    no_zp = np.empty(0, np.uint8)
    with pytest.raises(QuantizationError, match="scale"):
        QuantizedTensor(codes, 4, SCHEME_SYMMETRIC, 0, one, no_zp)
    with pytest.raises(QuantizationError, match="zero_point"):
        QuantizedTensor(codes, 4, SCHEME_AFFINE, -1, one, no_zp)
    with pytest.raises(QuantizationError, match="uint8"):
        QuantizedTensor(codes.astype(np.int8), 4, SCHEME_SYMMETRIC, -1, one, no_zp)
    with pytest.raises(QuantizationError, match="bits"):
        QuantizedTensor(codes, 12, SCHEME_SYMMETRIC, -1, one, no_zp)


# --- the "mse" observer ------------------------------------------------------------------


def squared_error(w: np.ndarray, q: QuantizedTensor) -> float:
    return float(np.square(w.astype(np.float64) - dequantize(q)).sum())


@settings(max_examples=200, deadline=None)
@given(tensors_and_axis(), BITS)
def test_mse_observer_never_fits_worse_than_minmax(wa: tuple[np.ndarray, int], bits: int):
    w, axis = wa
    q = quantize(w, bits, SCHEME_SYMMETRIC, axis=axis, observer="mse")
    check_fields(q, w, bits, SCHEME_SYMMETRIC, axis)
    assert np.all(q.scale <= np.abs(w).max(initial=0.0) * (1 + 2e-5))  # a clip, never wider
    if axis == -1:  # per slice, both steps are then rounded down to the grid
        minmax = quantize(w, bits, SCHEME_SYMMETRIC, axis=axis)
        tol = 1e-5 * float(np.square(w.astype(np.float64)).sum()) + 1e-30
        assert squared_error(w, q) <= squared_error(w, minmax) + tol
    assert np.all(dequantize(q)[w == 0] == 0) or bits == 1  # zero stays exact


def test_mse_observer_keeps_most_two_bit_weights_of_a_gaussian_layer():
    w = np.random.default_rng(0).standard_normal((8, 784)).astype(np.float32)
    zeros = {
        obs: float(np.mean(dequantize(quantize(w, 2, axis=0, observer=obs)) == 0))
        for obs in ("minmax", "mse")
    }
    assert zeros["minmax"] > 0.85  # max|w| is ~3.3 sigma: ternary zeroes almost everything
    assert zeros["mse"] < 0.6


def test_mse_observer_one_bit_scale_is_the_mean_magnitude():
    w = np.array([[0.5, -1.5, 2.0, -4.0]], np.float32)
    q = quantize(w, 1, axis=0, observer="mse")
    np.testing.assert_allclose(q.scale, [2.0])
    np.testing.assert_allclose(dequantize(q), [[2.0, -2.0, 2.0, -2.0]])


def test_mse_observer_with_stochastic_rounding_stays_in_range():
    w = np.random.default_rng(1).standard_normal((4, 200)).astype(np.float32)
    for bits in (1, 2, 4):
        q = quantize(
            w, bits, axis=0, observer="mse", rounding="stochastic", rng=np.random.default_rng(2)
        )
        assert np.all(np.abs(dequantize(q)) <= q.scale[:, None] * (1 + REL_TOL))


def test_unknown_observer_and_affine_mse_are_rejected():
    w = np.ones(4, np.float32)
    with pytest.raises(QuantizationError, match="observer"):
        quantize(w, 4, SCHEME_SYMMETRIC, observer="histogram")
    with pytest.raises(QuantizationError, match="minmax"):
        quantize(w, 4, SCHEME_AFFINE, observer="mse")
