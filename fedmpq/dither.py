"""A latent start inside each weight's quantization cell, for devices that receive ``Q_b(w)``.

With the quantized downlink a device receives the global model quantized at its bits,
not the float weights ``w``.  Starting its latent float weights exactly on the grid, a
weight whose local change stays under half a grid step is sent back unchanged: progress
below the grid is lost every round (measured: 1.5 points of accuracy after 20 demo rounds
at 4 bits).  Spreading each latent weight uniformly over its code's cell (seeded) makes
the code it is sent at an unbiased estimate of ``Q_b(w)`` plus its change, as stochastic
rounding would, while the forward pass still sees exactly ``Q_b(w)``: codes at the ends of
the range, which fix the scale, stay where they are, and a tensor whose quantization the
spread would change (possible with the ``mse`` observer) is left on the grid.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmpq.quant import dequantize, quant_step, quantize, symmetric_to_signed
from fedmpq.quant_spec import QUANT_BITS, SCHEME_AFFINE, channel_axis

__all__ = ["dithered_start", "dithered_tensor"]

#: Fraction of a cell the spread covers: a margin keeps rounding off the cell's edges.
SPREAD = 0.98


def dithered_tensor(
    w_q: np.ndarray,
    bits: int,
    scheme: str,
    axis: int,
    observer: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """``w_q`` (a tensor already on the grid) moved uniformly within its codes' cells.

    Returns
    -------
    np.ndarray
        float32, quantizing bit for bit as ``w_q`` itself does (``w_q`` when a spread
        would change that, and for one bit: its cells are the two signs).  That is ``w_q``
        for the symmetric scheme; affine re-quantization of ``w_q`` may move a value by a
        float32 ulp, the scale being recomputed from the dequantized range.
    """
    if bits < 2:
        return w_q
    q = quantize(w_q, bits, scheme, axis=axis, observer=observer)
    step = quant_step(q)
    if axis != -1:
        step = step.reshape((-1,) + (1,) * (w_q.ndim - 1))
    if scheme == SCHEME_AFFINE:
        ends = (q.codes == 0) | (q.codes == 2**bits - 1)
    else:
        ends = np.abs(symmetric_to_signed(q.codes, bits)) == 2 ** (bits - 1) - 1
    u = (rng.random(w_q.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(SPREAD) * step
    u[ends] = 0.0
    latent = (w_q + u).astype(np.float32)
    again = dequantize(quantize(latent, bits, scheme, axis=axis, observer=observer))
    return latent if np.array_equal(again, dequantize(q)) else w_q


def dithered_start(
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    scheme: str,
    *,
    per_channel: bool,
    observer: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """The latent weights a device trains from, given the ``Q_b(w)`` it received.

    Layers of ``bits`` at 1..8 bits are spread over their cells (:func:`dithered_tensor`,
    seeded with ``seed``); the other tensors are returned as they are.
    """
    rng = np.random.default_rng([seed, 0xD17])
    out = dict(state)
    for name in sorted(bits):
        b = bits[name]
        if b in QUANT_BITS:
            w = state[name]
            axis = channel_axis(w.ndim, per_channel)
            out[name] = dithered_tensor(w, b, scheme, axis, observer, rng)
    return out
