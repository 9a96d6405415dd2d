"""The latent start within the quantization cells: the forward pass still sees Q_b(w)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpq.dither import dithered_start, dithered_tensor
from fedmpq.quant import dequantize, quant_step, quantize
from fedmpq.quant_spec import OBSERVER_MINMAX, OBSERVER_MSE, SCHEME_AFFINE, SCHEME_SYMMETRIC

QUANTIZERS = [
    (SCHEME_SYMMETRIC, OBSERVER_MINMAX),
    (SCHEME_SYMMETRIC, OBSERVER_MSE),
    (SCHEME_AFFINE, OBSERVER_MINMAX),
]


def on_grid(w: np.ndarray, bits: int, scheme: str, axis: int, observer: str) -> np.ndarray:
    return dequantize(quantize(w, bits, scheme, axis=axis, observer=observer))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.integers(1, 8),
    quantizer=st.sampled_from(QUANTIZERS),
    axis=st.sampled_from([-1, 0]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
)
def test_the_spread_start_quantizes_to_the_received_model(seed, bits, quantizer, axis, rows, cols):
    scheme, observer = quantizer
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    w_q = on_grid(w, bits, scheme, axis, observer)
    latent = dithered_tensor(w_q, bits, scheme, axis, observer, np.random.default_rng(seed))
    assert latent.dtype == np.float32
    seen = on_grid(latent, bits, scheme, axis, observer)
    assert seen.tobytes() == on_grid(w_q, bits, scheme, axis, observer).tobytes()
    if scheme == SCHEME_SYMMETRIC:  # re-quantizing the symmetric grid changes nothing
        assert seen.tobytes() == w_q.tobytes()


@pytest.mark.parametrize(("scheme", "observer"), QUANTIZERS[::2])
def test_the_spread_covers_the_cells_uniformly(scheme, observer):
    w = np.random.default_rng(0).normal(size=(8, 4000)).astype(np.float32)
    w_q = on_grid(w, 4, scheme, 0, observer)
    latent = dithered_tensor(w_q, 4, scheme, 0, observer, np.random.default_rng(1))
    step = quant_step(quantize(w_q, 4, scheme, axis=0, observer=observer)).reshape(-1, 1)
    offset = (latent - w_q) / step
    moved = offset != 0
    assert moved.mean() > 0.8  # all but the codes at the ends of the range
    assert np.abs(offset).max() < 0.5
    assert abs(offset[moved].mean()) < 0.01 and 0.07 < offset[moved].var() < 0.09  # U: 1/12


def test_only_quantized_layers_move_and_the_seed_decides():
    rng = np.random.default_rng(0)
    state = {"w": on_grid(rng.normal(size=(4, 9)).astype(np.float32), 4, SCHEME_SYMMETRIC, 0,
                          OBSERVER_MINMAX), "b": rng.normal(size=4).astype(np.float32)}  # fmt: skip
    kw = {"per_channel": True, "observer": OBSERVER_MINMAX}
    a = dithered_start(state, {"w": 4, "b": 32}, SCHEME_SYMMETRIC, seed=1, **kw)
    again = dithered_start(state, {"w": 4, "b": 32}, SCHEME_SYMMETRIC, seed=1, **kw)
    other = dithered_start(state, {"w": 4, "b": 32}, SCHEME_SYMMETRIC, seed=2, **kw)
    assert a["b"] is state["b"] and not np.array_equal(a["w"], state["w"])
    assert np.array_equal(a["w"], again["w"]) and not np.array_equal(a["w"], other["w"])
