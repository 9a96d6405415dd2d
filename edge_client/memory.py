"""Fitting a task into the memory a device has free: one rule for real and emulated devices.

A real device passes what psutil says is available now; an emulated one passes its
profile's RAM minus the profile's operating-system share.  The estimate is the shared
:func:`fedmpq.resources.training_memory_bytes`, the same one the coordinator uses to
derive a device's bit budget, so both sides agree on what fits.
"""

from __future__ import annotations

import psutil

from fedmpq.errors import BudgetError
from fedmpq.resources import ModelCost, average_bits, training_memory_bytes
from fedmpq.wire.messages import TaskMessage

MIB = 2**20


def free_memory_bytes() -> int:
    """Memory this machine can give a task now (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


def fit_batch_size(task: TaskMessage, cost: ModelCost, available_bytes: int) -> int:
    """The batch size to train ``task`` with so that it fits in ``available_bytes``.

    The task's own batch size if it fits; else halved until it does (activations shrink
    with the batch, the model does not).

    Raises
    ------
    BudgetError
        When not even a batch of one fits: the model itself is too large at the task's
        bit-widths.  The message says how much is needed and how much is free.
    """
    avg = average_bits(cost, task.bits)
    slots = 1 if task.options.get("momentum", 0.9) > 0 else 0
    batch = task.batch_size
    while True:
        need = training_memory_bytes(cost, avg, batch, optimizer_slots=slots)
        if need <= available_bytes:
            return batch
        if batch == 1:
            raise BudgetError(
                f"training {task.model_name} at {avg:.2f} average bits needs "
                f"{need / MIB:.0f} MiB even at batch size 1, but only "
                f"{available_bytes / MIB:.0f} MiB are free; assign fewer bits or a smaller model"
            )
        batch = max(1, batch // 2)
