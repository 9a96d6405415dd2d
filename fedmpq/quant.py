"""Uniform n-bit quantization (n in 1..8) of float tensors, with numpy only.

Two schemes, named by the constants of :mod:`fedmpq.quant_spec`:

* ``SCHEME_SYMMETRIC`` -- sign-magnitude, as FedMPQ uses.  ``s = max|w|``; for
  ``b >= 2`` bits the magnitude ``m = round(|w| / s * M)`` with ``M = 2**(b-1) - 1``
  sits in the low ``b - 1`` bits and the sign in the top bit, so ``w_hat =
  (-1)**sign * s * m / M``.  A zero magnitude always gets sign 0 (no negative
  zero), which makes the signed value ``(-1)**sign * m`` an ONNX int-b value with
  scale ``s / M`` and zero point 0 (see :func:`symmetric_to_signed`).  One bit
  keeps the sign only: ``w_hat = +s`` (code 0, also for ``w == 0``) or ``-s``.
* ``SCHEME_AFFINE`` -- asymmetric min-max with an integer zero point (the
  ``torch.ao`` convention).  The range ``[min(w, 0), max(w, 0)]`` always holds 0,
  so 0 is exact; ``scale = (hi - lo) / (2**b - 1)``, ``zero_point =
  round(-lo / scale)``, ``code = clip(round(w / scale) + zero_point)`` and
  ``w_hat = (code - zero_point) * scale``.

A symmetric scale comes from an *observer* (``torch.ao``'s word): ``"minmax"``
takes ``s = max|w|`` as above; ``"mse"`` clips ``|w|`` at the ``s`` that minimises
the squared quantization error (searched over ``s = c * max|w|``, ``c`` in
[0.25, 1]; for one bit the closed form ``s = mean|w|``).  At two bits ``max|w|``
turns ~90% of a dense layer's weights into zeros; the clipped scale keeps far more.

Scales are per tensor (``axis == -1``, the observer's) or per slice along ``axis``: a
per-slice step is rounded down to powers of ``2**(1/16)`` (``fedmpq.quant_scales``), a
byte on the wire; weights above the range so narrowed (<= 4.2%) take the top level.
Round to nearest keeps ``|w - w_hat| <= step / 2`` (symmetric 1-bit: ``<= s``);
stochastic rounding keeps ``|w - w_hat| < step`` and is unbiased.  (These bounds hold
for the weights within the range: with the ``"mse"`` observer, or per slice, the ones
above it are clipped to its end.)  The error bounds hold to
float32 resolution, which coarsens once a step falls into float32's subnormal
range (scales below about 1e-30).

Everything runs on float32 with in-place temporaries so that a whole model
(~11M parameters) quantizes in a few tens of milliseconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np

from fedmpq.errors import FedmpqError
from fedmpq.quant_scales import grid_units
from fedmpq.quant_spec import (
    OBSERVER_MINMAX,
    OBSERVER_MSE,
    OBSERVERS,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_SYMMETRIC,
)

__all__ = [
    "QuantizationError",
    "QuantizedTensor",
    "Rounding",
    "check_quant_args",
    "dequantize",
    "quant_step",
    "quantize",
    "steps_per_scale",
    "symmetric_to_signed",
]

_QUANT_SCHEMES = (SCHEME_SYMMETRIC, SCHEME_AFFINE)


class QuantizationError(FedmpqError, ValueError):
    """Arguments or data a quantizer cannot work with (bad bit-width, scheme, axis,
    rounding mode, non-finite values, inconsistent quantized fields)."""


class Rounding(str, enum.Enum):
    """How a scaled value is rounded to an integer level."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make a generated __eq__ useless
