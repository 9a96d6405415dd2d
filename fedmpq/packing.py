"""Exact n-bit packing of integer codes (n in 1..8), vectorised with numpy.

Layout: element ``i`` occupies stream bits ``[i*n, (i+1)*n)``, stream bit ``k``
being bit ``k % 8`` (least significant first) of byte ``k // 8``.  This is the
order ONNX uses for its packed INT4/INT2 tensors, so exported weights can reuse
the bytes.  A tensor of ``count`` codes takes exactly ``ceil(count*n/8)`` bytes.
"""

from __future__ import annotations


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` elements take at ``bits`` bits each (1..8, 16 or 32)."""
    return (count * bits + 7) // 8
