"""Delta updates (QSGD): devices send a change, the mean change is added to the model."""

from __future__ import annotations

from coordinator.aggregation.base import AggregationRule, State, register_rule
from fedmpq.wire.messages import KIND_DELTA


@register_rule("delta")
class DeltaRule(AggregationRule):
    """New model = global model + sample-weighted mean of the deltas."""

    name = "delta"
    kind = KIND_DELTA

    def result(self) -> State:
        mean = self.average.mean()
        return {n: self.global_state[n] + d for n, d in mean.items()}
