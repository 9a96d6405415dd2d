"""Local quantization-aware training at the per-layer bit-widths a task assigns."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmpq.errors import FedmpqError
from fedmpq.optim import MomentumSGD
from fedmpq.policies.base import ClientHooks


class TrainingStopped(FedmpqError):
    """Training was asked to stop (the agent is shutting down); nothing is sent."""


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over the last epoch
    accuracy: float  # training accuracy over the last epoch
    seconds: float
    samples_seen: int


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    bits: Mapping[str, int],
    *,
    scheme: str,
    per_channel: bool,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.9,
    seed: int = 0,
    hooks: ClientHooks | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` with fake-quantized weights (STE).

    Layers assigned 1..8 bits train through ``FakeQuantize`` so the weights the
    coordinator reconstructs from the packed update are the weights the loss saw.
    The latent float weights are left in ``model`` for the caller to quantize.
    ``hooks`` (the task's policy's :class:`ClientHooks`; default: plain QAT at ``bits``)
    may replace the fake-quantization, add a regulariser and change the step.
    ``stop`` is checked between batches: once set, :class:`TrainingStopped` is raised, so a
    shutdown never waits for a long task to finish.
    """
    if hooks is None:
        hooks = ClientHooks(bits, scheme, per_channel)
    hooks.attach(model)
    try:
        optimizer = MomentumSGD(model.parameters(), lr=learning_rate, momentum=momentum)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        started = time.perf_counter()
        loss_sum = correct = seen = 0.0
        for _ in range(epochs):
            loss_sum = correct = seen = 0.0
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                if stop is not None and stop.is_set():
                    raise TrainingStopped("training stopped: the agent is shutting down")
                idx = order[start : start + batch_size]
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                penalty = hooks.penalty(model)
                optimizer.zero_grad(set_to_none=True)
                (loss if penalty is None else loss + penalty).backward()
                hooks.step(model, optimizer)
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(dim=1) == y[idx]).sum())
                seen += len(idx)
        seconds = time.perf_counter() - started
    finally:
        hooks.detach(model)
    return TrainResult(loss_sum / max(seen, 1), correct / max(seen, 1), seconds, int(seen) * epochs)
