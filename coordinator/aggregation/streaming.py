"""Streaming weighted averaging: memory O(model), not O(clients x model)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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
