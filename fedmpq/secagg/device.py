"""A device's side of one secure-aggregation round: keys, shares, masking, unmasking help.

A :class:`DeviceSession` lives for one round and answers each step once.  It keeps its
private keys, its self-mask seed and the shares other devices sent it; it never sends
its unmasked codes anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from fedmpq.secagg import crypto, shamir
from fedmpq.secagg.errors import SecAggError
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShares,
    KeyRoster,
    MaskedInput,
    MaskedTensor,
    RevealedShare,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmpq.secagg.plan import plan_round
from fedmpq.secagg.ring import lift, pack_ring, ring_mask, to_ring

_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES  # self-seed share, then mask-key share
#: Bytes of one :class:`EncryptedShare` ciphertext: two shares and the Poly1305 tag.
SHARE_CIPHERTEXT_BYTES = _PLAINTEXT_BYTES + 16


class DeviceSession:
    """One device in one round.  Call the steps in order.

    Each step answers one question: asked the same again (the coordinator re-sent it) it
    gives the same answer; asked something different it raises :class:`SecAggError`, since
    two different unmasking answers could reveal an input.

    Parameters
    ----------
    client_id
        This device; must be in ``setup.client_ids``.
    setup
        The round's setup from the coordinator.
    """

    def __init__(self, client_id: str, setup: SecAggSetup) -> None:
        self.plan = plan_round(setup)
        self.client_id = client_id
        self._index = self.plan.index(client_id)
        self._cipher_key = crypto.new_private_key()
        self._mask_key = crypto.new_private_key()
        self._self_seed = os.urandom(crypto.SEED_BYTES)
        self._roster: dict[str, AdvertiseKeys] = {}
        self._members: list[str] = []  # U2, set when masking
        # owner -> (share of its self-mask seed, share of its mask private key)
        self._held: dict[str, tuple[bytes, bytes]] = {}
        # (question, answer) of each step once answered
        self._shared: tuple[KeyRoster, ShareKeys] | None = None
        self._masked: tuple[ForwardedShares, MaskedInput] | None = None
        self._unmasked: tuple[UnmaskRequest, UnmaskResponse] | None = None

    def advertise(self) -> AdvertiseKeys:
        """Step 2: this round's public keys."""
        return AdvertiseKeys(
            run_id=self.plan.run_id,
            round=self.plan.round,
            client_id=self.client_id,
            cipher_key=crypto.public_bytes(self._cipher_key),
            mask_key=crypto.public_bytes(self._mask_key),
        )

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Step 3: Shamir-share the self-mask seed and the mask private key among U1.

        Raises
        ------
        SecAggError
            If the roster is from another round, names a device twice or one not selected,
            leaves this device out or misquotes its keys, or is smaller than the threshold.
        """
        again = _same_answer(self._shared, roster, "the shares")
        if again is not None:
            return again
        self.plan.check_round(roster.run_id, roster.round)
        keys: dict[str, AdvertiseKeys] = {}
        for entry in roster.keys:
            self.plan.index(entry.client_id)
            if entry.client_id in keys:
                raise SecAggError(f"the roster names {entry.client_id!r} twice")
            crypto.check_public_key(entry.cipher_key)
            crypto.check_public_key(entry.mask_key)
            keys[entry.client_id] = entry
        if keys.get(self.client_id) != self.advertise():
            raise SecAggError("the roster does not carry this device's own keys")
        if len(keys) < self.plan.threshold:
            raise SecAggError(
                f"{len(keys)} devices advertised keys; the threshold is {self.plan.threshold}"
            )
        indices = {cid: self.plan.index(cid) for cid in keys}
        threshold = self.plan.threshold
        seed_shares = shamir.split(self._self_seed, threshold, list(indices.values()))
        key_shares = shamir.split(
            crypto.private_bytes(self._mask_key), threshold, list(indices.values())
        )
        out = []
        for peer, entry in keys.items():
            if peer == self.client_id:
                continue
            x = indices[peer]
            key = self.plan.share_key(self.client_id, self._cipher_key, peer, entry.cipher_key)
            ciphertext = crypto.seal(
                key,
                self._index,
                x,
                seed_shares[x] + key_shares[x],
                self.plan.share_context(self.client_id, peer),
            )
            out.append(EncryptedShare(sender=self.client_id, receiver=peer, ciphertext=ciphertext))
        # Only now, with every ciphertext made, does the device commit to this roster.
        self._roster = keys
        self._held[self.client_id] = (seed_shares[self._index], key_shares[self._index])
        answer = ShareKeys(
            run_id=self.plan.run_id, round=self.plan.round, client_id=self.client_id, shares=out
        )
        self._shared = (roster, answer)
        return answer

    def masked_input(
        self,
        inbox: ForwardedShares,
        codes: Mapping[str, np.ndarray],
        bits: Mapping[str, int],
    ) -> MaskedInput:
        """Step 4: this device's grid codes, lifted to the round's grid and masked.

        Parameters
        ----------
        inbox
            The shares the other members of U2 sent this device.
        codes
            Per layer of the setup, this device's signed codes (see
            :func:`fedmpq.secagg.ring.grid_codes`), ``size`` of them in C order.
        bits
            Per layer, the precision ``codes`` are at (at most the layer's grid bits).

        Raises
        ------
        SecAggError
            If the inbox is from another round, for another device or from a device
            outside U1, if U2 is below the threshold, or the codes do not fit the grid.
        DecodeError
            If a share ciphertext fails authentication.
        """
        if not self._roster:
            raise SecAggError("shares must be exchanged before masking")
        again = _same_answer(self._masked, inbox, "the masked input")
        if again is not None:
            return again
        self.plan.check_round(inbox.run_id, inbox.round)
        if inbox.client_id != self.client_id:
            raise SecAggError(f"shares for {inbox.client_id!r} reached {self.client_id!r}")
        members = self._open_shares(inbox)
        if len(members) < self.plan.threshold:
            raise SecAggError(
                f"only {len(members)} devices shared keys; the threshold is {self.plan.threshold}"
            )
        flat = self._masked_words(codes, bits, members)
        self._members = sorted(members)
        masked = MaskedInput(
            run_id=self.plan.run_id,
            round=self.plan.round,
            client_id=self.client_id,
            tensors=self._ring_tensors(flat),
        )
        self._masked = (inbox, masked)
        return masked

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Step 5: shares of the survivors' self-mask seeds and the dropped devices' mask keys.

        Raises
        ------
        SecAggError
            If this device already answered, did not mask, or the request would reveal an
            update: a device in both lists, a device outside U2, a list naming this device as
            dropped, or fewer survivors than the threshold.
        """
        if not self._members:
            raise SecAggError("nothing to unmask: this device sent no masked input")
        again = _same_answer(self._unmasked, request, "the unmasking answer")
        if again is not None:
            return again
        self.plan.check_round(request.run_id, request.round)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggError("the unmasking request names a device twice")
        if survivors & dropped:
            raise SecAggError(
                f"refusing to reveal both secrets of {sorted(survivors & dropped)}: "
                "that would unmask their inputs"
            )
        if survivors | dropped != set(self._members):
            raise SecAggError("the unmasking request does not split the devices that shared keys")
        if self.client_id not in survivors:
            raise SecAggError("the unmasking request lists this device as dropped")
        if len(survivors) < self.plan.threshold:
            raise SecAggError(
                f"{len(survivors)} survivors are below the threshold {self.plan.threshold}"
            )
        response = UnmaskResponse(
            run_id=self.plan.run_id,
            round=self.plan.round,
            client_id=self.client_id,
            self_mask_shares=[RevealedShare(o, self._held[o][0]) for o in sorted(survivors)],
            mask_key_shares=[RevealedShare(o, self._held[o][1]) for o in sorted(dropped)],
        )
        self._unmasked = (request, response)
        return response

    def _open_shares(self, inbox: ForwardedShares) -> set[str]:
        """Decrypt and keep the shares in ``inbox``; returns U2 (this device and the senders)."""
        members = {self.client_id}
        for item in inbox.shares:
            peer = item.sender
            if peer not in self._roster or peer in members or item.receiver != self.client_id:
                raise SecAggError(f"unexpected share from {peer!r} to {item.receiver!r}")
            key = self.plan.share_key(
                self.client_id, self._cipher_key, peer, self._roster[peer].cipher_key
            )
            plaintext = crypto.open_sealed(
                key,
                self.plan.index(peer),
                self._index,
                item.ciphertext,
                self.plan.share_context(peer, self.client_id),
            )
            if len(plaintext) != _PLAINTEXT_BYTES:
                raise SecAggError(f"the share from {peer!r} has the wrong length")
            self._held[peer] = (plaintext[: shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES :])
            members.add(peer)
        return members

    def _masked_words(
        self, codes: Mapping[str, np.ndarray], bits: Mapping[str, int], members: set[str]
    ) -> np.ndarray:
        """All layers' lifted codes plus the self mask and the pairwise masks with U2."""
        flat = self._lifted(codes, bits)
        self_mask = crypto.mask_words(self._self_seed, self.plan.size, self.plan.word_dtype)
        np.add(flat, self_mask, out=flat)
        for peer in members - {self.client_id}:
            seed = self.plan.pair_seed(
                self.client_id, self._mask_key, peer, self._roster[peer].mask_key
            )
            self.plan.apply_pair_mask(flat, seed, self.client_id, peer)
        return flat

    def _ring_tensors(self, flat: np.ndarray) -> list[MaskedTensor]:
        """``flat`` cut into layers, each reduced to and packed at its ring width."""
        tensors = []
        for layer, k, part in self.plan.segments():
            words = flat[part] & ring_mask(k)
            tensors.append(MaskedTensor(name=layer.name, ring_bits=k, data=pack_ring(words, k)))
        return tensors

    def _lifted(self, codes: Mapping[str, np.ndarray], bits: Mapping[str, int]) -> np.ndarray:
        flat = np.empty(self.plan.size, dtype=self.plan.word_dtype)
        for layer, _, part in self.plan.segments():
            if layer.name not in codes or layer.name not in bits:
                raise SecAggError(f"no codes for layer {layer.name!r}")
            c = np.asarray(codes[layer.name])
            if c.size != layer.size:
                raise SecAggError(f"layer {layer.name!r} has {layer.size} codes, got {c.size}")
            lifted = lift(c.reshape(-1), bits[layer.name], layer.bits)
            flat[part] = to_ring(lifted, flat.dtype)
        return flat


Q = TypeVar("Q")
A = TypeVar("A")


def _same_answer(answered: tuple[Q, A] | None, question: Q, what: str) -> A | None:
    """The answer already given to ``question``; None if the step was not answered yet."""
    if answered is None:
        return None
    if answered[0] != question:
        raise SecAggError(f"{what} went out already this round, for a different request")
    return answered[1]
