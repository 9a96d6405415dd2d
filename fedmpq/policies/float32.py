"""Plain FedAvg: every layer travels as float32."""

from __future__ import annotations

from collections.abc import Sequence

from fedmpq.policies import register_policy
from fedmpq.policies.base import BitAllocation, ClientInfo, Policy


@register_policy
class Float32Policy(Policy):
    """Full precision for everyone: the baseline every other policy is measured against."""

    name = "float32"

    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        return {client.client_id: self.uniform(32) for client in clients}
