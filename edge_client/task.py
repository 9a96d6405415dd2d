"""One task, start to finish, without I/O: global model in, encoded update out.

The agent runtime calls this for every task it receives over MQTT; simulations and
benchmarks call it directly, so there is one implementation of what a device does.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_client.profiling import peak_rss_bytes
from edge_client.training import TrainResult, train_local
from fedmpq.dither import dithered_start
from fedmpq.policies import ClientHooks, Policy, policy_class
from fedmpq.state import load_numpy_state, state_to_numpy
from fedmpq.wire.messages import ResourceUsage, TaskMessage, TensorPayload, UpdateMessage


@dataclass(frozen=True)
class TaskLimits:
    """What this device agrees to run, whoever asks: a task outside it is refused.

    The defaults are far beyond what a run needs on a Raspberry Pi-class board and far
    below what would keep it busy for the rest of a run.
    """

    max_epochs: int = 20
    max_batch_size: int = 4096
    max_learning_rate: float = 10.0
    max_deadline_s: float = 24 * 3600.0
    max_model_params: int = 50_000_000


def limit_problem(task: TaskMessage, limits: TaskLimits, model_params: int) -> str | None:
    """Why ``task`` (on a model of ``model_params`` parameters) is outside ``limits``, or None."""
    checks = [
        (
            1 <= task.epochs <= limits.max_epochs,
            f"epochs {task.epochs} not in 1..{limits.max_epochs}",
        ),
        (
            1 <= task.batch_size <= limits.max_batch_size,
            f"batch size {task.batch_size} not in 1..{limits.max_batch_size}",
        ),
        (
            0 < task.learning_rate <= limits.max_learning_rate,
            f"learning rate {task.learning_rate} not in (0, {limits.max_learning_rate}]",
        ),
        (
            0 < task.deadline_s <= limits.max_deadline_s and math.isfinite(task.deadline_s),
            f"deadline {task.deadline_s} s not in (0, {limits.max_deadline_s}]",
        ),
        (
            model_params <= limits.max_model_params,
            f"model of {model_params} parameters, over {limits.max_model_params}",
        ),
    ]
    return next((f"task outside this device's limits: {why}" for ok, why in checks if not ok), None)


def train_task(
    task: TaskMessage,
    net: nn.Module,
    global_state: Mapping[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    memory: MutableMapping[str, np.ndarray] | None = None,
    stop: threading.Event | None = None,
) -> tuple[dict[str, np.ndarray], ClientHooks, TrainResult]:
    """Train ``net`` from ``global_state`` on ``(x, y)`` as ``task`` says.

    Parameters are those of :func:`execute_task`.  Returns the trained weights (float,
    fake quantization detached), the policy's hooks that trained them and the result.
    """
    policy = policy_class(task.policy)
    load_numpy_state(net, _start_state(policy, task, global_state, seed))
    hooks = policy.hooks(
        task.bits, task.scheme, task.per_channel, task.options, memory, seed, task.observer
    )
    result = train_local(
        net,
        x,
        y,
        task.bits,
        scheme=task.scheme,
        per_channel=task.per_channel,
        epochs=task.epochs,
        batch_size=task.batch_size,
        learning_rate=task.learning_rate,
        momentum=task.options.get("momentum", 0.9),
        seed=seed,
        hooks=hooks,
        stop=stop,
    )
    return state_to_numpy(net), hooks, result


def execute_task(
    task: TaskMessage,
    net: nn.Module,
    global_state: Mapping[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    memory: MutableMapping[str, np.ndarray] | None = None,
    stop: threading.Event | None = None,
) -> tuple[UpdateMessage, TrainResult]:
    """Train ``net`` from ``global_state`` on ``(x, y)`` as ``task`` says; return the update.

    Parameters
    ----------
    task
        The round's task for this device.
    net
        A model of ``task.model_name``'s architecture; its weights are overwritten.
    global_state
        The decoded global model the task names by fingerprint and allocation: ``Q_b(w)``
        for policies that start quantized (``Policy.starts_quantized``), whose latent
        weights then start spread over their quantization cells (``fedmpq.dither``).
    x, y
        The device's local training data.
    seed
        Seeds the local data order (combine device and round so rounds differ).
    memory
        What the device keeps for its policy across rounds (e.g. error feedback);
        None for none.
    stop
        Set to stop training between batches (``TrainingStopped``).
    """
    local, hooks, result = train_task(
        task, net, global_state, x, y, seed=seed, memory=memory, stop=stop
    )
    kind = policy_class(task.policy).update_kind
    tensors, dropped = hooks.make_update(local, global_state, kind)
    return update_message(task, kind, tensors, dropped, len(y), result), result


def update_message(
    task: TaskMessage,
    kind: str,
    tensors: list[TensorPayload],
    dropped: dict[str, int],
    num_samples: int,
    result: TrainResult,
) -> UpdateMessage:
    """The update answering ``task``: the trained ``tensors`` with the run's usage and
    metrics (peak memory read now, after training); no tensors for a secure task, whose
    weights go on the round's grid instead."""
    return UpdateMessage(
        run_id=task.run_id,
        round=task.round,
        client_id=task.client_id,
        num_samples=num_samples,
        model_fingerprint=task.model_fingerprint,
        kind=kind,
        tensors=tensors,
        usage=ResourceUsage(
            train_seconds=result.seconds, peak_rss_bytes=peak_rss_bytes(), cpu_percent=0.0
        ),
        metrics={"loss": result.loss, "accuracy": result.accuracy},
        bits_dropped=dropped,
        token=task.token,
    )


def _start_state(
    policy: type[Policy], task: TaskMessage, global_state: Mapping[str, np.ndarray], seed: int
) -> Mapping[str, np.ndarray]:
    """The weights training starts from: the received model, or for policies that start
    quantized and spread, its latent weights spread over their quantization cells."""
    if not (policy.starts_quantized and policy.spreads_start):
        return global_state
    return dithered_start(
        global_state,
        task.bits,
        task.scheme,
        per_channel=task.per_channel,
        observer=task.observer,
        seed=seed,
    )
