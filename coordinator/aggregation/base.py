"""The aggregation-rule interface and its registry.

A rule turns one round's accepted updates into the next global model.  The engine
opens a fresh rule object per round (``make_rule``), passes every accepted update
through :meth:`AggregationRule.prepare` (before the norm bound is checked) and
:meth:`AggregationRule.add`, and asks for :meth:`AggregationRule.result` once the round
counts.  Every rule clips each update's change to a bound that adapts to the round
(``robust.AdaptiveClip``) before it is folded in.  Rules that need more than decoded
float tensors (secure aggregation over the integer codes, robust statistics over
individual updates) register here the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation.robust import AdaptiveClip, change_norm
from coordinator.aggregation.streaming import StreamingAverage
from fedmpq.errors import ConfigError
from fedmpq.policies import BitAllocation, Policy
from fedmpq.wire.messages import KIND_DELTA, KIND_WEIGHTS

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Quantization:
    """How the run quantizes: what a rule needs to rebuild a device's starting point."""

    scheme: str
    per_channel: bool
    observer: str


class AggregationRule:
    """Streaming sample-weighted mean of the prepared updates (memory O(model)).

    Subclasses change what an update means (``prepare``) or how the mean becomes the
    model (``result``).
    """

    name = "fedavg"
    kind = KIND_WEIGHTS  # what the prepared tensors are: weights, or changes (delta)

    def __init__(self, global_state: Mapping[str, np.ndarray], quant: Quantization) -> None:
        self.global_state = global_state
        self.quant = quant
        self.average = StreamingAverage(global_state)
        self.clip = AdaptiveClip(global_state, self.kind)

    def prepare(self, tensors: State, allocation: BitAllocation) -> State:
        """The update as the change it proposes to the model (identity here)."""
        return tensors

    def anchor_mean(self, mean: State, allocations: Sequence[BitAllocation]) -> State:
        """The mean of prepared updates from the plain ``mean`` of the raw ones, for devices
        at ``allocations`` (secure aggregation sees only the mean); identity here."""
        return mean

    def change_norm(self, tensors: State) -> float:
        """L2 norm of the change a prepared update proposes (float64; inf if non-finite)."""
        return change_norm(tensors, self.global_state, self.kind)

    def add(self, tensors: State, weight: float, norm: float | None = None) -> None:
        """Fold one accepted, prepared update in with ``weight`` (its sample count), its
        change (of norm ``norm``, computed when not given) clipped (``self.clip``)."""
        norm = self.change_norm(tensors) if norm is None else norm
        for clipped, w in self.clip.add(tensors, weight, norm):
            self.average.add(clipped, w)

    def result(self) -> State:
        """The next global model; raises ``ValueError`` when nothing was added."""
        for clipped, w in self.clip.flush():
            self.average.add(clipped, w)
        return self.average.mean()


RuleFactory = Callable[[Mapping[str, np.ndarray], Quantization], AggregationRule]
_RULES: dict[str, RuleFactory] = {}


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Class decorator: make a rule available to :func:`make_rule` under ``name``."""

    def add(factory: RuleFactory) -> RuleFactory:
        _RULES[name] = factory
        return factory

    return add


def rule_name(policy: Policy) -> str:
    """The rule a policy asks for: deltas are added to the model, anchored weight updates
    are re-based on the model they started from, plain weights are averaged."""
    if policy.update_kind == KIND_DELTA:
        return "delta"
    return "anchored" if policy.anchored else "fedavg"


def make_rule(
    name: str, global_state: Mapping[str, np.ndarray], quant: Quantization
) -> AggregationRule:
    """A fresh rule object for one round."""
    try:
        factory = _RULES[name]
    except KeyError:
        raise ConfigError(f"unknown aggregation rule {name!r}; known: {sorted(_RULES)}") from None
    return factory(global_state, quant)
