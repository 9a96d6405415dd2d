"""The common integer grid of a round and the ring Z_(2**k) the masked codes live in.

Grid
----
The coordinator announces, per layer, a ``scale`` (taken from the global model) and the
grid's bits ``B``, the highest precision any selected device has for that layer.  A device
at ``b`` bits quantizes with step ``scale / 2**(b - 1)`` to signed codes ``c`` with
``|c| <= 2**(b - 1)``, i.e. the values ``-scale .. +scale``.  The steps are powers of two so
that every coarser grid is a subset of the finer ones (fedmpq's symmetric step
``scale / (2**(b - 1) - 1)`` does not nest: its 2-bit and 4-bit grids share only 0 and
``+-scale``).  The codes never travel at ``b`` bits (the masked input is ``k`` bits wide
whatever ``b``), so the grid keeps both ends, ``2**b + 1`` levels, at no cost.

On the B-bit grid, code ``c`` is ``c * 2**(B - b)`` exactly, so codes from mixed precisions
add up without rounding, and every lifted code satisfies ``|c| <= 2**(B - 1)``.

Ring
----
A sum of ``n`` lifted codes lies in ``[-n * 2**(B-1), n * 2**(B-1)]``: ``n * 2**B + 1``
values.  ``k = B + n.bit_length()`` is the smallest ring whose two's-complement range
``[-2**(k-1), 2**(k-1))`` holds them all for every ``n`` (``n.bit_length() =
floor(log2 n) + 1``, at most ``ceil(log2 n) + 1``); 4-bit codes from 10 devices need
``k = 8``.  Masked codes are uniform in the ring and travel bit-packed at exactly ``k`` bits
(:func:`pack_ring`).
"""

from __future__ import annotations

import math

import numpy as np

from fedmpq.errors import DecodeError
from fedmpq.packing import pack_bits, packed_nbytes, unpack_bits
from fedmpq.secagg.errors import SecAggError

#: Widest ring: masks are at most uint32 words.
MAX_RING_BITS = 32
GRID_BITS = range(1, 9)


def ring_bits(grid_bits: int, devices: int) -> int:
    """Bits ``k`` of the ring that holds any sum of ``devices`` codes on a ``grid_bits`` grid."""
    if grid_bits not in GRID_BITS:
        raise SecAggError(f"grid bits must be in 1..8, got {grid_bits}")
    if devices < 1:
        raise SecAggError(f"a round needs at least one device, got {devices}")
    k = grid_bits + devices.bit_length()
    if k > MAX_RING_BITS:
        raise SecAggError(f"{devices} devices at {grid_bits} bits need a {k}-bit ring (max 32)")
    return k


def max_code(bits: int) -> int:
    """Largest ``|code|`` on a ``bits``-bit grid: ``2**(bits-1)``, the code of ``+-scale``."""
    return 1 << (bits - 1)


