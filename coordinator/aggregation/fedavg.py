"""Weighted FedAvg: the sample-weighted mean of the devices' weights is the new model."""

from __future__ import annotations

from coordinator.aggregation.base import AggregationRule, register_rule


@register_rule("fedavg")
class FedAvg(AggregationRule):
    """Plain weighted averaging (the base rule, registered under its name)."""

    name = "fedavg"
