"""Exact n-bit packing of integer codes (n in 1..8), vectorised with numpy.

Layout: element ``i`` occupies stream bits ``[i*n, (i+1)*n)``, stream bit ``k``
being bit ``k % 8`` (least significant first) of byte ``k // 8``.  This is the
order ONNX uses for its packed INT4/INT2 tensors, so exported weights can reuse
the bytes.  A tensor of ``count`` codes takes exactly ``ceil(count*n/8)`` bytes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cache

import numpy as np

from fedmpq.errors import DecodeError

# Eight codes of n bits are exactly n bytes, so the kernels work on groups of
# eight one-byte codes viewed as one little-endian 64-bit word.  The explicit
# '<u8' keeps the byte order right on big-endian hosts as well.
_WORD = np.dtype("<u8")

# Words processed per step (512 KiB per buffer).  Working on cache-sized chunks
# makes the dozen shift/mask passes cost little more than one pass through main
# memory; much smaller chunks lose more to per-call overhead than they gain.
_CHUNK_WORDS = 1 << 16


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` elements take at ``bits`` bits each (1..8, 16 or 32)."""
    return (count * bits + 7) // 8


def _lane_mask(lane_bits: int, lo: int, hi: int) -> np.uint64:
    """A 64-bit mask with bits ``[lo, hi)`` set inside every ``lane_bits``-wide lane."""
    lane = ((1 << hi) - 1) ^ ((1 << lo) - 1)
    word = 0
    for start in range(0, 64, lane_bits):
        word |= lane << start
    return np.uint64(word)


@dataclass(frozen=True)
class _Level:
    """One step of the lane tree: each pair of adjacent lanes becomes one lane.

    Both lanes of a pair hold a field of the same width at their bottom.
    Packing moves the upper field down by ``shift`` so it sits right above the
    lower one; unpacking moves it back up.  The masks repeat in every pair.
    """

    shift: int
    low: np.uint64  # the lower lane's field
    high_packed: np.uint64  # the upper lane's field once packed against the lower
    high_unpacked: np.uint64  # the upper lane's field at its own lane position


@dataclass(frozen=True)
class _Plan:
    """How ``bits``-bit codes are squeezed together inside a 64-bit word.

    After ``levels``, each lane of the word starts with the packed bytes of its
    codes; the stream is those bytes, lane by lane.  ``lane`` is a structured
    dtype with one lane as its item and those bytes as its only field, ``chunk``.
    """

    levels: tuple[_Level, ...]
    lane: np.dtype


@cache
def _plan(bits: int) -> _Plan:
    # Merging lanes pairwise halves their number.  n=4 is done after one level
    # and n=2 after two, as each lane then holds one whole byte; every other n
    # goes up to the full word, where the final strided copy of the kept bytes
    # is cheapest because it has the fewest, widest items.
    levels = []
    lane_bits, field = 8, bits
    while field != 8 and lane_bits < 64:
        pair = 2 * lane_bits
        levels.append(
            _Level(
                shift=lane_bits - field,
                low=_lane_mask(pair, 0, field),
                high_packed=_lane_mask(pair, field, 2 * field),
                high_unpacked=_lane_mask(pair, lane_bits, lane_bits + field),
            )
        )
        lane_bits, field = pair, 2 * field
    lane = np.dtype(
        {
            "names": ["chunk"],
            "formats": [f"V{field // 8}"],
            "offsets": [0],
            "itemsize": lane_bits // 8,
        }
    )
    return _Plan(tuple(levels), lane)


def _lanes(words: np.ndarray, plan: _Plan) -> np.ndarray:
    """The packed bytes of ``words`` as a strided view, one item per lane."""
    return words.view(np.uint8).view(plan.lane)["chunk"]


def _stream(packed: np.ndarray, plan: _Plan) -> np.ndarray:
    """Contiguous packed bytes viewed with the same items as :func:`_lanes`."""
    return packed.reshape(-1).view(plan.lane["chunk"])


def _pack_words(words: np.ndarray, out: np.ndarray, plan: _Plan, scratch: np.ndarray) -> None:
    """Pack ``words`` (read-only) into ``out`` (``bits`` bytes per word).

    ``scratch`` holds two buffers at least as long as ``words``.
    """
    acc, tmp = scratch[0, : words.size], scratch[1, : words.size]
    src = words
    for level in plan.levels:
        np.right_shift(src, level.shift, out=tmp)
        tmp &= level.high_packed
        np.bitwise_and(src, level.low, out=acc)
        acc |= tmp
        src = acc
    np.copyto(_stream(out, plan), _lanes(src, plan))


def _unpack_words(data: np.ndarray, words: np.ndarray, plan: _Plan, tmp: np.ndarray) -> None:
    """Unpack ``data`` (``bits`` bytes per word) into ``words``, in place.

    ``tmp`` is scratch at least as long as ``words``.  The bytes of ``words``
    outside the copied lanes start as garbage; every level masks its fields, so
    that garbage never reaches the codes and each code is below ``2**bits``.
    """
    tmp = tmp[: words.size]
    np.copyto(_lanes(words, plan), _stream(data, plan))
    for level in reversed(plan.levels):
        np.left_shift(words, level.shift, out=tmp)
        tmp &= level.high_unpacked
        words &= level.low
        words |= tmp


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def _check_codes(flat: np.ndarray, bits: int) -> None:
    if flat.size == 0:
        return
    top = (1 << bits) - 1
    high = int(flat.max())
    if high > top:
        raise ValueError(
            f"max code {high} does not fit in {bits} bits (0..{top}); "
            "quantize to this bit-width before packing"
        )
    low = int(flat.min()) if flat.dtype.kind == "i" else 0
    if low < 0:
        raise ValueError(f"min code {low} is negative; {bits}-bit codes must be in 0..{top}")


