"""What a round sends: who can train (budgets), their tasks, and the model downlink.

The downlink is one place (:meth:`RoundMessages.downlink`): today a single retained
float32 global model for everyone; per-device or per-allocation payloads replace it
here without touching the engine or the transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from coordinator.config import RunConfig
from coordinator.events import Outgoing
from coordinator.registry import DeviceRecord, Registry
from coordinator.round_state import RoundState
from fedmpq.budget import RoundDemand, budget_bits
from fedmpq.errors import BudgetError
from fedmpq.policies import ClientInfo, Policy
from fedmpq.resources import ModelCost
from fedmpq.topics import GLOBAL, TASK
from fedmpq.wire.codec import encode
from fedmpq.wire.messages import GlobalModelMessage, NoticeMessage, TaskMessage
from fedmpq.wire.tensors import encode_state

log = logging.getLogger("fedmpq.coordinator")


class RoundMessages:
    """Builds the messages of a round for one run's config, model cost and policy."""

    def __init__(
        self,
        config: RunConfig,
        cost: ModelCost,
        registry: Registry,
        policy: Policy,
        *,
        token: Callable[[int, str], str] = lambda round, client_id: "",
    ) -> None:
        self.config = config
        self.cost = cost
        self.registry = registry
        self.policy = policy
        self.token = token  # (round, client id) -> the task's token, echoed by its update

    def client_budget(self, device: DeviceRecord) -> float:
        """``device``'s average bit budget: set in the run config, else from its profile.

        Raises
        ------
        BudgetError
            When the device's profile cannot fit even 1-bit training.
        """
        cfg = self.config
        if device.client_id in cfg.client_budgets:
            return float(cfg.client_budgets[device.client_id])
        ids = sorted(self.registry.devices)
        if device.client_id in ids and ids.index(device.client_id) < len(cfg.budgets):
            return float(cfg.budgets[ids.index(device.client_id)])
        demand = RoundDemand(
            cfg.round_deadline_s, device.num_samples, cfg.training.epochs, cfg.training.batch_size
        )
        return budget_bits(device.profile, self.cost, demand)

    def admit(
        self, round: int, devices: list[DeviceRecord]
    ) -> tuple[list[DeviceRecord], list[ClientInfo], dict[str, str]]:
        """Split ``devices`` into those that can train (with their budgets) and those whose
        profile cannot fit 1-bit training (with the reason)."""
        admitted, clients, excluded = [], [], {}
        for d in devices:
            try:
                budget = self.client_budget(d)
            except BudgetError as exc:
                excluded[d.client_id] = str(exc)
                log.warning("round %d: %s not selected: %s", round, d.client_id, exc)
                continue
            admitted.append(d)
            clients.append(ClientInfo(d.client_id, d.profile, d.num_samples, budget))
        return admitted, clients, excluded

    def downlink(self, rs: RoundState, state: Mapping[str, np.ndarray]) -> list[Outgoing]:
        """The model the round's devices start from: one retained float32 broadcast."""
        cfg = self.config
        all_float = {name: 32 for name in state}
        message = GlobalModelMessage(
            cfg.run_id, rs.round, cfg.model, rs.fingerprint, encode_state(state, all_float)
        )
        rs.global_frame = encode(message, compress=cfg.compress)
        return [Outgoing(GLOBAL, None, rs.global_frame)]

    def tasks(
        self, rs: RoundState, admitted: list[DeviceRecord], excluded: dict[str, str]
    ) -> list[Outgoing]:
        """Encode the tasks of ``admitted`` (and notices for ``excluded``) and count them."""
        cfg = self.config
        tasks = {}
        for device in admitted:
            compress = cfg.compress and device.accepts_zstd
            tasks[device.client_id] = encode(self._task(rs, device, compress), compress=compress)
        for client_id, reason in excluded.items():
            tasks[client_id] = encode(NoticeMessage(cfg.run_id, client_id, rs.round, reason))
        rs.excluded.update(excluded)
        rs.task_frames.update(tasks)
        # The broker fans the retained global model out to every selected device.
        rs.downlink_bytes += len(rs.global_frame) * len(admitted)
        rs.downlink_bytes += sum(len(t) for t in tasks.values())
        return [Outgoing(TASK, client_id, frame) for client_id, frame in tasks.items()]

    def _task(self, rs: RoundState, device: DeviceRecord, compress: bool) -> TaskMessage:
        cfg = self.config
        return TaskMessage(
            run_id=cfg.run_id,
            round=rs.round,
            client_id=device.client_id,
            model_name=cfg.model,
            model_fingerprint=rs.fingerprint,
            policy=self.policy.name,
            bits=rs.selected[device.client_id].bits,
            scheme=cfg.scheme,
            per_channel=cfg.per_channel,
            epochs=cfg.training.epochs,
            batch_size=cfg.training.batch_size,
            learning_rate=cfg.training.learning_rate,
            deadline_s=cfg.round_deadline_s,
            compress=compress,
            options=self.policy.client_options(),
            observer=cfg.observer,
            token=self.token(rs.round, device.client_id),
        )
