"""What training a model costs a device: memory, compute time, transfer time.

One set of formulas serves the coordinator (deriving a device's bit budget from its
profile) and the agent (refusing or adapting a task its device cannot hold, and
stretching emulated time), so both sides agree on what a device can do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

#: Bytes the Python runtime, torch and the agent take before any model is loaded.
RUNTIME_OVERHEAD_BYTES = 150 * 2**20


@dataclass(frozen=True)
class ModelCost:
    """Size and per-sample cost of a model, measured once by :func:`model_cost`."""

    layer_params: Mapping[str, int]  # quantizable weight name -> element count
    other_params: int  # biases, norms: always float32
    flops_per_sample: float  # forward pass, multiply-adds counted as 2
    activation_elems_per_sample: int  # outputs of every conv/linear layer

    @property
    def params(self) -> int:
        return sum(self.layer_params.values()) + self.other_params


def model_cost(model: nn.Module, in_shape: tuple[int, ...]) -> ModelCost:
    """Count parameters, forward FLOPs and activations of ``model`` on one input."""
    flops = 0.0
    activations = 0

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal flops, activations
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        out_elems = output.numel()
        activations += out_elems
        # Each output element is a dot product over a conv's (in/groups)*kh*kw or a linear's inputs.
        per_output = weight[0].numel() if isinstance(module, nn.Conv2d) else weight.shape[1]
        flops += 2.0 * out_elems * per_output

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    layer_params = {
        f"{name}.weight": m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }
    total = sum(p.numel() for p in model.parameters())
    return ModelCost(layer_params, total - sum(layer_params.values()), flops, activations)


def average_bits(cost: ModelCost, bits: Mapping[str, int]) -> float:
    """Parameter-weighted average bit-width of ``bits`` over the quantizable layers."""
    total = sum(cost.layer_params.values())
    return sum(bits.get(n, 32) * k for n, k in cost.layer_params.items()) / max(total, 1)


def training_memory_bytes(
    cost: ModelCost, avg_bits: float, batch_size: int, *, optimizer_slots: int = 1
) -> int:
    """Peak memory to train ``cost``'s model with weights held at ``avg_bits``.

    Weights, their gradients and ``optimizer_slots`` optimizer buffers (SGD momentum: 1)
    are held at the training precision; activations and their gradients are float32 for
    a batch; the float parameters (biases, norms) stay float32; plus the runtime.
    """
    weight_bytes = sum(cost.layer_params.values()) * avg_bits / 8
    model_bytes = (weight_bytes + cost.other_params * 4) * (2 + optimizer_slots)
    activation_bytes = 2 * 4 * cost.activation_elems_per_sample * batch_size
    return int(model_bytes + activation_bytes + RUNTIME_OVERHEAD_BYTES)


def training_seconds(cost: ModelCost, samples: int, epochs: int, gflops: float) -> float:
    """Compute time of local training: forward + backward is about 3x a forward pass."""
    return 3.0 * cost.flops_per_sample * samples * epochs / (max(gflops, 1e-9) * 1e9)


def transfer_seconds(nbytes: int, bits_per_second: float, latency_s: float = 0.0) -> float:
    """Time to move ``nbytes`` over a link of ``bits_per_second`` with one latency."""
    return latency_s + 8.0 * nbytes / max(bits_per_second, 1e-9)
