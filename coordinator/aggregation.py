"""Streaming weighted averaging: memory O(model), not O(clients x model)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmpq.quant import dequantize, quantize
from fedmpq.quant_spec import OBSERVER_MINMAX
from fedmpq.wire.messages import KIND_DELTA


class StreamingAverage:
    """Folds de-quantized updates into a running sample-weighted sum as they arrive.

    Sums are kept in float64 so that adding hundreds of float32 updates in any
    order gives the same mean to float32 precision.
    """

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._sums = {name: np.zeros(w.shape, dtype=np.float64) for name, w in template.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Add one client's tensors with weight ``weight`` (its sample count)."""
        for name, acc in self._sums.items():
            acc += weight * tensors[name]  # numpy promotes the float32 term into float64
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean as float32 tensors; raises if nothing was added."""
        if self.count == 0:
            raise ValueError("no update was added")
        return {
            name: (acc / self.total_weight).astype(np.float32) for name, acc in self._sums.items()
        }


def update_norm(
    tensors: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], kind: str
) -> float:
    """L2 norm of the change an update proposes to the global model."""
    total = 0.0
    for name, w in tensors.items():
        change = w if kind == KIND_DELTA else w - global_state[name]
        total += float(np.dot(change.ravel(), change.ravel()))
    return total**0.5


def start_error(
    w: np.ndarray, bits: int, scheme: str, per_channel: bool, observer: str = OBSERVER_MINMAX
) -> np.ndarray:
    """``w - Q_bits(w)``: what quantizing a global weight loses before a client trains it.

    A client that trains quantization-aware at ``bits`` starts from ``Q_bits(w)``, so the
    weights it sends are ``Q_bits(w) + (what it learned)``.  Adding this error back
    aggregates what it learned on top of ``w``, instead of averaging ``w``'s own
    quantization error into the model at every round.
    """
    axis = 0 if per_channel and w.ndim >= 2 else -1
    q = quantize(w, bits, scheme, axis=axis, observer=observer)
    return (w - dequantize(q)).astype(np.float32)
