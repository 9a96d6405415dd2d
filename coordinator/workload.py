"""What a run trains: the data set, the model, its global weights and their evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from coordinator.config import RunConfig
from fedmpq.data.datasets import load_dataset
from fedmpq.evaluation import evaluate
from fedmpq.models import build_model, quantizable_layers
from fedmpq.policies import LayerInfo
from fedmpq.resources import model_cost
from fedmpq.state import load_numpy_state, state_to_numpy

#: Test samples policies may evaluate modified global models on (FedLQ's sensitivity).
HELDOUT = 500


class Workload:
    """The model under training and the test split it is judged on.

    ``global_state`` is the current global model (numpy); the engine replaces it when a
    round counts.
    """

    def __init__(self, config: RunConfig) -> None:
        torch.manual_seed(config.seed)  # the initial model depends on it
        self.data = load_dataset(config.dataset)
        self.model = build_model(config.model, self.data.num_classes, self.data.in_shape)
        self.x_test, self.y_test = self.data.test.tensors()
        self.global_state: dict[str, np.ndarray] = state_to_numpy(self.model)
        numels = {name: w.size for name, w in self.global_state.items()}
        self.layers = [LayerInfo(name, numels[name]) for name in quantizable_layers(self.model)]
        self.cost = model_cost(self.model, self.data.in_shape)
        # A small held-out sample for policies that measure sensitivity (FedLQ).
        self.x_heldout, self.y_heldout = self.x_test[:HELDOUT], self.y_test[:HELDOUT]

    def evaluate(self) -> tuple[float, float]:
        """Loss and accuracy of the global model on the test split."""
        load_numpy_state(self.model, self.global_state)
        result = evaluate(self.model, self.x_test, self.y_test)
        return result.loss, result.accuracy

    def heldout_loss(self, state: Mapping[str, np.ndarray]) -> float:
        """Loss of ``state`` on the held-out sample (leaves ``model`` modified;
        :meth:`evaluate` reloads the global model)."""
        load_numpy_state(self.model, state)
        return evaluate(self.model, self.x_heldout, self.y_heldout).loss
