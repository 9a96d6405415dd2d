"""Per-channel steps on the log grid (fedmpq.quant_scales): rounding down, exact round
trips through the wire bytes, and quantizer, wire and re-quantization agreeing bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmpq.quant import dequantize, quantize
from fedmpq.quant_scales import (
    EXPONENT_RANGE,
    OCTAVE_MANTISSAS,
    STEPS_PER_OCTAVE,
    ZERO_CODE,
    grid_units,
    units_from_bytes,
    units_nbytes,
    units_to_bytes,
)
from fedmpq.quant_spec import OBSERVER_MINMAX, OBSERVER_MSE, SCHEME_AFFINE, SCHEME_SYMMETRIC
from fedmpq.wire.tensors import decode_tensor, encode_tensor

#: One grid step as a ratio.
STEP_RATIO = 2 ** (1 / STEPS_PER_OCTAVE)
#: How far above a step its grid value may be (the rounding's slack, ~1e-5).
SLACK = 2e-5
# Normal float32 magnitudes: a grid value below ~1e-38 is subnormal, so inexact.
UNITS = hnp.arrays(
    np.float32,
    st.integers(1, 40),
    elements=st.just(0.0) | st.floats(2.0**-100, 2.0**100, width=32),
)


def test_the_mantissas_are_within_an_ulp_of_two_to_the_j_over_16() -> None:
    exact = np.float32(2.0) ** (np.arange(16, dtype=np.float64) / 16)
    ulps = np.abs(OCTAVE_MANTISSAS.view(np.int32) - exact.astype(np.float32).view(np.int32))
    assert OCTAVE_MANTISSAS[0] == 1 and (np.diff(OCTAVE_MANTISSAS) > 0).all()
    assert ulps.max() <= 1 and np.count_nonzero(ulps) == 4


@pytest.mark.parametrize("bits", range(2, 9))
def test_a_symmetric_scale_divides_back_to_its_grid_step(bits: int) -> None:
    levels = np.float32(2 ** (bits - 1) - 1)
    units = np.concatenate([np.ldexp(OCTAVE_MANTISSAS, e) for e in (-100, -3, 0, 7, 90)])
    np.testing.assert_array_equal((units * levels) / levels, units)


@settings(max_examples=300, deadline=None)
@given(UNITS)
def test_grid_units_round_each_step_down_within_one_grid_step(units: np.ndarray) -> None:
    grid = grid_units(units)
    assert grid.dtype == np.float32 and grid.shape == units.shape
    np.testing.assert_array_equal(grid == 0, units == 0)
    floor = units.max() * 2 ** (-(ZERO_CODE - 1) / STEPS_PER_OCTAVE) / STEP_RATIO
    regular, tiny = (units >= floor) & (units > 0), (units < floor) & (units > 0)
    assert (grid[regular] <= units[regular] * (1 + SLACK)).all()
    assert (grid[regular] > units[regular] / STEP_RATIO).all()
    assert (grid[tiny] > units[tiny]).all()  # raised to the floor
    np.testing.assert_array_equal(grid_units(grid), grid)  # on the grid already


@settings(max_examples=300, deadline=None)
@given(UNITS, st.floats(1.0, 4.0, width=32))
def test_with_ceilings_a_step_goes_to_its_nearest_grid_value_within_its_ceiling(
    units: np.ndarray, headroom: float
) -> None:
    ceilings = units * np.float32(headroom)
    grid = grid_units(units, ceilings)
    np.testing.assert_array_equal(grid == 0, units == 0)
    regular = (units > 0) & (units >= units.max() * 2.0 ** (-253 / STEPS_PER_OCTAVE))
    assert (grid[regular] <= ceilings[regular] * (1 + SLACK)).all()
    half_step = 2 ** (1 / (2 * STEPS_PER_OCTAVE)) * (1 + SLACK)
    within = regular & (ceilings >= units * half_step)
    assert (grid[within] <= units[within] * half_step).all()
    assert (grid[within] >= units[within] / half_step).all()
    np.testing.assert_array_equal(grid_units(grid, grid), grid)  # on the grid already


@settings(max_examples=300, deadline=None)
@given(UNITS)
def test_grid_units_round_trip_exactly_through_the_wire_bytes(units: np.ndarray) -> None:
    grid = grid_units(units)
    data = units_to_bytes(grid)
    assert len(data) == units_nbytes(units.size) == 2 + units.size
    np.testing.assert_array_equal(units_from_bytes(data), grid)


@settings(max_examples=200, deadline=None)
@given(st.integers(*EXPONENT_RANGE), st.binary(max_size=40))
@example(-2385, b"\x00")  # the bottom of the range: a subnormal largest step
def test_any_exponent_and_codes_decode_to_steps_within_the_largest(base: int, codes: bytes) -> None:
    units = units_from_bytes(np.array([base], "<i2").tobytes() + codes)
    assert units.dtype == np.float32 and units.shape == (len(codes),)
    # Mantissa times the power of two in one step, as the grid does: 2**(base // 16) alone
    # underflows to 0 at the bottom of the range, where the product is still subnormal.
    largest = np.ldexp(OCTAVE_MANTISSAS[base % 16], base // 16)
    assert (np.isfinite(units) & (units >= 0) & (units <= largest)).all()
    assert ((np.frombuffer(codes, np.uint8) == ZERO_CODE) <= (units == 0)).all()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00", "2-byte exponent"),
        (np.array([2048], "<i2").tobytes(), "outside"),
        (np.array([-2401], "<i2").tobytes(), "outside"),
    ],
)
def test_a_bad_exponent_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        units_from_bytes(data)


def test_a_step_off_the_grid_does_not_travel() -> None:
    with pytest.raises(ValueError, match="grid"):
        units_to_bytes(np.array([1.0, 0.97], np.float32))


WEIGHTS = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=4, max_side=6),
    elements=st.just(0.0)
    | st.floats(2.0**-20, 1024.0, width=32)
    | st.floats(-1024.0, -(2.0**-20), width=32),
)
QUANTIZERS = st.sampled_from(
    [
        (SCHEME_SYMMETRIC, OBSERVER_MINMAX),
        (SCHEME_SYMMETRIC, OBSERVER_MSE),
        (SCHEME_AFFINE, OBSERVER_MINMAX),
    ]
)


@settings(max_examples=200, deadline=None)
@given(WEIGHTS, st.integers(1, 8), QUANTIZERS)
def test_a_per_channel_tensor_decodes_to_exactly_what_the_quantizer_made(
    w: np.ndarray, bits: int, quantizer: tuple[str, str]
) -> None:
    scheme, observer = quantizer
    q = quantize(w, bits, scheme, axis=0, observer=observer)
    payload = encode_tensor("w", w, bits, scheme, per_channel=True, observer=observer)
    assert len(payload.scale) == units_nbytes(w.shape[0])
    np.testing.assert_array_equal(decode_tensor(payload), dequantize(q))


@settings(max_examples=200, deadline=None)
@given(WEIGHTS, st.integers(1, 8), QUANTIZERS)
def test_quantizing_a_dequantized_tensor_gives_it_back(
    w: np.ndarray, bits: int, quantizer: tuple[str, str]
) -> None:
    """What a device trains from must quantize to what it received (fedmpq.dither)."""
    scheme, observer = quantizer
    w_hat = dequantize(quantize(w, bits, scheme, axis=0, observer=observer))
    again = quantize(w_hat, bits, scheme, axis=0, observer=observer)
    np.testing.assert_array_equal(dequantize(again), w_hat)
