"""What a quantized tensor can be: bit-widths, schemes and scale observers.

These are properties of the quantizer (``fedmpq.quant``), which everything else
(fake quantization, bit-planes, policies, the wire codec) names through here.
"""

from __future__ import annotations

#: Bit-widths a tensor may have: 1..8 quantized, 16/32 sent as floats.
QUANT_BITS = frozenset(range(1, 9))
FLOAT_BITS = frozenset({16, 32})
VALID_BITS = QUANT_BITS | FLOAT_BITS

#: Quantization schemes.
SCHEME_SYMMETRIC = "symmetric"  # sign-magnitude, scale = max|w| (FedMPQ)
SCHEME_AFFINE = "affine"  # asymmetric min-max with integer zero point (torch.ao)
SCHEME_FLOAT = "float"  # float16 / float32 pass-through
SCHEMES = frozenset({SCHEME_SYMMETRIC, SCHEME_AFFINE, SCHEME_FLOAT})

#: Observers: how a symmetric scale ``s`` is chosen.
OBSERVER_MINMAX = "minmax"  # s = max|w| (FedMPQ; every weight within the grid)
OBSERVER_MSE = "mse"  # s = the clip of |w| that minimises the squared quantization error
OBSERVERS = frozenset({OBSERVER_MINMAX, OBSERVER_MSE})


def channel_axis(ndim: int, per_channel: bool) -> int:
    """The axis a tensor's scales run along: 0 (one per output channel) for a per-channel
    weight of two or more dimensions, else -1 (one scale for the tensor)."""
    return 0 if per_channel and ndim >= 2 else -1
