"""What a round sends: who can train (budgets), their tasks, and the model downlink.

The downlink (:meth:`RoundMessages.models`) goes to the selected devices only: each starts
from the global model as its policy trains from it -- quantized at its own per-layer bits
with the run's quantizer and observer (``Q_b(w)``), or float32 for policies that train in
float (``Policy.starts_quantized``) -- one retained payload per distinct allocation on
``model_at/{key}``, which a device subscribes to while its task waits for it.  Devices
not selected receive nothing but the round's control announcement.
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
from fedmpq.topics import MODEL_AT, TASK
from fedmpq.wire.codec import encode
from fedmpq.wire.downlink import global_model_at, group_by_allocation
from fedmpq.wire.messages import NoticeMessage, TaskMessage

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
        self.retained: set[str] = set()  # allocation keys holding a retained model

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

    def start_bits(self, rs: RoundState, client_id: str) -> dict[str, int]:
        """The bits ``client_id`` starts training from: its allocation's when the policy
        trains quantized, none (all float32) when it trains in float."""
        return dict(rs.selected[client_id].bits) if self.policy.starts_quantized else {}

    def models(
        self, rs: RoundState, state: Mapping[str, np.ndarray], admitted: list[DeviceRecord]
    ) -> list[Outgoing]:
        """The global model at each allocation of ``admitted`` not yet published this round:
        one retained payload per distinct allocation (devices sharing one share it)."""
        cfg = self.config
        starts = {d.client_id: self.start_bits(rs, d.client_id) for d in admitted}
        groups = group_by_allocation(
            starts, cfg.scheme, per_channel=cfg.per_channel, observer=cfg.observer
        )
        out = []
        for key, members in groups.items():
            rs.allocation_of.update(dict.fromkeys(members, key))
            if key in rs.model_frames:
                continue
            message = global_model_at(
                state,
                starts[members[0]],
                run_id=cfg.run_id,
                round=rs.round,
                model_name=cfg.model,
                fingerprint=rs.fingerprint,
                scheme=cfg.scheme,
                per_channel=cfg.per_channel,
                observer=cfg.observer,
            )
            rs.model_frames[key] = encode(message, compress=cfg.compress)
            self.retained.add(key)
            out.append(Outgoing(MODEL_AT, key, rs.model_frames[key]))
        return out

    def withdraw(self) -> list[Outgoing]:
        """Clear the retained models (an empty retained payload deletes one), so no device
        subscribing later receives a closed round's model."""
        out = [Outgoing(MODEL_AT, key, b"") for key in sorted(self.retained)]
        self.retained.clear()
        return out

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
        for client_id, frame in tasks.items():
            # What the broker delivers to the device: its task (or notice) and, to a
            # device with a task, the model at its allocation.
            key = rs.allocation_of.get(client_id) if client_id not in excluded else None
            model = len(rs.model_frames[key]) if key is not None else 0
            rs.count_down(client_id, len(frame) + model)
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
            model_allocation=rs.allocation_of[device.client_id],
            secagg=rs.secure.setup if rs.secure is not None else None,
        )
