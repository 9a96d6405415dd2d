"""FedMPQ (Chen & Vikalo, CVPR 2024): mixed precision learned from pruned bit-planes.

Client side (:class:`FedMPQHooks`): every layer with ``b >= 2`` wire bits trains as
``b - 1`` magnitude bit-planes (``fedmpq.bitplanes``; ``b == 1`` layers keep the sign
only and train through plain STE fake-quant).  The objective adds FedMPQ's group lasso
over bit-planes, weighted by each layer's share of the model's bits::

    lambda * sum_l (N_l * n_l) * sum_k ||plane_{l,k}||_2 / sum_l N_l

(its gradient is added in :meth:`FedMPQHooks.step`, after the preconditioner).

After training, empty most significant planes and least significant planes with
<= 2% set bits are dropped; the client sends the layer at the remaining bits and
reports how many it dropped (``UpdateMessage.bits_dropped``).

Server side (:class:`FedMPQPolicy`): updates are aggregated anchored (each client's
change from the quantized model it started from; see ``Policy``).  The next round
starts from the clients' mean per-layer bits; layers are ranked by
``p_l = N_l / sum N * round(mean dropped_l + 1)`` and each client's allocation is
moved to its budget -- bits come off the highest-priority layers while the average is
above the budget, and go onto the lowest-priority layers (at most 8) while one more
bit still fits.

Wire bits are FedMPQ's magnitude bits plus the sign: ``b = n + 1``.  Where this
implementation has to choose (see ``fedmpq.bitplanes``): plane gradients are
preconditioned so a step moves a weight as plain SGD would, only the planes of a
weight's current sign move, the least significant plane starts with the weight's
sub-level fraction, a clipped plane's share of a step moves onto the weight's other
planes, and levels may grow to 2M during training (a grown slice is re-quantized to
M levels in the forward pass already, so the loss sees what is sent).  Without the
growth, local training lost accuracy round after round in the benchmark (scales
could only shrink); without the re-quantization in the forward pass, two-bit
clients sent far worse weights than they had trained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedmpq.bitplanes import BitPlaneWeight, PlaneLayer, drop_planes
from fedmpq.errors import ConfigError
from fedmpq.fake_quant import attach_fake_quant, detach_fake_quant
from fedmpq.optim import Optimizer
from fedmpq.policies import register_policy
from fedmpq.policies.base import (
    BitAllocation,
    ClientHooks,
    ClientInfo,
    ClientResult,
    LayerInfo,
    Policy,
)
from fedmpq.wire.messages import KIND_DELTA, TensorPayload

MIN_BITS, MAX_BITS = 1, 8


def layer_priorities(
    layers: Sequence[LayerInfo], mean_dropped: Mapping[str, float]
) -> dict[str, float]:
    """FedMPQ's priority ``p_l = N_l / sum N * round(mean dropped_l + 1)`` per layer."""
    total = sum(layer.numel for layer in layers) or 1
    return {
        layer.name: layer.numel / total * round(mean_dropped.get(layer.name, 0.0) + 1.0)
        for layer in layers
    }


def fit_to_budget(
    start: Mapping[str, int],
    layers: Sequence[LayerInfo],
    priorities: Mapping[str, float],
    budget: float,
) -> dict[str, int]:
    """Move ``start`` to ``budget`` average bits, FedMPQ's way.

    If the parameter-weighted average exceeds ``budget``, one bit comes off each layer
    in turn from the highest priority down (never below 1) until it does not;
    otherwise one bit goes onto each layer in turn from the lowest priority up (never
    above 8) as long as the average stays within the budget.  Ties keep the layer
    order.
    """
    bits = {layer.name: min(max(int(start[layer.name]), MIN_BITS), MAX_BITS) for layer in layers}
    numel = {layer.name: layer.numel for layer in layers}
    total = sum(numel.values()) or 1
    used = sum(bits[n] * numel[n] for n in bits)
    order = sorted(range(len(layers)), key=lambda i: (-priorities[layers[i].name], i))
    high_first = [layers[i].name for i in order]
    limit = budget * total + 1e-9
    if used > limit:
        while used > limit and any(bits[n] > MIN_BITS for n in high_first):
            for name in high_first:
                if used <= limit:
                    break
                if bits[name] > MIN_BITS:
                    bits[name] -= 1
                    used -= numel[name]
        return bits
    grew = True
    while grew:
        grew = False
        for name in reversed(high_first):
            if bits[name] < MAX_BITS and used + numel[name] <= limit:
                bits[name] += 1
                used += numel[name]
                grew = True
    return bits


