"""The messages of one secure-aggregation round, as plain dataclasses.

Fields are str, int, float, bytes and lists of those or of the small dataclasses here,
so the wire codec can carry them like every other message (and sign every frame).
Devices are named by ``client_id``; a device's Shamir index is its position in
``SecAggSetup.client_ids`` plus one.

Round steps (``U1 >= U2 >= U3`` are the devices still taking part after each step):

1. coordinator -> selected: :class:`SecAggSetup` (travels inside the task);
2. device -> coordinator: :class:`AdvertiseKeys`; coordinator -> U1: :class:`KeyRoster`;
3. device -> coordinator: :class:`ShareKeys` (one AEAD ciphertext per other member of U1);
   coordinator -> each of U2: :class:`ForwardedShares` (the ciphertexts addressed to it);
4. device -> coordinator: :class:`MaskedInput` (its grid codes plus masks, packed at k bits);
5. coordinator -> U3: :class:`UnmaskRequest`; device -> coordinator: :class:`UnmaskResponse`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class LayerGrid:
    """One layer's common integer grid: ``size`` codes at ``bits`` bits of ``scale``."""

    name: str
    size: int
    bits: int
    scale: float


@dataclass
class SecAggSetup:
    """Who takes part, the threshold and the grid (coordinator -> selected devices)."""

    MESSAGE_TYPE: ClassVar[str] = "secagg_setup"

    run_id: str
    round: int
    client_ids: list[str]
    threshold: int
    layers: list[LayerGrid]


@dataclass
class AdvertiseKeys:
    """A device's two fresh X25519 public keys for this round (device -> coordinator).

    ``cipher_key`` agrees the keys that encrypt the share exchange; ``mask_key`` agrees the
    pairwise mask seeds.  They are separate so that revealing a dropped device's mask key
    reveals nothing of the shares it received.
    """

    MESSAGE_TYPE: ClassVar[str] = "secagg_keys"

    run_id: str
    round: int
    client_id: str
    cipher_key: bytes
    mask_key: bytes


@dataclass
class KeyRoster:
    """Every advertised key of the round: U1 (coordinator -> U1)."""

    MESSAGE_TYPE: ClassVar[str] = "secagg_roster"

    run_id: str
    round: int
    keys: list[AdvertiseKeys]


@dataclass
class EncryptedShare:
    """``sender``'s shares for ``receiver`` of its self-mask seed and mask private key,
    encrypted and authenticated with their pairwise key."""

    sender: str
    receiver: str
    ciphertext: bytes


@dataclass
class ShareKeys:
    """A device's encrypted shares, one per other member of U1 (device -> coordinator)."""

    MESSAGE_TYPE: ClassVar[str] = "secagg_shares"

    run_id: str
    round: int
    client_id: str
    shares: list[EncryptedShare]


@dataclass
class ForwardedShares:
    """The shares addressed to ``client_id`` by every other member of U2 (coordinator -> it).

    The senders are U2: the devices a masked input is masked against.
    """

    MESSAGE_TYPE: ClassVar[str] = "secagg_forwarded"

    run_id: str
    round: int
    client_id: str
    shares: list[EncryptedShare]


@dataclass
class MaskedTensor:
    """One layer's masked codes: ``size`` ring elements packed at ``ring_bits`` bits."""

    name: str
    ring_bits: int
    data: bytes


@dataclass
class MaskedInput:
    """A device's masked update, layer by layer in the setup's order (device -> coordinator)."""

    MESSAGE_TYPE: ClassVar[str] = "secagg_masked"

    run_id: str
    round: int
    client_id: str
    tensors: list[MaskedTensor]


@dataclass
class UnmaskRequest:
    """Which devices' inputs are in the sum (``survivors``, U3) and which members of U2 sent
    none (``dropped``) (coordinator -> U3)."""

    MESSAGE_TYPE: ClassVar[str] = "secagg_unmask"

    run_id: str
    round: int
    survivors: list[str]
    dropped: list[str]


@dataclass
class RevealedShare:
    """A device's share of ``owner``'s secret, :data:`fedmpq.secagg.shamir.SHARE_BYTES` bytes."""

    owner: str
    share: bytes


@dataclass
class UnmaskResponse:
    """Shares of each survivor's self-mask seed and each dropped device's mask private key
    (device -> coordinator).  A device never reveals both for the same owner."""

    MESSAGE_TYPE: ClassVar[str] = "secagg_unmask_response"

    run_id: str
    round: int
    client_id: str
    self_mask_shares: list[RevealedShare]
    mask_key_shares: list[RevealedShare]
