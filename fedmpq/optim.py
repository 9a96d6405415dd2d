"""The agent's optimizer: SGD with momentum, without ``torch.optim``.

Constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (its
``add_param_group`` is wrapped to disable dynamo, which imports it on first call), and
with it sympy and some 800 modules: about 65 MiB of resident memory on a device that never
compiles anything, a fifth of a training agent's peak.  :class:`MomentumSGD` computes the
same update as ``torch.optim.SGD(params, lr, momentum)`` (no dampening, weight decay or
Nesterov), bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch


class Optimizer(Protocol):
    """What the training loop and the policies' hooks need of an optimizer
    (``torch.optim.SGD`` has it too)."""

    @property
    def state(self) -> Mapping[torch.Tensor, Any]:
        """Per-parameter state, e.g. ``state[p]["momentum_buffer"]``."""

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


class MomentumSGD:
    """``p -= lr * b`` with ``b = momentum * b + grad`` (``b = grad`` on the first step).

    Parameters
    ----------
    params
        The parameters to train (those without ``requires_grad`` are left alone).
    lr
        Learning rate.
    momentum
        Momentum factor; 0 for plain SGD.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = momentum
        # As torch.optim keeps it, so hooks that adjust momentum work with either.
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient."""
        for p in self.params:
            if p.grad is None:
                continue
            direction = p.grad
            if self.momentum:
                state = self.state.setdefault(p, {})
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = direction.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(direction)
                direction = buffer
            p.add_(direction, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the gradients."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
