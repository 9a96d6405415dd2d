"""Aggregation rules, one module each, chosen by the policy (see ``base``)."""

from coordinator.aggregation import anchored, delta, fedavg  # noqa: F401  (registers the rules)
from coordinator.aggregation.anchored import start_error
from coordinator.aggregation.base import (
    AggregationRule,
    Quantization,
    make_rule,
    register_rule,
    rule_name,
)
from coordinator.aggregation.streaming import StreamingAverage, update_norm

__all__ = [
    "AggregationRule",
    "Quantization",
    "StreamingAverage",
    "make_rule",
    "register_rule",
    "rule_name",
    "start_error",
    "update_norm",
]
