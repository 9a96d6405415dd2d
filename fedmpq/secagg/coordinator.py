"""The coordinator's side of one secure-aggregation round.

:class:`SecureAggregation` routes keys and encrypted shares, folds each masked input into
one running sum modulo ``2**k`` as it arrives (memory O(model), whatever the number of
devices) and, once enough devices answer the unmasking request, removes the masks from
the sum.  It never sees an individual update unmasked: it only ever holds masked inputs,
their sum, and secrets that unmask nothing but the sum (the self-mask seeds of the devices
in the sum, the mask keys of those that are not).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from fedmpq.errors import DecodeError
from fedmpq.secagg import crypto, shamir
from fedmpq.secagg.device import SHARE_CIPHERTEXT_BYTES
from fedmpq.secagg.errors import SecAggError
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShares,
    KeyRoster,
    MaskedInput,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmpq.secagg.plan import plan_round
from fedmpq.secagg.ring import dequantize_sum, from_ring, unpack_ring


@dataclass(frozen=True)
class SecureSum:
    """The unmasked result: per layer, the integer sum of the contributors' grid codes."""

    contributors: tuple[str, ...]
    codes: dict[str, np.ndarray]  # int64, one per setup layer, flat

    def dequantized(self, setup: SecAggSetup) -> dict[str, np.ndarray]:
        """The float64 sum of the contributors' updates, per layer (divide for a mean)."""
        return {
            layer.name: dequantize_sum(self.codes[layer.name], layer.scale, layer.bits)
            for layer in setup.layers
        }


class SecureAggregation:
    """One round's secure aggregation at the coordinator.

    Feed each step's messages as they arrive (``add_*``), then close the step with the
    method that produces the next outgoing messages.  Every ``add_*`` raises
    :class:`SecAggError` for a message that does not fit the step (wrong round, unknown
    or repeated sender, sender that dropped earlier) and :class:`DecodeError` for
    malformed bytes; a rejected message changes nothing.  Calling a closing method again
    returns the same messages, to send again to a device that reconnected.
    """

    def __init__(self, setup: SecAggSetup) -> None:
        self.plan = plan_round(setup)
        self._keys: dict[str, AdvertiseKeys] = {}
        self._roster: KeyRoster | None = None
        self._shares: dict[str, ShareKeys] = {}
        self._inboxes: list[ForwardedShares] | None = None
        self._members: tuple[str, ...] = ()  # U2
        self._sum = np.zeros(self.plan.size, dtype=self.plan.word_dtype)
        self._contributors: list[str] = []  # U3
        self._request: UnmaskRequest | None = None
        self._responses: dict[str, UnmaskResponse] = {}

    # -- step 2: keys ------------------------------------------------------------------
    def add_keys(self, msg: AdvertiseKeys) -> None:
        """Take a device's advertised keys."""
        self._open("keys", self._roster is None)
        self._sender(msg.run_id, msg.round, msg.client_id, self.plan.client_ids, self._keys)
        crypto.check_public_key(msg.cipher_key, agree=True)
        crypto.check_public_key(msg.mask_key, agree=True)
        self._keys[msg.client_id] = msg

    def roster(self) -> KeyRoster:
        """Close key collection: the roster (U1) to send to every device in it."""
        if self._roster is None:
            self._enough("advertised keys", len(self._keys))
            self._roster = KeyRoster(self.plan.run_id, self.plan.round, list(self._keys.values()))
        return self._roster

    # -- step 3: encrypted shares ------------------------------------------------------
    def add_shares(self, msg: ShareKeys) -> None:
        """Take a device's encrypted shares; it must address each other member of U1 once."""
        self._open("shares", self._roster is not None and self._inboxes is None)
        self._sender(msg.run_id, msg.round, msg.client_id, tuple(self._keys), self._shares)
        receivers = [s.receiver for s in msg.shares]
        if sorted(receivers) != sorted(set(self._keys) - {msg.client_id}):
            raise SecAggError(f"{msg.client_id!r} must send one share to each other device of U1")
        for s in msg.shares:
            if s.sender != msg.client_id:
                raise SecAggError(f"{msg.client_id!r} sent a share in the name of {s.sender!r}")
            if len(s.ciphertext) != SHARE_CIPHERTEXT_BYTES:
                raise DecodeError(
                    f"a share ciphertext is {SHARE_CIPHERTEXT_BYTES} bytes, got {len(s.ciphertext)}"
                )
        self._shares[msg.client_id] = msg

    def forward_shares(self) -> list[ForwardedShares]:
        """Close share collection (U2 = the senders): each member's inbox to send it."""
        if self._inboxes is not None:
            return self._inboxes
        self._open("shares", self._roster is not None)
        self._enough("shared keys", len(self._shares))
        self._members = tuple(sorted(self._shares, key=self.plan.index))
        inbox: dict[str, list[EncryptedShare]] = {cid: [] for cid in self._members}
        for msg in self._shares.values():
            for s in msg.shares:
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        self._shares.clear()
        self._inboxes = [
            ForwardedShares(self.plan.run_id, self.plan.round, cid, items)
            for cid, items in inbox.items()
        ]
        return self._inboxes

    # -- step 4: masked inputs ---------------------------------------------------------
    def add_masked_input(self, msg: MaskedInput) -> None:
        """Fold a masked input into the running sum (it is dropped right after)."""
        self._open("masked inputs", self._inboxes is not None and self._request is None)
        self._sender(msg.run_id, msg.round, msg.client_id, self._members, self._contributors)
        if [t.name for t in msg.tensors] != [layer.name for layer in self.plan.layers]:
            raise DecodeError("a masked input must carry the setup's layers in order")
        words = []
        for t, layer, k in zip(msg.tensors, self.plan.layers, self.plan.ring_bits, strict=True):
            if t.ring_bits != k:
                raise DecodeError(
                    f"layer {layer.name!r} is masked in a {k}-bit ring, got {t.ring_bits}"
                )
            words.append(unpack_ring(t.data, k, layer.size))  # all decoded before any is added
        for w, (_, _, part) in zip(words, self.plan.segments(), strict=True):
            np.add(self._sum[part], w, out=self._sum[part])
        self._contributors.append(msg.client_id)

    def unmask_request(self) -> UnmaskRequest:
        """Close masked-input collection (U3 = the senders): the request to send to U3."""
        if self._request is not None:
            return self._request
        self._open("masked inputs", self._inboxes is not None)
        self._enough("sent masked inputs", len(self._contributors))
        survivors = sorted(self._contributors, key=self.plan.index)
        dropped = [cid for cid in self._members if cid not in self._contributors]
        self._request = UnmaskRequest(self.plan.run_id, self.plan.round, survivors, dropped)
        return self._request

    # -- step 5: unmasking -------------------------------------------------------------
    def add_unmask_response(self, msg: UnmaskResponse) -> None:
        """Take a survivor's shares for unmasking."""
        request = self._request
        self._open("unmasking responses", request is not None)
        assert request is not None
        self._sender(
            msg.run_id, msg.round, msg.client_id, tuple(request.survivors), self._responses
        )
        if [s.owner for s in msg.self_mask_shares] != request.survivors or [
            s.owner for s in msg.mask_key_shares
        ] != request.dropped:
            raise SecAggError(f"{msg.client_id!r} did not answer the request it was sent")
        for s in (*msg.self_mask_shares, *msg.mask_key_shares):
            shamir.decode_share(s.share)
        self._responses[msg.client_id] = msg

    def result(self) -> SecureSum:
        """Remove the masks from the sum: needs answers from at least the threshold.

        Raises
        ------
        SecAggError
            With too few answers, or if the shares reconstruct a mask key that does not match
            the key its device advertised (a device sent a wrong share).
        """
        request = self._request
        if request is None:
            raise SecAggError("unmasking has not been requested yet")
        self._enough("answered the unmasking request", len(self._responses))
        flat = self._sum.copy()
        seed_shares, key_shares = self._collected_shares()
        for owner in request.survivors:
            seed = shamir.combine(seed_shares[owner], self.plan.threshold, crypto.SEED_BYTES)
            self_mask = crypto.mask_words(seed, self.plan.size, self.plan.word_dtype)
            np.subtract(flat, self_mask, out=flat)
        for owner in request.dropped:
            raw = shamir.combine(key_shares[owner], self.plan.threshold, crypto.KEY_BYTES)
            key = crypto.load_private_key(raw)
            if crypto.public_bytes(key) != self._keys[owner].mask_key:
                raise SecAggError(f"the shares of {owner!r}'s mask key do not match its public key")
            for survivor in request.survivors:
                # The survivor applied this pair's mask with its own sign; take it back out.
                seed = self.plan.pair_seed(owner, key, survivor, self._keys[survivor].mask_key)
                self.plan.apply_pair_mask(flat, seed, owner, survivor)
        codes = {layer.name: from_ring(flat[part], k) for layer, k, part in self.plan.segments()}
        return SecureSum(tuple(request.survivors), codes)

    # -- checks ------------------------------------------------------------------------
    def _collected_shares(self) -> tuple[dict[str, dict[int, bytes]], dict[str, dict[int, bytes]]]:
        """Per owner, the responders' shares (by responder index) of its seed and of its key."""
        seeds: dict[str, dict[int, bytes]] = defaultdict(dict)
        keys: dict[str, dict[int, bytes]] = defaultdict(dict)
        for cid, response in self._responses.items():
            x = self.plan.index(cid)
            for s in response.self_mask_shares:
                seeds[s.owner][x] = s.share
            for s in response.mask_key_shares:
                keys[s.owner][x] = s.share
        return seeds, keys

    def _open(self, step: str, is_open: bool) -> None:
        if not is_open:
            raise SecAggError(f"the round is not collecting {step} now")

    def _enough(self, what: str, count: int) -> None:
        if count < self.plan.threshold:
            raise SecAggError(
                f"only {count} devices {what}; the threshold is {self.plan.threshold}: the round "
                "cannot be aggregated securely"
            )

    def _sender(
        self, run_id: str, round: int, sender: str, allowed: Container[str], seen: Container[str]
    ) -> None:
        self.plan.check_round(run_id, round)
        if sender not in allowed:
            raise SecAggError(f"{sender!r} is not expected at this step")
        if sender in seen:
            raise SecAggError(f"{sender!r} already sent this step's message")
