"""QSGD-style update compression with error feedback kept on the device.

Clients train in float32 and send the delta to the global model, quantized per layer
with the symmetric scheme (scale ``max|delta|``) and *stochastic* rounding, which is
unbiased like QSGD's (QSGD scales by the l2 norm; fedmpq's wire scale is ``max|x|``).
What quantization leaves out is kept on the device and added to the next round's
delta (error feedback), so nothing is lost for good: after any number of rounds
``sum(sent) + residual == sum(true deltas)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from fedmpq.errors import ConfigError
from fedmpq.policies import register_policy
from fedmpq.policies.base import BitAllocation, ClientHooks, ClientInfo, Policy, client_bits
from fedmpq.quant import Rounding
from fedmpq.quant_spec import QUANT_BITS
from fedmpq.wire.messages import KIND_DELTA, TensorPayload
from fedmpq.wire.tensors import decode_state

#: Error-feedback residuals live in the device's memory under this prefix.
RESIDUAL = "qsgd.residual."


class QSGDHooks(ClientHooks):
    """Float training; the delta plus the residual is sent stochastically rounded."""

    def attach(self, model: nn.Module) -> None:
        """Nothing: the model trains in float32, only its update is quantized."""

    def detach(self, model: nn.Module) -> None:
        """Nothing was attached."""

    def make_update(
        self,
        local: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        kind: str,
    ) -> tuple[list[TensorPayload], dict[str, int]]:
        corrected = {}
        for name, w in local.items():
            delta = w - global_state[name]
            if name in self.quantized:
                delta = delta + self.memory.get(RESIDUAL + name, 0.0)
            corrected[name] = delta.astype(np.float32)
        tensors = self.encode(corrected, self.bits, Rounding.STOCHASTIC)
        sent = decode_state(tensors)
        for name in self.quantized:
            self.memory[RESIDUAL + name] = corrected[name] - sent[name]
        return tensors, {}


@register_policy
class QSGDPolicy(Policy):
    """Uniform ``bits`` per client (its budget, rounded down, when known) for the delta."""

    name = "qsgd"
    update_kind = KIND_DELTA
    hooks = QSGDHooks
    # Clients train in float and send w_local - w: they need w itself, and the
    # coordinator adds the mean delta to w, so the downlink stays float32.
    starts_quantized = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if bits not in QUANT_BITS:
            raise ConfigError(f"qsgd policy: bits must be 1..8, got {bits}")
        self.bits = bits

    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        return {c.client_id: self.uniform(client_bits(c, self.bits)) for c in clients}