class QuantizedTensor:
    """A tensor quantized to ``bits`` bits, unpacked (one code per uint8).

    Attributes
    ----------
    codes : np.ndarray
        uint8, the original tensor's shape, every code ``< 2**bits``.
    bits : int
        1..8.
    scheme : str
        ``SCHEME_SYMMETRIC`` or ``SCHEME_AFFINE``.
    axis : int
        -1 for one scale per tensor, else the axis with one scale per slice.
    scale : np.ndarray
        float32, shape ``(1,)`` per tensor or ``(codes.shape[axis],)``.  The
        observer's ``s`` for the symmetric scheme, the grid step for the affine scheme;
        per slice, with the step rounded down to ``fedmpq.quant_scales``' grid.
    zero_point : np.ndarray
        uint8, ``scale``'s shape for the affine scheme, ``(0,)`` for symmetric.

    Construction checks that the fields agree with each other (cheap checks only:
    code values are not scanned), raising :class:`QuantizationError`.
    """

    codes: np.ndarray
    bits: int
    scheme: str
    axis: int
    scale: np.ndarray
    zero_point: np.ndarray

    def __post_init__(self) -> None:
        check_quant_args(self.bits, self.scheme)
        if self.codes.dtype != np.uint8:
            raise QuantizationError(f"codes must be uint8, got {self.codes.dtype}")
        _check_axis(self.axis, self.codes.ndim)
        nscales = 1 if self.axis == -1 else self.codes.shape[self.axis]
        if self.scale.dtype != np.float32 or self.scale.shape != (nscales,):
            raise QuantizationError(
                f"scale must be float32 of shape ({nscales},) for codes of shape "
                f"{self.codes.shape} and axis {self.axis}, got {self.scale.dtype} "
                f"of shape {self.scale.shape}"
            )
        nzero = nscales if self.scheme == SCHEME_AFFINE else 0
        if self.zero_point.dtype != np.uint8 or self.zero_point.shape != (nzero,):
            raise QuantizationError(
                f"zero_point must be uint8 of shape ({nzero},) for the {self.scheme} "
                f"scheme, got {self.zero_point.dtype} of shape {self.zero_point.shape}"
            )


def check_quant_args(bits: int, scheme: str) -> None:
    """Raise :class:`QuantizationError` unless ``bits`` and ``scheme`` can be quantized.

    Parameters
    ----------
    bits : int
        Must be in 1..8 (16/32-bit float pass-through is not quantization).
    scheme : str
        Must be ``SCHEME_SYMMETRIC`` or ``SCHEME_AFFINE``.
    """
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in QUANT_BITS:
        raise QuantizationError(
            f"bits must be an integer in 1..8 to quantize, got {bits!r} "
            "(16/32-bit floats are sent unquantized)"
        )
    if scheme not in _QUANT_SCHEMES:
        raise QuantizationError(
            f"unknown quantization scheme {scheme!r}; use one of {list(_QUANT_SCHEMES)}"
        )


def quantize(
    w: np.ndarray,
    bits: int,
    scheme: str = SCHEME_SYMMETRIC,
    *,
    axis: int = -1,
    rounding: Rounding | str = Rounding.NEAREST,
    rng: np.random.Generator | None = None,
    observer: str = OBSERVER_MINMAX,
) -> QuantizedTensor:
    """Quantize a float tensor to ``bits`` bits.

    Parameters
    ----------
    w : np.ndarray
        Finite floats of any shape (computed in float32; ``w`` is not modified).
    bits : int
        1..8.
    scheme : str
        ``SCHEME_SYMMETRIC`` (default) or ``SCHEME_AFFINE``.
    axis : int
        -1 (default) for one scale for the whole tensor, else the axis along which
        each slice gets its own scale (0 = output channels of a weight).
    rounding : Rounding or str
        ``"nearest"`` (ties to even) or ``"stochastic"`` (round up with probability
        equal to the fractional part, so ``E[w_hat] == w``).
    rng : np.random.Generator, optional
        Source of randomness for stochastic rounding; a fresh unseeded generator
        when omitted.  Ignored for round-to-nearest.
    observer : str
        ``"minmax"`` (default) or ``"mse"``: how a symmetric scale is chosen (see the
        module docstring); the affine scheme takes ``"minmax"`` only.

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    QuantizationError
        For bits outside 1..8, an unknown scheme or rounding, an axis out of range,
        NaN/infinite values, or (affine) a value range too wide for a float32 scale.
    """
    check_quant_args(bits, scheme)
    _check_observer(observer, scheme)
    mode = _rounding_mode(rounding)
    w32 = np.asarray(w, dtype=np.float32)
    _check_axis(axis, w32.ndim)
    if w32.ndim == 0:  # elementwise numpy ops turn 0-d arrays into scalars
        q = quantize(w32.reshape(1), bits, scheme, rounding=mode, rng=rng, observer=observer)
        return replace(q, codes=q.codes.reshape(()))
    rng = _rounding_rng(mode, rng)
    reduce_axes = None if axis == -1 else tuple(i for i in range(w32.ndim) if i != axis)
    if scheme == SCHEME_SYMMETRIC:
        return _quantize_symmetric(w32, bits, axis, reduce_axes, rng, observer)
    return _quantize_affine(w32, bits, axis, reduce_axes, rng)


