"""Shamir t-of-n secret sharing of short byte strings over the prime field GF(2**521 - 1).

A secret of up to 64 bytes is read as one big-endian integer below the prime, the
constant term of a random polynomial of degree ``threshold - 1``; a device's share is
that polynomial at its index (1, 2, ...).  Any ``threshold`` shares give the secret back
by Lagrange interpolation at 0; fewer give a value that is uniformly random in the field,
i.e. say nothing about the secret.  The Mersenne prime is used because it is well known to
be prime and larger than any 512-bit secret, so no secret needs splitting into pieces.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence

from fedmpq.errors import DecodeError
from fedmpq.secagg.errors import SecAggError

PRIME = (1 << 521) - 1
#: Bytes of one encoded share value (big-endian, below ``PRIME``).
SHARE_BYTES = (PRIME.bit_length() + 7) // 8
#: Longest secret that fits below ``PRIME`` whatever its bytes.
MAX_SECRET_BYTES = 64


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` among the devices at ``indices`` so that any ``threshold`` recover it.

    Parameters
    ----------
    secret
        At most :data:`MAX_SECRET_BYTES` bytes.
    threshold
        Shares needed to reconstruct, ``1 <= threshold <= len(indices)``.
    indices
        Distinct x-coordinates in ``1 .. PRIME - 1`` (a device's position in the round).

    Returns
    -------
    dict of int to bytes
        Each index's share, :data:`SHARE_BYTES` bytes.
    """
    if len(secret) > MAX_SECRET_BYTES:
        raise SecAggError(f"a shared secret is at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(indices)) != len(indices) or not all(0 < x < PRIME for x in indices):
        raise SecAggError(f"share indices must be distinct and in 1..PRIME-1, got {indices}")
    if not 1 <= threshold <= len(indices):
        raise SecAggError(f"threshold must be in 1..{len(indices)}, got {threshold}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _encode(_evaluate(coefficients, x)) for x in indices}


def combine(shares: Mapping[int, bytes], threshold: int, secret_bytes: int) -> bytes:
    """The secret behind ``threshold`` or more shares.

    Parameters
    ----------
    shares
        Share bytes by device index; only the first ``threshold`` (by index) are used.
    threshold
        The threshold the secret was split with.
    secret_bytes
        Length of the secret.

    Raises
    ------
    SecAggError
        With fewer than ``threshold`` shares, or if the shares interpolate to a value
        longer than ``secret_bytes`` (they do not belong to one secret).
    DecodeError
        If a share is not :data:`SHARE_BYTES` bytes or not below the prime.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    chosen = sorted(shares.items())[:threshold]
    value = interpolate_at_zero((x, decode_share(y)) for x, y in chosen)
    if value >> (8 * secret_bytes):
        raise SecAggError("the shares do not belong to one secret (the result is too long)")
    return value.to_bytes(secret_bytes, "big")


def interpolate_at_zero(points: Iterable[tuple[int, int]]) -> int:
    """Lagrange interpolation at x = 0 of the polynomial through ``points`` (mod ``PRIME``)."""
    pts = list(points)
    total = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def decode_share(data: bytes) -> int:
    """A share's field element; raises :class:`DecodeError` for bad bytes."""
    if len(data) != SHARE_BYTES:
        raise DecodeError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise DecodeError("a share value is not below the field's prime")
    return value


def _encode(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc
