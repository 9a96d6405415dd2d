"""Anchored averaging: each device's quantized layers are re-based on the global weights
it started from, so the quantization error of the start is not averaged into the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.aggregation.base import (
    AggregationRule,
    Quantization,
    State,
    register_rule,
)
from fedmpq.policies import BitAllocation
from fedmpq.quant import dequantize, quantize
from fedmpq.quant_spec import OBSERVER_MINMAX, QUANT_BITS, channel_axis


def start_error(
    w: np.ndarray, bits: int, scheme: str, per_channel: bool, observer: str = OBSERVER_MINMAX
) -> np.ndarray:
    """``w - Q_bits(w)``: what quantizing a global weight loses before a client trains it.

    A client that trains quantization-aware at ``bits`` starts from ``Q_bits(w)``, so the
    weights it sends are ``Q_bits(w) + (what it learned)``.  Adding this error back
    aggregates what it learned on top of ``w``, instead of averaging ``w``'s own
    quantization error into the model at every round.
    """
    axis = channel_axis(w.ndim, per_channel)
    q = quantize(w, bits, scheme, axis=axis, observer=observer)
    return (w - dequantize(q)).astype(np.float32)


@register_rule("anchored")
class AnchoredRule(AggregationRule):
    """Weighted mean of ``update + (w - Q_b(w))`` per quantized layer."""

    name = "anchored"

    def __init__(self, global_state: Mapping[str, np.ndarray], quant: Quantization) -> None:
        super().__init__(global_state, quant)
        # (layer, bits) -> start error: devices sharing an allocation share the work.
        self._errors: dict[tuple[str, int], np.ndarray] = {}

    def _error(self, name: str, bits: int) -> np.ndarray:
        error = self._errors.get((name, bits))
        if error is None:
            q = self.quant
            w = self.global_state[name]
            error = start_error(w, bits, q.scheme, q.per_channel, q.observer)
            self._errors[(name, bits)] = error
        return error

    def prepare(self, tensors: State, allocation: BitAllocation) -> State:
        for name, bits in allocation.bits.items():
            if bits in QUANT_BITS:
                tensors[name] = tensors[name] + self._error(name, bits)
        return tensors

    def anchor_mean(self, mean: State, allocations: Sequence[BitAllocation]) -> State:
        """``mean`` plus the mean start error of the devices' allocations."""
        out = {name: w.astype(np.float64) for name, w in mean.items()}
        for allocation in allocations:
            for name, bits in allocation.bits.items():
                if bits in QUANT_BITS:
                    out[name] += self._error(name, bits) / len(allocations)
        return {name: w.astype(mean[name].dtype) for name, w in out.items()}
