"""The device interface the agent runtime drives, and the real device behind it.

The runtime (``edge_client.runtime``) owns the MQTT side: connections, topics, status and
reports.  A device owns what happens on the board: what it registers with, whether it is
there to see a task, and what running a task comes to (:data:`Outcome`; a task that raises
is :class:`Failed`, which the runtime reports).  A real device measures itself and trains;
``edge_client.emulated_device.EmulatedDevice`` wraps one and makes it obey a profile
instead, so the runtime treats both alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from edge_client.memory import fit_batch_size, free_memory_bytes
from edge_client.shared_models import ModelPool
from edge_client.task import TaskLimits, limit_problem, train_task, update_message
from edge_client.training import TrainResult
from fedmpq.errors import BudgetError
from fedmpq.policies import policy_class
from fedmpq.resources import ModelCost
from fedmpq.secagg.grid import device_codes
from fedmpq.state import fingerprint
from fedmpq.wire.codec import encode
from fedmpq.wire.messages import DeviceProfile, TaskMessage, TensorPayload, UpdateMessage

log = logging.getLogger("fedmpq.agent")


@dataclass(frozen=True)
class Availability:
    """A device says ahead of a round whether it will be there (status ``online``/``offline``)."""

    online: bool
    round: int
    detail: str


@dataclass(frozen=True)
class Refused:
    """The device will not run the task (status ``rejected``), e.g. it does not fit its memory."""

    reason: str


@dataclass(frozen=True)
class Crashed:
    """The device went down during the task without answering (status ``offline``)."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The task could not be done (status ``error`` with the reason): the round need not wait."""

    reason: str


@dataclass(frozen=True)
class SecureCodes:
    """A secure task's trained weights on the round's grid: per layer, flat codes and the
    precision they are at (``fedmpq.secagg.grid.device_codes``)."""

    codes: dict[str, np.ndarray]
    bits: dict[str, int]


@dataclass
class Trained:
    """A task done: the update and its encoded, signed frame, ready to publish; for a
    secure task the update carries no tensors and ``codes`` go into the masked input."""

    update: UpdateMessage
    frame: bytes
    result: TrainResult
    batch_size: int  # the batch size trained with, after fitting into memory
    host_seconds: float  # this host's CPU time for the training (wall time with >1 thread)
    delay: float = 0.0  # hold the frame back this many seconds before publishing it
    timing: dict[str, float] = field(default_factory=dict)  # what an emulated time is made of
    codes: SecureCodes | None = None


#: What running a task comes to.
Outcome = Trained | Refused | Crashed | Failed


class Device(Protocol):
    """What the agent runtime needs of a device, real or emulated."""

    @property
    def client_id(self) -> str: ...

    @property
    def key(self) -> bytes | None:
        """Signs every frame the device sends (``fedmpq.wire.signing``); None: unsigned."""

    @property
    def profile(self) -> DeviceProfile:
        """What the device registers with."""

    @property
    def num_samples(self) -> int: ...

    @property
    def data_fingerprint(self) -> str:
        """What the device trains on (``fedmpq.state.fingerprint`` of its data share)."""

    @property
    def online(self) -> bool:
        """Whether the device is there to see a task now."""

    def round_opened(self, round: int, global_bytes: int) -> Availability | None:
        """Round ``round`` was announced (``global_bytes`` long, to every device): what to
        announce about the device's availability, or None for nothing."""

    def task_arrived(self, nbytes: int) -> None:
        """``nbytes`` arrived for the device's task: a task or a notice, then the model at
        its allocation that the task starts from."""

    def run_task(
        self, task: TaskMessage, global_state: Mapping[str, np.ndarray], models: ModelPool
    ) -> Outcome:
        """Run ``task`` from ``global_state`` on a network from ``models``."""


def fit_task(
    client_id: str,
    task: TaskMessage,
    cost: ModelCost,
    free_bytes: int,
    limits: TaskLimits | None = None,
) -> TaskMessage | Refused:
    """``task`` with the batch size that fits in ``free_bytes``, or why it cannot run
    (outside the device's ``limits``, or not even fitting memory)."""
    problem = limit_problem(task, limits or TaskLimits(), cost.params)
    if problem is not None:
        log.warning("%s: refused round %d: %s", client_id, task.round, problem)
        return Refused(problem)
    try:
        batch = fit_batch_size(task, cost, free_bytes)
    except BudgetError as exc:
        log.warning("%s: refused round %d: %s", client_id, task.round, exc)
        return Refused(str(exc))
    if batch != task.batch_size:
        log.info("%s: batch %d -> %d to fit memory", client_id, task.batch_size, batch)
    return replace(task, batch_size=batch)


@dataclass
class RealDevice:
    """This board: its local data, the profile it measured, and its policy state."""

    client_id: str
    x: torch.Tensor
    y: torch.Tensor
    profile: DeviceProfile
    seed: int = 0
    key: bytes | None = None
    memory: dict[str, np.ndarray] = field(default_factory=dict)  # policy state (error feedback)
    limits: TaskLimits = field(default_factory=TaskLimits)  # what it agrees to run
    stop: threading.Event | None = None  # set: training stops between batches

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @cached_property
    def data_fingerprint(self) -> str:
        return fingerprint({"x": self.x.numpy(), "y": self.y.numpy()})

    @property
    def online(self) -> bool:
        return True  # a board that is off receives nothing at all

    def round_opened(self, round: int, global_bytes: int) -> Availability | None:
        return None  # a real board's availability is its connection (and last will)

    def task_arrived(self, nbytes: int) -> None:
        pass

    def run_task(
        self, task: TaskMessage, global_state: Mapping[str, np.ndarray], models: ModelPool
    ) -> Outcome:
        cost = models.cost(task.model_name)
        fitted = fit_task(self.client_id, task, cost, free_memory_bytes(), self.limits)
        if isinstance(fitted, Refused):
            return fitted
        return self.train(fitted, global_state, models)

    def train(
        self, task: TaskMessage, global_state: Mapping[str, np.ndarray], models: ModelPool
    ) -> Trained:
        """Train ``task`` as given (already fitted into memory) and encode the update."""
        cpu_start = time.thread_time()
        seed = self.seed * 100_003 + task.round
        net = models.net(task.model_name)
        local, hooks, result = train_task(
            task, net, global_state, self.x, self.y, seed=seed, memory=self.memory, stop=self.stop
        )
        kind = policy_class(task.policy).update_kind
        codes = None
        tensors: list[TensorPayload] = []
        dropped: dict[str, int] = {}
        if task.secagg is not None:  # the weights go on the round's grid, not in the update
            rng = np.random.default_rng(seed)
            codes = SecureCodes(*device_codes(local, task.secagg, task.bits, rng))
        else:
            tensors, dropped = hooks.make_update(local, global_state, kind)
        update = update_message(task, kind, tensors, dropped, self.num_samples, result)
        # With one torch thread training runs on this thread: its CPU time is the work,
        # whatever else the host is doing; with more, only wall time says.
        one_thread = torch.get_num_threads() == 1
        host_s = time.thread_time() - cpu_start if one_thread else result.seconds
        frame = self.encode(update, task)
        return Trained(update, frame, result, task.batch_size, host_s, codes=codes)

    def encode(self, update: UpdateMessage, task: TaskMessage) -> bytes:
        """``update`` as sent: compressed as ``task`` asks, signed with the device's key."""
        return encode(update, compress=task.compress, key=self.key)
