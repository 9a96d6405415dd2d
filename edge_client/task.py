"""One task, start to finish, without I/O: global model in, encoded update out.

The agent runtime calls this for every task it receives over MQTT; simulations and
benchmarks call it directly, so there is one implementation of what a device does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from edge_client.profiling import peak_rss_bytes
from edge_client.training import TrainResult, train_local
from fedmpq.policies import policy_class
from fedmpq.state import load_numpy_state, state_to_numpy
from fedmpq.wire.messages import KIND_DELTA, ResourceUsage, TaskMessage, UpdateMessage
from fedmpq.wire.tensors import encode_state


def execute_task(
    task: TaskMessage,
    net: nn.Module,
    global_state: Mapping[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
) -> tuple[UpdateMessage, TrainResult]:
    """Train ``net`` from ``global_state`` on ``(x, y)`` as ``task`` says; return the update.

    Parameters
    ----------
    task
        The round's task for this device.
    net
        A model of ``task.model_name``'s architecture; its weights are overwritten.
    global_state
        The decoded global model the task names by fingerprint.
    x, y
        The device's local training data.
    seed
        Seeds the local data order (combine device and round so rounds differ).
    """
    load_numpy_state(net, global_state)
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
    )
    local = state_to_numpy(net)
    kind = policy_class(task.policy).update_kind
    if kind == KIND_DELTA:
        local = {name: w - global_state[name] for name, w in local.items()}
    update = UpdateMessage(
        run_id=task.run_id,
        round=task.round,
        client_id=task.client_id,
        num_samples=len(y),
        model_fingerprint=task.model_fingerprint,
        kind=kind,
        tensors=encode_state(local, task.bits, task.scheme, per_channel=task.per_channel),
        usage=ResourceUsage(
            train_seconds=result.seconds, peak_rss_bytes=peak_rss_bytes(), cpu_percent=0.0
        ),
        metrics={"loss": result.loss, "accuracy": result.accuracy},
    )
    return update, result
