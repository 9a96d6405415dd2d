"""Fixed uniform precision: every layer of every client at the same n bits."""

from __future__ import annotations

from collections.abc import Sequence

from fedmpq.errors import ConfigError
from fedmpq.policies import register_policy
from fedmpq.policies.base import BitAllocation, ClientInfo, Policy
from fedmpq.wire.messages import QUANT_BITS


@register_policy
class FixedPolicy(Policy):
    """Uniform ``bits`` (1..8) on every quantizable layer, trained quantization-aware."""

    name = "fixed"

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if bits not in QUANT_BITS:
            raise ConfigError(f"fixed policy: bits must be 1..8, got {bits}")
        self.bits = bits

    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        return {client.client_id: self.uniform(self.bits) for client in clients}