class FedMPQHooks(ClientHooks):
    """Bit-plane training with the group-lasso regulariser and plane dropping."""

    def attach(self, model: nn.Module) -> None:
        self._planes: dict[str, tuple[nn.Module, BitPlaneWeight]] = {}
        sign_only = {n: b for n, b in self.quantized.items() if b < 2}
        for name, bits in self.quantized.items():
            if bits < 2:
                continue
            module = model.get_submodule(name.rpartition(".")[0])
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            w = weight.detach().numpy()
            planes = BitPlaneWeight(w, bits, self.axis, self.observer)
            parametrize.register_parametrization(module, "weight", planes, unsafe=True)
            self._planes[name] = (module, planes)
        attach_fake_quant(model, sign_only, self.scheme, axis=self.axis, observer=self.observer)
        sizes = {n: p.positive[0].numel() for n, (_, p) in self._planes.items()}
        total = sum(sizes.values()) or 1
        # Weight of a layer's group lasso: its share N_l * n_l of the model's bits.
        self._coef = {n: sizes[n] * p.planes / total for n, (_, p) in self._planes.items()}
        self._trained: dict[str, PlaneLayer] = {}

    def step(self, model: nn.Module, optimizer: Optimizer) -> None:
        # The group lasso's gradient joins after the preconditioner: that rescaling
        # makes a cross-entropy step move a weight as plain SGD would, and applied to
        # the lasso it would multiply its strength by ~1/unit**2, a different amount
        # per layer (it shrank every weight towards zero, round after round).
        strength = self.options.get("lambda", 1e-3)
        for name, (_, planes) in self._planes.items():
            planes.precondition_()
            if strength:
                planes.add_lasso_grad_(strength * self._coef[name])
        optimizer.step()
        for _, planes in self._planes.values():
            planes.clip_(optimizer)

    def detach(self, model: nn.Module) -> None:
        for name, (module, planes) in self._planes.items():
            self._trained[name] = planes.to_layer()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        detach_fake_quant(model)

    def make_update(
        self,
        local: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        kind: str,
    ) -> tuple[list[TensorPayload], dict[str, int]]:
        if kind == KIND_DELTA:
            raise ConfigError("FedMPQ clients send weights, not deltas")
        weights = dict(local)
        bits = dict(self.bits)
        dropped: dict[str, int] = {}
        density = self.options.get("lsb_density", 0.02)
        for name, trained in self._trained.items():
            kept = drop_planes(trained, lsb_density=density)
            weights[name] = kept.weight()
            bits[name] = kept.planes + 1
            dropped[name] = trained.planes - kept.planes
        return self.encode(weights, bits), dropped


@register_policy
class FedMPQPolicy(Policy):
    """FedMPQ's server side: per-client allocations from reported bits and dropped planes.

    Parameters
    ----------
    bits
        Average bits of a client whose budget is unknown.
    lam
        Group-lasso strength sent to the clients (``options["lambda"]``).
    lsb_density
        A least significant plane with at most this fraction of set bits is dropped.
    anchored
        Aggregate each client's change from the quantized global model it started
        from (see ``Policy``), not its weights.  On by default: with two-bit clients
        it gained 1-4 points after 8 rounds; the fixed baseline gained nothing.
    """

    name = "fedmpq"
    hooks = FedMPQHooks

    def __init__(
        self,
        bits: float = 4,
        lam: float = 1e-3,
        lsb_density: float = 0.02,
        anchored: bool = True,
    ) -> None:
        super().__init__(anchored)
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ConfigError(f"fedmpq policy: bits must be within 1..8, got {bits}")
        self.bits = float(bits)
        self.lam = lam
        self.lsb_density = lsb_density
        self.mean_bits: dict[str, float] = {}
        self.mean_dropped: dict[str, float] = {}

    def client_options(self) -> dict[str, float]:
        return {"lambda": self.lam, "lsb_density": self.lsb_density}

    def priorities(self) -> dict[str, float]:
        return layer_priorities(self.layers, self.mean_dropped)

    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        priorities = self.priorities()
        allocation = {}
        for client in clients:
            budget = self.bits if client.budget_bits is None else client.budget_bits
            if self.mean_bits:
                start = {n: round_half_up(b) for n, b in self.mean_bits.items()}
            else:
                start = {layer.name: math.floor(budget) for layer in self.layers}
            bits = fit_to_budget(start, self.layers, priorities, budget)
            allocation[client.client_id] = BitAllocation(bits)
        return allocation

    def observe(self, round: int, results: Sequence[ClientResult]) -> None:
        if not results:
            return
        names = [layer.name for layer in self.layers]
        self.mean_bits = {
            n: float(np.mean([float(r.bits[n]) for r in results if n in r.bits] or [self.bits]))
            for n in names
        }
        self.mean_dropped = {
            n: float(np.mean([r.bits_dropped.get(n, 0) for r in results])) for n in names
        }

    def state_dict(self) -> dict[str, Any]:
        return {"mean_bits": dict(self.mean_bits), "mean_dropped": dict(self.mean_dropped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean_bits = {str(k): float(v) for k, v in state.get("mean_bits", {}).items()}
        self.mean_dropped = {str(k): float(v) for k, v in state.get("mean_dropped", {}).items()}


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() goes to even)."""
    return math.floor(x + 0.5)
