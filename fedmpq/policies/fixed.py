"""Fixed uniform precision: every layer of a client at the same n bits.

With ``use_budget`` each client gets its own budget (rounded down) on every layer --
the fixed-precision baseline of FedMPQ at heterogeneous budgets; otherwise everyone
gets ``bits``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmpq.errors import ConfigError
from fedmpq.policies import register_policy
from fedmpq.policies.base import BitAllocation, ClientInfo, Policy, client_bits
from fedmpq.quant_spec import QUANT_BITS


@register_policy
class FixedPolicy(Policy):
    """Uniform ``bits`` (1..8) on every quantizable layer, trained quantization-aware."""

    name = "fixed"

    # Anchored by default: its devices start from Q_b(w) (the quantized downlink), and
    # plain averaging of their weights loses every change under half a grid step.
    def __init__(self, bits: int = 4, use_budget: bool = False, anchored: bool = True) -> None:
        super().__init__(anchored)
        if bits not in QUANT_BITS:
            raise ConfigError(f"fixed policy: bits must be 1..8, got {bits}")
        self.bits = bits
        self.use_budget = use_budget

    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        if self.use_budget:
            return {c.client_id: self.uniform(client_bits(c, self.bits)) for c in clients}
        return {client.client_id: self.uniform(self.bits) for client in clients}
