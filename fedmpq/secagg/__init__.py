"""Secure aggregation of quantized integer updates (SecAgg / SecAgg+ style, I/O-free).

Devices put their codes on a common per-layer grid (:mod:`.ring`), mask them in the ring
Z_(2**k) with pairwise masks that cancel in the sum plus a self mask (:mod:`.device`), and
Shamir-share the secrets that let the coordinator remove the masks of the devices that
drop (:mod:`.shamir`).  The coordinator (:mod:`.coordinator`) sums the masked inputs as
they arrive and only ever unmasks the sum.  :mod:`.protocol` runs a round without a
transport; the messages are in :mod:`.messages`.  :mod:`.grid` is what a training round
announces and does with the grid: one per tensor of the model, the device's trained
weights on it, the mean of the unmasked sum.
"""

from __future__ import annotations

from fedmpq.secagg.coordinator import SecureAggregation, SecureSum
from fedmpq.secagg.device import DeviceSession
from fedmpq.secagg.errors import SecAggError
from fedmpq.secagg.messages import LayerGrid, SecAggSetup
from fedmpq.secagg.plan import default_threshold
from fedmpq.secagg.protocol import Dropouts, simulate_round
from fedmpq.secagg.ring import grid_codes, lift, ring_bits

__all__ = [
    "DeviceSession",
    "Dropouts",
    "LayerGrid",
    "SecAggError",
    "SecAggSetup",
    "SecureAggregation",
    "SecureSum",
    "default_threshold",
    "grid_codes",
    "lift",
    "ring_bits",
    "simulate_round",
]
