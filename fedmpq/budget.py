"""A device's average bit budget, from its profile and what a round asks of it.

The budget is the largest parameter-weighted average bit-width (wire bits, sign
included, at most 8) at which the device

* holds the model, its gradients and optimizer state plus a batch of activations in
  its available RAM (:func:`fedmpq.resources.training_memory_bytes`), and
* finishes local training (:func:`fedmpq.resources.training_seconds` at its GFLOPS),
  receives the float32 global model and sends its update within the round deadline
  (:func:`fedmpq.resources.transfer_seconds` over its measured links).

Both costs grow linearly with the average bits, so each limit is solved in closed
form.  A device that cannot afford even 1 bit gets a :class:`BudgetError` that says
which resource is short.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmpq.errors import BudgetError
from fedmpq.resources import (
    ModelCost,
    training_memory_bytes,
    training_seconds,
    transfer_seconds,
)
from fedmpq.wire.messages import DeviceProfile

MIN_BITS, MAX_BITS = 1.0, 8.0


@dataclass(frozen=True)
class RoundDemand:
    """What one round asks of a device besides its model."""

    deadline_s: float
    samples: int
    epochs: int
    batch_size: int
    optimizer_slots: int = 1  # SGD momentum


def update_bytes(cost: ModelCost, avg_bits: float) -> float:
    """Wire size of an update at ``avg_bits``: packed weights plus float32 others."""
    return sum(cost.layer_params.values()) * avg_bits / 8 + cost.other_params * 4


def budget_bits(profile: DeviceProfile, cost: ModelCost, demand: RoundDemand) -> float:
    """The device's average bit budget in 1..8 (see the module docstring).

    Raises
    ------
    BudgetError
        When even 1-bit training does not fit the device's RAM or the round deadline.
    """
    weights = sum(cost.layer_params.values()) or 1
    # training_memory_bytes is affine in the bits: m(b) = m(0) + b * slope.
    mem0 = training_memory_bytes(
        cost, 0.0, demand.batch_size, optimizer_slots=demand.optimizer_slots
    )
    slope = (
        training_memory_bytes(cost, 8.0, demand.batch_size, optimizer_slots=demand.optimizer_slots)
        - mem0
    ) / 8.0
    limits = {"memory": (profile.available_ram - mem0) / slope}
    compute = training_seconds(cost, demand.samples, demand.epochs, profile.gflops)
    downlink = 0.0
    if profile.downlink_bps:
        downlink = transfer_seconds(int(update_bytes(cost, 32.0)), profile.downlink_bps)
    spare = demand.deadline_s - compute - downlink - (profile.latency_s or 0.0)
    if profile.uplink_bps:
        spare_bytes = spare * profile.uplink_bps / 8.0 - cost.other_params * 4
        limits["deadline"] = spare_bytes * 8.0 / weights
    elif spare <= 0:
        limits["deadline"] = float("-inf")
    short = {why: b for why, b in limits.items() if b < MIN_BITS}
    if short:
        why = min(short, key=lambda k: short[k])
        detail = {
            "memory": f"{profile.available_ram / 2**20:.0f} MiB available RAM cannot hold 1-bit "
            f"training ({training_memory_bytes(cost, 1.0, demand.batch_size) / 2**20:.0f} MiB)",
            "deadline": f"training ({compute:.1f} s at {profile.gflops:g} GFLOPS) and transfers "
            f"at 1 bit do not fit the {demand.deadline_s:g} s round deadline",
        }[why]
        raise BudgetError(f"device cannot train the model at any precision: {detail}")
    return min(MAX_BITS, *limits.values())
