"""Per-channel quantization steps on a logarithmic grid: two bytes a tensor, one a channel.

A tensor quantized with one scale per channel (``axis >= 0``) has every channel's step
(its *unit*: ``s / M`` for the symmetric scheme, the affine scale itself) on the grid

    u(e) = 2**(e / 16),     e an integer,

so that the wire carries a tensor's largest exponent ``e_max`` (int16) and a byte
``e_max - e_c`` per channel (255: a zero step, an all-zero channel) instead of a float32
per channel (:func:`units_to_bytes`, :func:`units_from_bytes`).

The quantizer rounds each ``max|w|`` step *down* to the grid (:func:`grid_units`) and
saturates the few weights above the new range, rather than rounding up: a channel's
largest weight then still sits on the top level, so quantizing a dequantized tensor
gives it back bit for bit (a device's latent start, ``fedmpq.dither``, relies on it).
The weights so clipped lose at most ``1 - 2**(-1/16)`` (4.2%) of their channel's range.
A step an observer chose below ``max|w| / M`` (``mse``) goes to its nearest grid value
instead, as long as that stays within the channel's ``max|w|``: its clip was a choice
between errors, which the nearest point perturbs least.
A step more than ``2**(254/16)`` (~60,000) times below its tensor's largest is raised to
that floor instead (its channel then keeps its largest weight below the top level).

The grid values are exact float32s, the same on every platform (no ``pow`` involved):
a float32 mantissa per sixteenth of an octave (:data:`OCTAVE_MANTISSAS`) times a power
of two.  Each mantissa is the float32 nearest ``2**(j/16)`` for which a symmetric scale
``s = M * u`` (float32) divides back to ``u`` for every level count ``M = 2**(b-1) - 1``
-- one ulp off the correctly rounded value for four of the sixteen -- so dequantizing
``s / M`` reproduces the grid step exactly.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "EXPONENT_RANGE",
    "OCTAVE_MANTISSAS",
    "STEPS_PER_OCTAVE",
    "ZERO_CODE",
    "grid_units",
    "units_base",
    "units_from_bytes",
    "units_nbytes",
    "units_to_bytes",
]

#: Grid points per factor of two.
STEPS_PER_OCTAVE = 16
#: The code of a zero step; codes 0..254 are offsets below the tensor's largest exponent.
ZERO_CODE = 255
#: Exponents a tensor's largest step may have: from below float32's smallest subnormal to
#: its largest finite value.
EXPONENT_RANGE = (-150 * STEPS_PER_OCTAVE, 128 * STEPS_PER_OCTAVE - 1)
_BASE_DTYPE = np.dtype("<i2")
#: Slack (in exponent units, ~1e-5 relative) so that a step on the grid but for float32
#: rounding maps back to its own grid point, not the one below.
_SLACK = 2.0**-12


def _symmetric_level_counts() -> list[np.float32]:
    return [np.float32((1 << (bits - 1)) - 1) for bits in range(3, 9)]


def _divides_back(m: np.float32) -> bool:
    """Does ``(M * m) / M == m`` in float32 for every symmetric level count ``M``?"""
    return all(np.float32(np.float32(n * m) / n) == m for n in _symmetric_level_counts())


def _nearest_float32(j: int) -> np.float32:
    """The correctly rounded float32 of ``2**(j/16)`` (j in 0..15), in integers: the
    24-bit mantissa ``round(2**(23 + j/16))`` by an integer 16th root and an exact
    rounding test (``pow`` may differ in its last bit between C libraries)."""
    shift = 16 * 23 + j
    m = math.isqrt(math.isqrt(math.isqrt(math.isqrt(1 << shift))))
    m += (2 * m + 1) ** 16 <= 1 << (shift + 16)  # (m + 1/2)**16 <= 2**shift
    return np.float32(m / (1 << 23))


def _octave_mantissas() -> np.ndarray:
    out = []
    for j in range(STEPS_PER_OCTAVE):
        m = _nearest_float32(j)
        # Nearest first, then one ulp up, one ulp down, two up, ...
        up, down, candidates = m, m, [m]
        for _ in range(4):
            up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(1))
            candidates += [up, down]
        out.append(next(c for c in candidates if _divides_back(c)))
    return np.array(out, dtype=np.float32)


#: ``2**(j/16)`` for j in 0..15 as grid mantissas (see the module docstring).
OCTAVE_MANTISSAS = _octave_mantissas()


def _grid_value(exponents: np.ndarray) -> np.ndarray:
    octaves, steps = np.divmod(exponents, STEPS_PER_OCTAVE)
    with np.errstate(under="ignore"):  # far below any real step: subnormal or 0
        return np.ldexp(OCTAVE_MANTISSAS[steps], octaves.astype(np.int32)).astype(np.float32)


def _exponents(units: np.ndarray, rounding: np.ufunc) -> np.ndarray:
    """Per positive unit, ``rounding`` (floor or rint) of its exponent on the grid."""
    e = rounding(STEPS_PER_OCTAVE * np.log2(units.astype(np.float64)) + _SLACK)
    return np.clip(e, *EXPONENT_RANGE).astype(np.int64)


def grid_units(units: np.ndarray, ceilings: np.ndarray | None = None) -> np.ndarray:
    """Round non-negative finite float32 steps to the grid (what the quantizer uses).

    Parameters
    ----------
    units
        One step per channel, any shape.
    ceilings
        None to round each step down.  Else, per step, the largest step it may become
        (its channel's ``max|w| / M``, when an observer clipped below it): each step goes
        to its nearest grid value, but not above the largest one within its ceiling.

    Returns
    -------
    np.ndarray
        float32, ``units``' shape, on the grid (up to ~1e-5 relative above a step rounded
        down; at least the largest over ``2**(254/16)``); 0 stays 0.
    """
    flat = np.asarray(units, dtype=np.float32).reshape(-1)
    positive = flat > 0
    if not positive.any():
        return np.zeros(np.shape(units), dtype=np.float32)
    e = _exponents(
        np.where(positive, flat, np.float32(1)), np.floor if ceilings is None else np.rint
    )
    if ceilings is not None:
        top = np.asarray(ceilings, dtype=np.float32).reshape(-1)
        e = np.minimum(e, _exponents(np.where(positive, top, np.float32(1)), np.floor))
    e = np.maximum(e, e[positive].max() - (ZERO_CODE - 1))
    out = np.where(positive, _grid_value(e), np.float32(0))
    return out.astype(np.float32).reshape(np.shape(units))


def units_nbytes(count: int) -> int:
    """Bytes that ``count`` per-channel steps take on the wire."""
    return _BASE_DTYPE.itemsize + count


def units_to_bytes(units: np.ndarray) -> bytes:
    """The int16 (little-endian) largest exponent, then one code per step.

    Raises
    ------
    ValueError
        If a step is not on the grid (every per-channel step ``fedmpq.quant`` makes is).
    """
    flat = np.asarray(units, dtype=np.float32).reshape(-1)
    positive = flat > 0
    e = _exponents(np.where(positive, flat, np.float32(1)), np.rint)
    if not np.array_equal(np.where(positive, _grid_value(e), 0), flat):
        raise ValueError("per-channel steps must lie on fedmpq.quant_scales' grid")
    base = int(e[positive].max()) if positive.any() else 0
    codes = np.where(positive, base - e, ZERO_CODE)
    if codes.max(initial=0) > ZERO_CODE:
        raise ValueError("per-channel steps span more than the grid's 254 codes")
    return np.array([base], _BASE_DTYPE).tobytes() + codes.astype(np.uint8).tobytes()


def units_base(data: bytes) -> int:
    """The largest exponent at the head of ``units_to_bytes``' output (2+ bytes)."""
    return int(np.frombuffer(data, _BASE_DTYPE, count=1)[0])


def units_from_bytes(data: bytes) -> np.ndarray:
    """The float32 steps that :func:`units_to_bytes` wrote (``len(data) - 2`` of them).

    Raises
    ------
    ValueError
        If ``data`` is shorter than the exponent or the exponent is outside
        :data:`EXPONENT_RANGE` (the wire codec checks both before it decodes).
    """
    if len(data) < _BASE_DTYPE.itemsize:
        raise ValueError(f"per-channel steps need a {_BASE_DTYPE.itemsize}-byte exponent")
    base = units_base(data)
    if not EXPONENT_RANGE[0] <= base <= EXPONENT_RANGE[1]:
        raise ValueError(f"the steps' exponent {base} is outside {list(EXPONENT_RANGE)}")
    codes = np.frombuffer(data, dtype=np.uint8, offset=_BASE_DTYPE.itemsize).astype(np.int64)
    values = _grid_value(base - np.minimum(codes, ZERO_CODE - 1))
    return np.where(codes == ZERO_CODE, np.float32(0), values).astype(np.float32)