def pack_bits(codes: np.ndarray, bits: int, *, check: bool = True) -> bytes:
    """Pack unsigned integer codes at ``bits`` bits each, in the module's layout.

    Parameters
    ----------
    codes
        Integer array of any shape, read in C order; every code must be in
        ``0 .. 2**bits - 1``.  Not modified.
    bits
        Bits per code, 1..8.
    check
        Verify the codes' range first.  With ``check=False`` the caller
        guarantees it, and any code out of range is packed as its low ``bits``
        bits.

    Returns
    -------
    bytes
        Exactly ``packed_nbytes(codes.size, bits)`` bytes; padding bits in the
        last byte are zero.

    Raises
    ------
    ValueError
        If ``bits`` is not in 1..8 or (with ``check``) a code is out of range.
    TypeError
        If ``codes`` is not an integer array.
    """
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "ui":
        raise TypeError(f"codes must be an integer array, got dtype {codes.dtype}")
    flat = np.ascontiguousarray(codes).reshape(-1)
    if check:
        _check_codes(flat, bits)
    if flat.dtype != np.uint8:
        # Truncation keeps the low 8 bits, so unchecked codes still pack as their low bits.
        flat = flat.astype(np.uint8)

    count = flat.size
    plan = _plan(bits)
    out = np.empty(packed_nbytes(count, bits), dtype=np.uint8)
    body_words = count // 8
    words = flat[: body_words * 8].view(_WORD)
    body = out[: body_words * bits].reshape(body_words, bits)
    scratch = np.empty((2, max(1, min(body_words, _CHUNK_WORDS))), dtype=_WORD)
    for start in range(0, body_words, _CHUNK_WORDS):
        stop = start + _CHUNK_WORDS
        _pack_words(words[start:stop], body[start:stop], plan, scratch)

    tail = count - body_words * 8
    if tail:
        # Zero codes fill the last word, which is what makes the padding bits zero.
        last = np.zeros(8, dtype=np.uint8)
        last[:tail] = flat[body_words * 8 :]
        packed = np.empty((1, bits), dtype=np.uint8)
        _pack_words(last.view(_WORD), packed, plan, scratch)
        out[body_words * bits :] = packed[0, : out.size - body_words * bits]
    return out.tobytes()


def _packed_buffer(
    data: bytes | bytearray | memoryview | np.ndarray, bits: int, count: int
) -> np.ndarray:
    """``data`` as a flat ``uint8`` view, checked to hold exactly ``count`` codes."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"packed data must be a uint8 array, got dtype {data.dtype}")
        buf = data.reshape(-1)
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    expected = packed_nbytes(count, bits)
    if buf.size != expected:
        raise DecodeError(
            f"packed data for {count} codes of {bits} bits must be {expected} bytes, got {buf.size}"
        )
    return buf


def unpack_bits(
    data: bytes | bytearray | memoryview | np.ndarray, bits: int, count: int
) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits each, written by :func:`pack_bits`.

    Parameters
    ----------
    data
        The packed bytes (a ``uint8`` array is taken as its bytes).  Not modified.
    bits
        Bits per code, 1..8.
    count
        Number of codes to unpack, >= 0.

    Returns
    -------
    numpy.ndarray
        A new 1-D ``uint8`` array of ``count`` codes, each below ``2**bits``.
        Padding bits in the last byte are ignored.

    Raises
    ------
    DecodeError
        If ``len(data)`` is not ``packed_nbytes(count, bits)``.
    ValueError
        If ``bits`` is not in 1..8 or ``count`` is negative.
    TypeError
        If ``data`` is an array whose dtype is not ``uint8``.
    """
    bits = _check_bits(bits)
    count = operator.index(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    buf = _packed_buffer(data, bits, count)

    plan = _plan(bits)
    out = np.empty(count, dtype=np.uint8)
    body_words = count // 8
    words = out[: body_words * 8].view(_WORD)
    body = buf[: body_words * bits].reshape(body_words, bits)
    tmp = np.empty(max(1, min(body_words, _CHUNK_WORDS)), dtype=_WORD)
    for start in range(0, body_words, _CHUNK_WORDS):
        stop = start + _CHUNK_WORDS
        _unpack_words(body[start:stop], words[start:stop], plan, tmp)

    tail = count - body_words * 8
    if tail:
        last = np.zeros((1, bits), dtype=np.uint8)
        last[0, : buf.size - body_words * bits] = buf[body_words * bits :]
        codes = np.empty(1, dtype=_WORD)
        _unpack_words(last, codes, plan, tmp)
        out[body_words * 8 :] = codes.view(np.uint8)[:tail]
    return out