def _check_observer(observer: str, scheme: str) -> None:
    if observer not in OBSERVERS or (scheme == SCHEME_AFFINE and observer != OBSERVER_MINMAX):
        raise QuantizationError(
            f"observer {observer!r} does not go with the {scheme} scheme; use "
            + (f"one of {sorted(OBSERVERS)}" if scheme == SCHEME_SYMMETRIC else "'minmax'")
        )


def _rounding_mode(rounding: Rounding | str) -> Rounding:
    try:
        return Rounding(rounding)
    except ValueError:
        raise QuantizationError(
            f"unknown rounding {rounding!r}; use one of {[r.value for r in Rounding]}"
        ) from None


def _rounding_rng(mode: Rounding, rng: np.random.Generator | None) -> np.random.Generator | None:
    """The generator stochastic rounding draws from; None exactly when rounding to nearest."""
    if mode is Rounding.NEAREST:
        return None
    return np.random.default_rng() if rng is None else rng


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """Reconstruct the float32 tensor (shape ``q.codes.shape``) from its fields alone.

    Parameters
    ----------
    q : QuantizedTensor

    Returns
    -------
    np.ndarray
        float32 ``w_hat``.
    """
    if q.codes.ndim == 0:  # elementwise numpy ops turn 0-d arrays into scalars
        return dequantize(replace(q, codes=q.codes.reshape(1))).reshape(())
    shape = _scale_shape(q)
    if q.scheme == SCHEME_SYMMETRIC:
        out = symmetric_to_signed(q.codes, q.bits).astype(np.float32)
        out *= _signed_unit(q).reshape(shape)
    else:
        out = q.codes.astype(np.float32)
        out -= q.zero_point.reshape(shape)
        out *= q.scale.reshape(shape)
    return out


def quant_step(q: QuantizedTensor) -> np.ndarray:
    """The grid spacing of ``q``, one float32 per scale.

    Symmetric: ``s / M`` for ``b >= 2`` and ``2 * s`` (the distance from ``-s`` to
    ``+s``) for one bit.  Affine: ``scale``.
    """
    if q.scheme == SCHEME_AFFINE:
        return q.scale.copy()
    if q.bits == 1:
        return q.scale * np.float32(2)
    return _signed_unit(q)


def symmetric_to_signed(codes: np.ndarray, bits: int) -> np.ndarray:
    """Turn symmetric sign-magnitude codes into signed integers ``(-1)**sign * m``.

    The result lies in ``[-M, M]`` with ``M = 2**(bits-1) - 1`` (``+-1`` for one
    bit), i.e. it is an ONNX int-b tensor to dequantize with scale ``s / M``
    (``s`` for one bit) and zero point 0.

    Parameters
    ----------
    codes : np.ndarray
        uint8 symmetric codes, each ``< 2**bits``.
    bits : int
        1..8.

    Returns
    -------
    np.ndarray
        int8, ``codes``' shape.
    """
    check_quant_args(bits, SCHEME_SYMMETRIC)
    codes = np.asarray(codes, dtype=np.uint8)
    flat = codes.reshape(-1)  # keeps 0-d input an array through the ufuncs below
    if bits == 1:
        signed = np.int8(1) - (flat << 1).astype(np.int8)
    else:
        # Both fit in 0..127, so the uint8 results are their int8 values as they stand.
        signed = np.bitwise_and(flat, np.uint8((1 << (bits - 1)) - 1)).view(np.int8)
        minus = np.right_shift(flat, np.uint8(bits - 1)).view(np.int8)
        np.negative(minus, out=minus)  # -1 where the sign bit is set, else 0
        # Branch-free conditional negation, in place (no temporaries: they cost page faults
        # on large tensors): (m ^ -1) - (-1) == -m, (m ^ 0) - 0 == m.
        signed ^= minus
        signed -= minus
    return signed.reshape(codes.shape)