def grid_codes(
    values: np.ndarray, scale: float, bits: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Quantize ``values`` to signed codes on the grid of step ``scale / 2**(bits-1)``.

    Parameters
    ----------
    values
        Finite floats (an update, or weights), any shape.
    scale
        The layer's announced scale, > 0.
    bits
        The device's precision for the layer, 1..8.
    rng
        With a generator, stochastic rounding (unbiased); without, round to nearest.

    Returns
    -------
    numpy.ndarray
        int32 codes, ``values``' shape, clipped to ``+-max_code(bits)`` (``+-scale``).
    """
    _check_scale(scale)
    if bits not in GRID_BITS:
        raise SecAggError(f"bits must be in 1..8, got {bits}")
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise SecAggError("values to put on the grid must be finite")
    x = x * (max_code(bits) / scale)
    x = np.floor(x + rng.random(x.shape)) if rng is not None else np.rint(x)
    top = max_code(bits)
    return np.clip(x, -top, top).astype(np.int32)


def lift(codes: np.ndarray, bits: int, grid_bits: int) -> np.ndarray:
    """``codes`` at ``bits`` bits as codes on the ``grid_bits`` grid: times ``2**(grid_bits-bits)``.

    Raises
    ------
    SecAggError
        If ``bits > grid_bits`` or a code is outside ``+-max_code(bits)``.
    """
    if bits not in GRID_BITS or grid_bits not in GRID_BITS or bits > grid_bits:
        raise SecAggError(f"cannot lift {bits}-bit codes onto a {grid_bits}-bit grid")
    c = np.asarray(codes)
    if c.dtype.kind not in "iu":
        raise SecAggError(f"codes must be integers, got dtype {c.dtype}")
    c = c.astype(np.int64)
    top = max_code(bits)
    if c.size and (int(c.min()) < -top or int(c.max()) > top):
        raise SecAggError(f"a code is outside the {bits}-bit range +-{top}")
    return c << (grid_bits - bits)


def word_dtype(k: int) -> np.dtype:
    """The narrowest unsigned dtype (8, 16 or 32 bits) that holds a ``k``-bit ring element.

    Sums and masks wrap modulo the word's ``2**bits``, a multiple of ``2**k``, so working
    in it and reducing at the end is working modulo ``2**k``.
    """
    if not 1 <= k <= MAX_RING_BITS:
        raise SecAggError(f"ring bits must be in 1..{MAX_RING_BITS}, got {k}")
    return np.dtype(np.uint8 if k <= 8 else np.uint16 if k <= 16 else np.uint32)


def to_ring(codes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Signed codes as unsigned ``dtype`` words (two's complement; reduce mod ``2**k`` later)."""
    return np.asarray(codes, dtype=np.int64).astype(dtype)


def from_ring(words: np.ndarray, k: int) -> np.ndarray:
    """The signed integers in ``[-2**(k-1), 2**(k-1))`` that unsigned ``words`` stand for
    modulo ``2**k`` (int64)."""
    v = np.asarray(words).astype(np.int64) & ring_mask(k)
    return v - ((v >> (k - 1)) << k)


def ring_mask(k: int) -> int:
    """``2**k - 1``: a word reduced modulo ``2**k`` is the word AND this."""
    return (1 << k) - 1


def dequantize_sum(codes: np.ndarray, scale: float, grid_bits: int) -> np.ndarray:
    """The float sum of the updates whose grid codes sum to ``codes`` (float64)."""
    _check_scale(scale)
    return np.asarray(codes, dtype=np.float64) * (scale / (1 << (grid_bits - 1)))


def ring_nbytes(count: int, k: int) -> int:
    """Bytes :func:`pack_ring` makes of ``count`` words at ``k`` bits: ``ceil(count*k/8)``
    up to one padding byte per byte plane."""
    whole, rest = divmod(k, 8)
    return count * whole + (packed_nbytes(count, rest) if rest else 0)


def pack_ring(words: np.ndarray, k: int) -> bytes:
    """Pack ring elements at ``k`` bits each (the low ``k`` bits of each unsigned word).

    Layout: the low byte of every element (``count`` bytes), then the next byte, ..., then
    the top ``k % 8`` bits of every element packed by :func:`fedmpq.packing.pack_bits`.
    """
    w = np.asarray(words).reshape(-1)
    if w.dtype.kind != "u":
        raise SecAggError(f"ring elements must be unsigned words, got dtype {w.dtype}")
    whole, rest = divmod(k, 8)
    parts = [pack_bits((w >> (8 * i)).astype(np.uint8), 8, check=False) for i in range(whole)]
    if rest:
        top = ((w >> (8 * whole)) & ring_mask(rest)).astype(np.uint8)
        parts.append(pack_bits(top, rest, check=False))
    return b"".join(parts)


def unpack_ring(data: bytes, k: int, count: int) -> np.ndarray:
    """The ring elements (each below ``2**k``, as :func:`word_dtype` words) that
    :func:`pack_ring` packed.

    Raises
    ------
    DecodeError
        If ``data`` is not :func:`ring_nbytes` long.
    """
    if not 1 <= k <= MAX_RING_BITS:
        raise DecodeError(f"ring bits must be in 1..{MAX_RING_BITS}, got {k}")
    if len(data) != ring_nbytes(count, k):
        raise DecodeError(
            f"{count} ring elements at {k} bits are {ring_nbytes(count, k)} bytes, got {len(data)}"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    whole, rest = divmod(k, 8)
    dtype = word_dtype(k)
    out = np.zeros(count, dtype=dtype)
    for i in range(whole):
        out |= buf[i * count : (i + 1) * count].astype(dtype) << (8 * i)
    if rest:
        out |= unpack_bits(buf[whole * count :], rest, count).astype(dtype) << (8 * whole)
    return out


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise SecAggError(f"a grid scale must be finite and > 0, got {scale}")
