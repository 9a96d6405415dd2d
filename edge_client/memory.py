"""Fitting a task into the memory a device has free: one rule for real and emulated devices.

A real device passes what psutil says is available now; an emulated one passes its
profile's RAM minus the profile's operating-system share.  The estimate is the shared
:func:`fedmpq.resources.training_memory_bytes`, the same one the coordinator uses to
derive a device's bit budget, so both sides agree on what fits.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from fedmpq.errors import BudgetError
from fedmpq.resources import ModelCost, average_bits, training_memory_bytes
from fedmpq.wire.messages import TaskMessage

MIB = 2**20


def _cgroup_headroom() -> int | None:
    """Bytes this process's memory cgroup (v2 or v1) still allows, or None if unlimited.

    A limit the kernel enforces (systemd's ``MemoryMax=``, a container's ``--memory``)
    kills the agent long before the machine runs out, so it bounds what is free.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            files = (base / "memory.max", base / "memory.current")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            files = (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = (f.read_text().strip() for f in files)
        except OSError:
            continue
        # v1 says "unlimited" with a huge number, v2 with "max".
        if limit != "max" and int(limit) < 2**60:
            return max(0, int(limit) - int(usage))
    return None


def free_memory_bytes() -> int:
    """Memory this machine can give a task now: psutil's ``available``, or less if the
    process's memory cgroup allows less."""
    available = int(psutil.virtual_memory().available)
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


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