def _check_axis(axis: int, ndim: int) -> None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise QuantizationError(f"axis must be an int, got {axis!r}")
    if axis != -1 and not 0 <= axis < ndim:
        raise QuantizationError(
            f"axis {axis} is out of range for a {ndim}-d tensor; use -1 for one scale "
            f"per tensor or a channel axis in 0..{ndim - 1}"
            if ndim
            else f"axis {axis} is out of range for a 0-d tensor; use -1"
        )


def _scale_shape(q: QuantizedTensor) -> tuple[int, ...]:
    """The shape that broadcasts ``q.scale`` against ``q.codes``."""
    shape = [1] * q.codes.ndim
    if q.axis != -1:
        shape[q.axis] = q.scale.shape[0]
    return tuple(shape)


def _signed_unit(q: QuantizedTensor) -> np.ndarray:
    """float32 value of the signed integer 1: ``s / M`` (``s`` for one bit)."""
    return q.scale / steps_per_scale(q.bits, SCHEME_SYMMETRIC)


def steps_per_scale(bits: int, scheme: str) -> np.float32:
    """What a scale is divided by to give its level step: ``M = 2**(bits-1) - 1`` for the
    symmetric scheme (1 at one bit), 1 for the affine scheme (whose scale is the step)."""
    return np.float32(max((1 << (bits - 1)) - 1, 1) if scheme == SCHEME_SYMMETRIC else 1)


def _require_finite(reduced: np.ndarray, w: np.ndarray) -> None:
    # A max/min reduction propagates NaN and infinity, so checking the (small)
    # reduced values avoids a separate pass over the whole tensor.
    if not np.isfinite(reduced).all():
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise QuantizationError(
            f"cannot quantize a tensor of shape {w.shape} holding non-finite values: "
            f"{bad} of {w.size} elements are NaN or infinite (did training diverge?)"
        )


def _round_into(x: np.ndarray, rng: np.random.Generator | None, out: np.ndarray) -> np.ndarray:
    """Round ``x`` to integers into ``out`` (``x`` itself or a uint8 array that the
    integers fit): nearest-even, or stochastically.  ``x`` is overwritten.

    Stochastic rounding adds 1 to ``floor(x)`` when a uniform draw falls below the
    fractional part -- ``floor(x + U)`` without the float32 error of ``x + U``,
    so an integral ``x`` never moves.
    """
    # Writing straight into uint8 (casting="unsafe" of exact integers) saves a pass.
    if rng is None:
        return np.rint(x, out=out, casting="unsafe")
    low = np.floor(x)
    x -= low
    return np.add(low, rng.random(x.shape, dtype=np.float32) < x, out=out, casting="unsafe")


def _quantize_symmetric(
    w: np.ndarray,
    bits: int,
    axis: int,
    reduce_axes: tuple[int, ...] | None,
    rng: np.random.Generator | None,
    observer: str,
) -> QuantizedTensor:
    magnitude = np.abs(w)
    peak = s = magnitude.max(axis=reduce_axes, keepdims=True, initial=0.0)
    _require_finite(s, w)
    if observer == OBSERVER_MSE:
        s = _mse_scale(magnitude, s, bits, reduce_axes)
    levels = (1 << (bits - 1)) - 1
    if axis != -1:  # steps on the grid the wire carries (see fedmpq.quant_scales)
        unit = steps_per_scale(bits, SCHEME_SYMMETRIC)
        ceilings = None if observer == OBSERVER_MINMAX else peak / unit
        s = grid_units(s / unit, ceilings) * unit
    if observer == OBSERVER_MSE:
        np.minimum(magnitude, s, out=magnitude)
        w = np.clip(w, -s, s)
    divisor = np.where(s > 0, s, np.float32(1))  # an all-zero slice stays all zero
    if bits == 1:
        codes = _sign_codes(w, s, divisor, rng)  # a weight beyond +-s keeps its sign
    else:
        # |w| / s <= 1 and (|w| / s) * M <= M hold exactly in float32 (correctly
        # rounded, monotonic ops) where s >= max|w|.  A grid step may put a few of them
        # (< 1.05 * M < 256) above M: they saturate (a comparison and a sparse write are
        # several times faster than np.minimum's pass here).
        np.divide(magnitude, divisor, out=magnitude)
        magnitude *= np.float32(levels)
        codes = _round_into(magnitude, rng, np.empty(w.shape, dtype=np.uint8))
        if axis != -1:
            above = np.greater(codes, np.uint8(levels))
            if above.any():
                codes[above] = levels
        sign = np.less(w, 0).view(np.uint8)
        np.minimum(sign, codes, out=sign)  # sign 0 where the magnitude is 0
        sign *= np.uint8(1 << (bits - 1))  # numpy's uint8 multiply is faster than its shift
        codes |= sign
    return QuantizedTensor(
        codes=codes,
        bits=bits,
        scheme=SCHEME_SYMMETRIC,
        axis=axis,
        scale=s.reshape(-1),
        zero_point=np.empty(0, dtype=np.uint8),
    )


