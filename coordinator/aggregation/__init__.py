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
from coordinator.aggregation.robust import AdaptiveClip, change_norm
from coordinator.aggregation.streaming import StreamingAverage

__all__ = [
    "AdaptiveClip",
    "AggregationRule",
    "Quantization",
    "StreamingAverage",
    "change_norm",
    "make_rule",
    "register_rule",
    "rule_name",
    "start_error",
]
