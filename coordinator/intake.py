"""Accepting updates: validate an update frame against the open round and fold it in.

An update is aggregated only if it answers a task of the open round (run, round, token,
model fingerprint), its tensors fit the global model, and its change is within the
configured norm; its weight is capped at :data:`SAMPLE_CAP_MULTIPLE` times the median
registered samples of the round's devices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from coordinator.config import RunConfig
from coordinator.registry import DeviceRecord, Registry
from coordinator.round_state import RoundState
from coordinator.validation import (
    Problem,
    Rejections,
    norm_problem,
    shape_problem,
    update_problem,
    update_weight,
)
from coordinator.workload import Workload
from fedmpq.policies import Policy
from fedmpq.wire.codec import DecodeLimits, Envelope, decode_body
from fedmpq.wire.messages import UpdateMessage
from fedmpq.wire.tensors import decode_state

log = logging.getLogger("fedmpq.coordinator")

#: An update weighs at most this many times the median registered samples of its round.
SAMPLE_CAP_MULTIPLE = 10.0


class UpdateIntake:
    """Validates the updates of a run and folds the fit ones into their round's rule."""

    def __init__(
        self,
        config: RunConfig,
        workload: Workload,
        registry: Registry,
        rejections: Rejections,
        limits: DecodeLimits,
        *,
        policy: Policy,
        token: Callable[[int, str], str],
    ) -> None:
        self.config = config
        self.workload = workload
        self.registry = registry
        self.rejections = rejections
        self.limits = limits
        self.policy = policy
        self.token = token
        self.sample_cap = math.inf  # an update's weight at most: set per round
        self.proven: set[str] = set()  # devices that answered a task this run

    def cap_samples(self, admitted: list[DeviceRecord]) -> None:
        """Set the round's sample cap from its ``admitted`` devices (kept when none)."""
        if admitted:
            # No device outweighs SAMPLE_CAP_MULTIPLE typical ones, whatever it registered.
            median = float(np.median([d.num_samples for d in admitted]))
            self.sample_cap = SAMPLE_CAP_MULTIPLE * max(median, 1.0)

    def receive(
        self, client_id: str, env: Envelope, frame_bytes: int, rs: RoundState | None
    ) -> None:
        """Aggregate the update in ``env`` into the open round ``rs``, or reject it."""
        msg = decode_body(env, UpdateMessage, self.limits)
        kind = self.policy.update_kind
        problem = update_problem(msg, client_id, rs, self.config.run_id, kind, self.token)
        if problem is None:
            assert rs is not None  # update_problem calls an update with no round open stale
            problem = self._aggregate(rs, msg, frame_bytes)
        if problem is not None:
            self.rejections.reject(problem[0], client_id, problem[1])
            return
        log.info("round %d: update from %s (%d bytes)", msg.round, client_id, frame_bytes)

    def _aggregate(self, rs: RoundState, msg: UpdateMessage, frame_bytes: int) -> Problem | None:
        """Fold a valid update into the round's rule unless its tensors are unfit."""
        tensors = decode_state(msg.tensors)
        problem = shape_problem(tensors, self.workload.global_state)
        if problem is not None:
            return problem
        tensors = rs.rule.prepare(tensors, rs.selected[msg.client_id])
        norm = rs.rule.change_norm(tensors)
        problem = norm_problem(norm, self.config.max_update_norm)
        if problem is None:
            device = self.registry.devices.get(msg.client_id)
            weight = update_weight(msg, device.num_samples if device is not None else 1)
            weight = min(weight, self.sample_cap)
            rs.rule.add(tensors, weight, norm)
            rs.accept(msg, frame_bytes)
            self.proven.add(msg.client_id)
            self.registry.note_update(msg.client_id)
        return problem
