"""The round engine: one federated run's rounds, without any transport.

It consumes events -- device frames (register, status, update) and the passing of time
(:meth:`RoundEngine.tick`) -- and returns the :class:`~coordinator.events.Outgoing`
messages to deliver; a transport adapter (``coordinator.mqtt_service``) maps those to
topics.  Time comes from an injectable clock (``time.monotonic`` by default), so tests
drive deadlines without sleeping.

A round: :meth:`open_round` selects devices, allocates bits and builds the model
downlink and tasks; :meth:`receive` validates and aggregates updates; the round is
:meth:`done` when every selected device answered or is gone, or at the deadline -- a
selected device silent for too long is sent its task again, and once per round a round
short of its quorum first asks spare devices (both in :meth:`tick`);
:meth:`close_round` folds the updates in (through the policy's aggregation rule),
evaluates and returns the metrics row.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from coordinator.aggregation import Quantization, make_rule, rule_name
from coordinator.config import RunConfig
from coordinator.enrolment import Enrolment
from coordinator.events import (
    Evaluated,
    FrameHandled,
    Observers,
    Outgoing,
    RoundClosed,
    RoundOpened,
)
from coordinator.intake import UpdateIntake
from coordinator.outbound import Outbound
from coordinator.registry import DeviceRecord, Registry
from coordinator.resend import TaskResends
from coordinator.round_state import RoundState, metrics_row
from coordinator.secure_round import SecureRound
from coordinator.tasks import RoundMessages
from coordinator.validation import (
    MoveGuard,
    Rejections,
    signature_problem,
)
from coordinator.workload import Workload
from fedmpq.errors import DecodeError, FedmpqError
from fedmpq.policies import BitAllocation, ClientResult, PolicyContext, make_policy
from fedmpq.secagg import SecAggError, SecAggSetup, default_threshold
from fedmpq.secagg.grid import mean_state, round_grid
from fedmpq.state import fingerprint
from fedmpq.topics import MODEL_AT, REGISTER, STATUS, TASK, UPDATE
from fedmpq.wire.codec import DecodeLimits, Envelope, decode_envelope
from fedmpq.wire.messages import UpdateMessage
from fedmpq.wire.signing import load_key_file

log = logging.getLogger("fedmpq.coordinator")

#: Frames a device sends: with device keys configured, each must carry its signature.
SIGNED = frozenset({REGISTER, STATUS, UPDATE})


class RoundEngine:
    """Runs the rounds of one federated run as ``config`` describes."""

    def __init__(
        self,
        config: RunConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        grace_clock: Callable[[], float] | None = None,
        workload: Workload | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # What offline_grace_s is measured on (RoundState.grace_clock); default: clock.
        self.grace_clock = grace_clock if grace_clock is not None else clock
        self.workload = workload if workload is not None else Workload(config)
        self.limits = DecodeLimits(max_message_bytes=config.max_message_bytes)
        self.registry = Registry()
        self.rejections = Rejections()
        self.rejections_reported: Counter[str] = Counter()  # totals up to the last row
        self.rng = random.Random(config.seed)
        self.observers = Observers()
        name, params = config.policy_params()
        self.policy = make_policy(name, **params)
        w = self.workload
        q = Quantization(config.scheme, config.per_channel, config.observer)
        self.quantization = q
        context = PolicyContext(
            lambda: w.global_state, w.heldout_loss, q.scheme, q.per_channel, q.observer
        )
        self.policy.setup(w.layers, context)
        keys = load_key_file(config.device_keys) if config.device_keys else None
        self.keyring: dict[str, bytes] | None = keys.keys if keys is not None else None
        signer = keys.signer(config.device_keys) if keys is not None else None
        self.outbound = Outbound(config.run_id, signer)
        self.messages = RoundMessages(
            config, w.cost, self.registry, self.policy, token=self.outbound.task_token
        )
        self.enrolment = Enrolment(
            config.run_id, self.registry, self.rejections, self.limits,
            signed=self.keyring is not None, token=self.outbound.task_token,
        )  # fmt: skip
        self.intake = UpdateIntake(
            config, w, self.registry, self.rejections, self.limits,
            policy=self.policy, token=self.outbound.task_token,
        )  # fmt: skip
        self.guard = MoveGuard(config.max_round_move)
        self.silent: set[str] = set()  # selected, never answered, not heard from since
        self.round_state: RoundState | None = None
        self.last_allocation: dict[str, BitAllocation] = {}

    @property
    def global_state(self) -> dict[str, np.ndarray]:
        return self.workload.global_state

    # --- events ----------------------------------------------------------------------
    def receive(self, kind: str, client_id: str | None, payload: bytes) -> list[Outgoing]:
        """Decode, validate and act on one frame of topic ``kind`` from ``client_id``."""
        started = time.perf_counter()
        out: list[Outgoing] = []
        try:
            # Parsed once: the signature is checked on the envelope, then the body decoded.
            env = decode_envelope(payload, self.limits)
            problem = signature_problem(self.keyring, client_id, env) if kind in SIGNED else None
            if problem is None:
                self.silent.discard(client_id or "")  # heard from: may be asked again
            if problem is not None:
                self.rejections.reject(problem[0], client_id, problem[1])
            elif kind == REGISTER:
                out = self.enrolment.register(client_id, env)
            elif kind == STATUS:
                out = self.enrolment.status(client_id, env, self.round_state)
            elif kind == UPDATE:
                out = self._update(client_id or "", env, len(payload))
        except DecodeError as exc:
            self.rejections.reject("malformed", client_id, str(exc))
        elapsed = time.perf_counter() - started
        self.observers.emit(FrameHandled(kind, client_id, len(payload), elapsed))
        return out

    def _update(self, client_id: str, env: Envelope, nbytes: int) -> list[Outgoing]:
        """An update, or in a secure round a step of the protocol (never a plain update)."""
        rs = self.round_state
        secure = rs.secure if rs is not None else None
        if env.type == UpdateMessage.MESSAGE_TYPE and not self.config.secure_aggregation:
            self.intake.receive(client_id, env, nbytes, rs)
            return []
        if rs is None or secure is None or client_id not in secure.setup.client_ids:
            self.rejections.reject("unexpected", client_id, f"{env.type}: no secure round for it")
            return []
        out, problem = secure.receive(client_id, env, self.limits, rs.dropped)
        if problem is not None:
            self.rejections.reject(problem[0], client_id, problem[1])
            return []
        self.registry.note_update(client_id)  # there now (a will that comes later stands)
        rs.count_up(client_id, nbytes)
        return self._sent(rs, out)

    def _sent(self, rs: RoundState, out: list[Outgoing]) -> list[Outgoing]:
        """``out`` (secure steps to devices), counted in the devices' downlink."""
        for m in out:
            rs.count_down(m.client_id or "", len(m.payload))
        return out

    def tick(self) -> list[Outgoing]:
        """Let time pass: send the task again to selected devices that have been silent
        too long (``coordinator.resend``); once the open round is complete or past its
        deadline and still short of its quorum, ask spare devices not asked yet (once per
        round).  A secure round closes its steps at their deadlines instead (its devices
        are fixed)."""
        rs = self.round_state
        if rs is not None and rs.secure is not None:
            rs.complete()  # devices offline past their grace are gone
            return self._sent(rs, rs.secure.tick(rs.dropped))
        if rs is None or self.config.secure_aggregation:
            return []  # a secure run with fewer than two devices has no round to wait for
        return self._ask_again(rs) + self._retry_quorum(rs)

    def _ask_again(self, rs: RoundState) -> list[Outgoing]:
        """The tasks of the devices whose re-send is due (see ``coordinator.resend``)."""
        rs.complete()  # first drops the devices offline past their grace
        asked = rs.resends.take_due(self.clock(), rs.waiting(), rs.deadline)
        if asked:
            log.info("round %d: no word from %s; sending the task again", rs.round, asked)
        return self._tasks_again(rs, asked)

    def _tasks_again(self, rs: RoundState, client_ids: list[str]) -> list[Outgoing]:
        """The tasks (or notices) of ``client_ids`` once more, counted as delivered again."""
        for cid in client_ids:
            rs.count_down(cid, len(rs.task_frames[cid]))
        return [Outgoing(TASK, cid, rs.task_frames[cid]) for cid in client_ids]

    def _retry_quorum(self, rs: RoundState) -> list[Outgoing]:
        """Once the round is complete or past its deadline and short of its quorum: the
        tasks of spare devices (decided once per round)."""
        if rs.quorum_checked or not (rs.complete() or rs.expired()):
            return []
        rs.quorum_checked = True
        spare = [d for d in self.registry.online() if d.client_id not in rs.task_frames]
        missing = rs.quorum_target - len(rs.accepted)
        if missing <= 0 or not spare:
            return []
        spare.sort(key=lambda d: d.client_id)
        retry = self.rng.sample(spare, min(missing, len(spare)))
        log.warning(
            "round %d: %d short of quorum, asking %s",
            rs.round,
            missing,
            [d.client_id for d in retry],
        )
        rs.deadline = self.clock() + self.config.round_deadline_s
        return self.extend_round(retry)

    def deadline(self) -> float:
        """When the open round stops waiting (clock time; infinite with no round open)."""
        return self.round_state.deadline if self.round_state is not None else math.inf

    def done(self) -> bool:
        """True once the open round should close (see :meth:`tick`)."""
        rs = self.round_state
        if rs is not None and self.config.secure_aggregation:
            return rs.secure is None or rs.secure.finished
        return rs is not None and rs.quorum_checked and (rs.complete() or rs.expired())

    # --- commands --------------------------------------------------------------------
    def open_round(self, round: int, selected: list[DeviceRecord] | None = None) -> list[Outgoing]:
        """Open ``round`` for ``selected`` (default: the registry's random selection of
        ``clients_per_round`` online devices); return the round's announcement (to all),
        the models at the selected devices' allocations and their tasks.  A device whose
        profile cannot fit 1-bit training gets a notice instead of a task."""
        cfg = self.config
        if selected is None:
            selected = self.select(cfg.clients_per_round)
        admitted, clients, excluded = self.messages.admit(round, selected)
        self.intake.cap_samples(admitted)
        allocation = self.policy.allocate(round, clients)
        rule = make_rule(rule_name(self.policy), self.global_state, self.quantization)
        rule.clip.multiple = cfg.clip_multiple if cfg.clip_multiple > 0 else math.inf
        fp = fingerprint(self.global_state)
        rs = RoundState(round, fp, allocation, rule, clock=self.clock, grace_clock=self.grace_clock)
        rs.quorum_target = math.ceil(cfg.quorum * len(admitted))
        rs.offline_grace_s = cfg.offline_grace_s
        rs.started = self.clock()
        rs.deadline = rs.started + cfg.round_deadline_s
        rs.resends = TaskResends.for_deadline(cfg.round_deadline_s)
        self.round_state = rs
        announce = self.control("open", round)
        rs.control_bytes = len(announce.payload) * len(self.registry.online())
        if cfg.secure_aggregation:
            rs.secure = self._secure_round(rs)
            if rs.secure is None:
                admitted = []  # no task goes out: the round cannot be aggregated securely
        out = [announce, *self.messages.models(rs, self.global_state, admitted)]
        out += self.messages.tasks(rs, admitted, excluded)
        rs.resends.arm([d.client_id for d in admitted], rs.started)
        self.observers.emit(RoundOpened(round, tuple(out)))
        return out

    def _secure_round(self, rs: RoundState) -> SecureRound | None:
        """The secure aggregation of ``rs`` over its selected devices; None (logged) when
        they cannot run one (fewer than two)."""
        cfg = self.config
        ids = sorted(rs.selected)
        layers = round_grid(self.global_state, (a.bits for a in rs.selected.values()))
        setup = SecAggSetup(cfg.run_id, rs.round, ids, default_threshold(len(ids)), layers)
        try:
            return SecureRound(setup, cfg.secure_step_s, rs.deadline, self.clock)
        except SecAggError as exc:
            log.warning("round %d: no secure aggregation: %s", rs.round, exc)
            return None

    def _secure_result(self, rs: RoundState) -> dict[str, np.ndarray] | None:
        """The model a finished secure round makes (None if it failed); its contributors
        become the round's accepted devices (what the policy learns from: their bits)."""
        secure = rs.secure
        if secure is None or secure.result is None:
            return None
        total = secure.result
        for cid in total.contributors:
            device = self.registry.devices.get(cid)
            samples = device.num_samples if device is not None else 1
            rs.accepted[cid] = ClientResult(cid, samples, dict(rs.selected[cid].bits), {}, {})
            self.intake.proven.add(cid)
        state = mean_state(total, secure.setup, self.global_state)
        return rs.rule.anchor_mean(state, [rs.selected[cid] for cid in total.contributors])

    def select(self, count: int) -> list[DeviceRecord]:
        """``count`` online devices at random for a round (see :meth:`Registry.select`)."""
        return self.registry.select(count, self.rng, silent=self.silent, proven=self.intake.proven)

    def extend_round(self, devices: list[DeviceRecord]) -> list[Outgoing]:
        """Add ``devices`` to the open round (replacing ones that did not answer); return
        their tasks."""
        rs = self.round_state
        if rs is None:
            raise FedmpqError("extend_round() without an open round")
        admitted, clients, excluded = self.messages.admit(rs.round, devices)
        rs.selected.update(self.policy.allocate(rs.round, clients))
        out = self.messages.models(rs, self.global_state, admitted)
        out += self.messages.tasks(rs, admitted, excluded)
        rs.resends.arm([d.client_id for d in admitted], self.clock())
        self.observers.emit(RoundOpened(rs.round, tuple(out)))
        return out

    def close_round(self) -> dict[str, Any]:
        """Close the open round: fold the accepted updates into the model, evaluate, and
        return the metrics row."""
        rs = self.round_state
        if rs is None:
            raise FedmpqError("close_round() without an open round")
        self.round_state = None
        collected = self.clock()
        secure_state = self._secure_result(rs)
        answered = len(rs.accepted)
        # Asked, and neither answered nor said why: not asked again until heard from.
        # (Devices that answered before stay selectable: a missed round locks no one out.)
        self.silent.update(
            set(rs.selected) - set(rs.accepted) - set(rs.dropped) - self.intake.proven
        )
        counted = answered > 0 and answered >= rs.quorum_target
        if counted:
            new_state = secure_state if secure_state is not None else rs.rule.result()
            problem = self.guard.check(new_state, self.global_state)
            if problem is not None:
                self.rejections.reject(problem[0], None, f"round {rs.round}: {problem[1]}")
                counted = False
            else:
                self.last_allocation = rs.selected  # what the model now was trained at
                self.workload.global_state = new_state
                self.policy.observe(rs.round, list(rs.accepted.values()))
        if not counted:
            log.warning(
                "round %d: %d of %d answered, model unchanged", rs.round, answered, len(rs.selected)
            )
        evaluation = self.evaluate(rs.round)
        # This round's rejections (and any between rounds); the totals go to the checkpoint.
        rejected = dict(self.rejections.counts - self.rejections_reported)
        self.rejections_reported = Counter(self.rejections.counts)
        row = metrics_row(
            rs, self.workload.layers, evaluation, counted=counted, collected=collected,
            rejected=rejected,
        )  # fmt: skip
        row["model_fingerprint"] = fingerprint(self.global_state)
        if rs.secure is not None:
            row["secure"] = rs.secure.summary()
        self.observers.emit(RoundClosed(rs.round, row))
        return row

    def withdraw_models(self) -> list[Outgoing]:
        """After :meth:`close_round`: clear the closed round's retained models."""
        return self.messages.withdraw()

    def evaluate(self, round: int = 0) -> tuple[float, float]:
        """Loss and accuracy of the global model on the test split."""
        started = time.perf_counter()
        result = self.workload.evaluate()
        self.observers.emit(Evaluated(round, time.perf_counter() - started))
        return result

    def resend(self) -> list[Outgoing]:
        """After a (re)connect: the run announcement, and the open round's models and the
        tasks not answered yet (a device answers a task it already answered with the same
        update, and ignores one for a round it is training), all counted as delivered
        again: the announcement to every online device, a model to each device of its
        allocation that has not answered (one that holds it already is no longer
        subscribed: at most that)."""
        rs = self.round_state
        announce = self.control("open", rs.round if rs is not None else 0)
        if rs is None:
            return [announce]
        rs.control_bytes += len(announce.payload) * len(self.registry.online())
        unanswered = [c for c in rs.task_frames if c not in rs.accepted]
        for cid in unanswered:
            key = rs.allocation_of.get(cid)  # None for a notice: no model
            if key is not None:
                rs.count_down(cid, len(rs.model_frames[key]))
        models = [Outgoing(MODEL_AT, key, frame) for key, frame in rs.model_frames.items()]
        secure = self._sent(rs, rs.secure.resend()) if rs.secure is not None else []
        return [announce, *models, *self._tasks_again(rs, unanswered), *secure]

    def signed(self, messages: list[Outgoing]) -> list[Outgoing]:
        """``messages`` as published (signed with keys: see :meth:`Outbound.signed`)."""
        return self.outbound.signed(messages)

    def control(self, state: str, round: int, detail: str = "") -> Outgoing:
        """The run announcement ``state`` for ``round`` (to every device)."""
        return self.outbound.control(state, round, detail)

    def task_token(self, round: int, client_id: str) -> str:
        """The token of ``client_id``'s task in ``round`` (echoed by its update)."""
        return self.outbound.task_token(round, client_id)
