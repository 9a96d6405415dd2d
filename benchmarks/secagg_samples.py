"""Valid secure-aggregation frames with random contents, for the decoder fuzz harness."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmpq.secagg.device import SHARE_CIPHERTEXT_BYTES
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShares,
    KeyRoster,
    LayerGrid,
    MaskedInput,
    MaskedTensor,
    RevealedShare,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmpq.secagg.shamir import SHARE_BYTES
from fedmpq.wire.codec import Message

Rng = np.random.Generator
Text = Callable[[Rng], str]


def random_setup(rng: Rng, text: Text) -> SecAggSetup:
    """A setup of random names and sizes (not necessarily one a device accepts)."""
    layers = [
        LayerGrid(text(rng), int(rng.integers(0, 64)), int(rng.integers(1, 9)), 0.5)
        for _ in range(int(rng.integers(0, 4)))
    ]
    ids = [text(rng) for _ in range(int(rng.integers(2, 6)))]
    return SecAggSetup(text(rng), int(rng.integers(0, 1000)), ids, 2, layers)


def secagg_messages(rng: Rng, text: Text) -> list[Message]:
    """One of each secure-aggregation step, random keys, shares and masked words."""
    run, round, who = text(rng), int(rng.integers(0, 1000)), text(rng)
    keys = AdvertiseKeys(run, round, who, rng.bytes(32), rng.bytes(32))
    shares = [EncryptedShare(who, text(rng), rng.bytes(SHARE_CIPHERTEXT_BYTES)) for _ in range(3)]
    revealed = [RevealedShare(text(rng), rng.bytes(SHARE_BYTES)) for _ in range(2)]
    k = int(rng.integers(1, 33))
    masked = [MaskedTensor(text(rng), k, rng.bytes(int(rng.integers(0, 64)))) for _ in range(2)]
    return [
        keys,
        KeyRoster(run, round, [keys, keys]),
        ShareKeys(run, round, who, shares),
        ForwardedShares(run, round, who, shares),
        MaskedInput(run, round, who, masked),
        UnmaskRequest(run, round, [who, text(rng)], [text(rng)]),
        UnmaskResponse(run, round, who, revealed, revealed[:1]),
    ]