#: Clip ratios ``c`` (of ``max|w|``) the ``"mse"`` observer tries.
_MSE_CLIPS = np.linspace(0.25, 1.0, 16, dtype=np.float32)


def _mse_scale(
    magnitude: np.ndarray, peak: np.ndarray, bits: int, reduce_axes: tuple[int, ...] | None
) -> np.ndarray:
    """Per-slice scale minimising ``sum (|w| - |w_hat|)**2`` (sign-magnitude grid)."""
    if bits == 1:  # w_hat = +-s: the error is minimal at s = mean|w|
        total = magnitude.sum(axis=reduce_axes, keepdims=True, dtype=np.float64)
        count = max(magnitude.size // max(total.size, 1), 1)  # empty slices: s = 0
        return (total / count).astype(np.float32)
    levels = np.float32((1 << (bits - 1)) - 1)
    best, best_err = peak, None
    for clip in _MSE_CLIPS:
        s = peak * clip
        unit = np.where(s > 0, s / levels, np.float32(1))
        err = np.minimum(np.rint(magnitude / unit), levels)
        err *= unit
        err -= magnitude
        err = np.square(err, out=err).sum(axis=reduce_axes, keepdims=True)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = np.where(better, s, best)
            best_err = np.where(better, err, best_err)
    return best.astype(np.float32)


def _sign_codes(
    w: np.ndarray, s: np.ndarray, divisor: np.ndarray, rng: np.random.Generator | None
) -> np.ndarray:
    """One-bit symmetric codes: 1 means ``-s``, 0 means ``+s``."""
    if rng is None:
        return np.less(w, 0).view(np.uint8)
    # P(-s) = (s - w) / 2s makes E[w_hat] = s * (1 - 2 P(-s)) = w.
    p_negative = np.subtract(s, w)
    p_negative /= divisor * np.float32(2)
    return np.less(rng.random(w.shape, dtype=np.float32), p_negative).view(np.uint8)


def _quantize_affine(
    w: np.ndarray,
    bits: int,
    axis: int,
    reduce_axes: tuple[int, ...] | None,
    rng: np.random.Generator | None,
) -> QuantizedTensor:
    # initial=0 folds 0 into the range (so 0 is exact) and handles empty tensors.
    lo = w.min(axis=reduce_axes, keepdims=True, initial=0.0)
    hi = w.max(axis=reduce_axes, keepdims=True, initial=0.0)
    _require_finite(lo, w)
    _require_finite(hi, w)
    qmax = (1 << bits) - 1
    lo64 = lo.astype(np.float64)
    # The range is formed in float64 because hi - lo can overflow float32.
    with np.errstate(over="ignore"):
        scale = ((hi.astype(np.float64) - lo64) / qmax).astype(np.float32)
    if not np.isfinite(scale).all():
        raise QuantizationError(
            f"the value range of a tensor of shape {w.shape} is too wide for a float32 "
            f"affine scale at {bits} bits; use more bits or the symmetric scheme"
        )
    if axis != -1:
        scale = grid_units(scale)
    nonzero = scale > 0
    zero_point = np.zeros(scale.shape, dtype=np.float64)
    np.divide(-lo64, scale, out=zero_point, where=nonzero)
    zero_point = np.clip(np.rint(zero_point), 0, qmax).astype(np.uint8)
    x = np.divide(w, np.where(nonzero, scale, np.float32(1)))
    x = _round_into(x, rng, x)
    x += zero_point
    return QuantizedTensor(
        codes=np.clip(x, 0, qmax, out=np.empty(w.shape, dtype=np.uint8), casting="unsafe"),
        bits=bits,
        scheme=SCHEME_AFFINE,
        axis=axis,
        scale=scale.reshape(-1),
        zero_point=zero_point.reshape(-1),
    )
