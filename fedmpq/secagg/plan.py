"""What both sides derive from a :class:`SecAggSetup`: indices, rings, layout and masks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmpq.secagg import crypto
from fedmpq.secagg.errors import SecAggError
from fedmpq.secagg.messages import LayerGrid, SecAggSetup
from fedmpq.secagg.ring import GRID_BITS, ring_bits, word_dtype


@dataclass(frozen=True)
class RoundPlan:
    """A validated setup.  Layer ``i`` occupies ``flat[offsets[i]:offsets[i+1]]`` of the one
    vector of ``word_dtype`` words every device masks and the coordinator sums."""

    run_id: str
    round: int
    client_ids: tuple[str, ...]
    threshold: int
    layers: tuple[LayerGrid, ...]
    ring_bits: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def word_dtype(self) -> np.dtype:
        """Words wide enough for every layer's ring: the fewer bytes, the cheaper the masks."""
        return word_dtype(max(self.ring_bits, default=1))

    @property
    def size(self) -> int:
        """Codes in the whole update."""
        return self.offsets[-1]

    def segments(self) -> Iterator[tuple[LayerGrid, int, slice]]:
        """Each layer with its ring width and its slice of the flat vector."""
        for layer, k, lo, hi in zip(
            self.layers, self.ring_bits, self.offsets, self.offsets[1:], strict=False
        ):
            yield layer, k, slice(lo, hi)

    def index(self, client_id: str) -> int:
        """The Shamir index (1-based) of ``client_id``; :class:`SecAggError` if not selected."""
        try:
            return self.client_ids.index(client_id) + 1
        except ValueError:
            raise SecAggError(f"device {client_id!r} is not part of this round") from None

    def check_round(self, run_id: str, round: int) -> None:
        """Raise :class:`SecAggError` unless a message belongs to this run and round."""
        if (run_id, round) != (self.run_id, self.round):
            raise SecAggError(
                f"message for run {run_id!r} round {round}, expected run {self.run_id!r} "
                f"round {self.round}"
            )

    def pair_context(self, a: str, b: str) -> bytes:
        """HKDF info naming the run, the round and the unordered pair ``a``, ``b``."""
        lo, hi = sorted((self.index(a), self.index(b)))
        return crypto.context(self.run_id, self.round, lo, hi)

    def share_context(self, sender: str, receiver: str) -> bytes:
        """AEAD associated data of a share ciphertext from ``sender`` to ``receiver``."""
        return crypto.context(self.run_id, self.round, sender, receiver)

    def pair_seed(
        self, own: str, own_mask_key: X25519PrivateKey, peer: str, peer_mask_key: bytes
    ) -> bytes:
        """The seed of the mask ``own`` and ``peer`` add with opposite signs."""
        return crypto.derive(
            own_mask_key, peer_mask_key, crypto.PURPOSE_MASK, self.pair_context(own, peer)
        )

    def share_key(
        self, own: str, own_cipher_key: X25519PrivateKey, peer: str, peer_cipher_key: bytes
    ) -> bytes:
        """The AEAD key of the share exchange between ``own`` and ``peer``."""
        return crypto.derive(
            own_cipher_key, peer_cipher_key, crypto.PURPOSE_SHARES, self.pair_context(own, peer)
        )

    def apply_pair_mask(self, flat: np.ndarray, seed: bytes, own: str, peer: str) -> None:
        """Add (lower index) or subtract (higher) the pair's mask to ``flat`` in place."""
        mask = crypto.mask_words(seed, self.size, self.word_dtype)
        if self.index(own) < self.index(peer):
            np.add(flat, mask, out=flat)
        else:
            np.subtract(flat, mask, out=flat)


def plan_round(setup: SecAggSetup) -> RoundPlan:
    """Validate ``setup`` and derive its plan.

    Raises
    ------
    SecAggError
        For duplicate or missing devices, a threshold outside ``2..n``, duplicate layer
        names, grid bits outside 1..8, a non-positive or non-finite scale or a negative size.
    """
    ids = tuple(setup.client_ids)
    n = len(ids)
    if n < 2 or len(set(ids)) != n:
        raise SecAggError(f"secure aggregation needs two or more distinct devices, got {ids}")
    if not 2 <= setup.threshold <= n:
        raise SecAggError(f"threshold must be in 2..{n}, got {setup.threshold}")
    names = [layer.name for layer in setup.layers]
    if len(set(names)) != len(names):
        raise SecAggError(f"layer names must be distinct, got {names}")
    offsets = [0]
    for layer in setup.layers:
        if layer.bits not in GRID_BITS:
            raise SecAggError(f"layer {layer.name!r}: grid bits must be in 1..8, got {layer.bits}")
        if not (math.isfinite(layer.scale) and layer.scale > 0):
            raise SecAggError(f"layer {layer.name!r}: scale must be finite and > 0")
        if layer.size < 0:
            raise SecAggError(f"layer {layer.name!r}: size must be >= 0, got {layer.size}")
        offsets.append(offsets[-1] + layer.size)
    return RoundPlan(
        run_id=setup.run_id,
        round=setup.round,
        client_ids=ids,
        threshold=setup.threshold,
        layers=tuple(setup.layers),
        ring_bits=tuple(ring_bits(layer.bits, n) for layer in setup.layers),
        offsets=tuple(offsets),
    )


def default_threshold(devices: int) -> int:
    """A strict majority: no two disjoint groups of devices can each reach it."""
    return devices // 2 + 1
