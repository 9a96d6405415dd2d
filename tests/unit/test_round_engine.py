"""The round engine without a transport: deadlines, quorum retry, dropouts and re-sends
driven by an injected clock (no sleeping), its events, and the aggregation registry."""

from __future__ import annotations

import time

import pytest

from benchmarks.round_driver import enroll, frames
from coordinator.aggregation import Quantization, make_rule, rule_name
from coordinator.config import RunConfig
from coordinator.engine import RoundEngine
from coordinator.events import Evaluated, FrameHandled, RoundClosed, RoundOpened
from fedmpq.errors import ConfigError
from fedmpq.policies import make_policy
from fedmpq.topics import CONTROL, MODEL_AT, STATUS, TASK, UPDATE
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import (
    STATUS_CONNECTED,
    DeviceProfile,
    RegisterMessage,
    ResourceUsage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.tensors import encode_state

PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64")
DEADLINE = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def engine_with(tmp_path, devices=("a", "b", "c"), **settings) -> tuple[RoundEngine, FakeClock]:
    config = RunConfig(
        run_id="eng",
        model="mlp",
        rounds=1,
        out_dir=str(tmp_path),
        publish_onnx=False,
        round_deadline_s=DEADLINE,
        **settings,
    )
    clock = FakeClock()
    engine = RoundEngine(config, clock=clock)
    for cid in devices:
        reg = RegisterMessage(cid, "test", PROFILE, 100, True, time.time())
        enroll(engine, reg)
    return engine, clock


def echo_update(engine: RoundEngine, task_frame: bytes) -> bytes:
    """A device that learned nothing: it sends its quantized starting point back."""
    task = decode(task_frame, TaskMessage)
    tensors = encode_state(engine.global_state, task.bits)
    usage = ResourceUsage(0.0, 0, 0.0)
    return encode(
        UpdateMessage(
            "eng", task.round, task.client_id, 100, task.model_fingerprint, "weights", tensors,
            usage, {}, token=task.token,
        )
    )  # fmt: skip


def status(engine: RoundEngine, cid: str, state: str, round: int, detail: str = "") -> list:
    msg = StatusMessage(cid, state, round, detail, time.time())
    return engine.receive(STATUS, cid, encode(msg))


def test_the_deadline_closes_a_round_on_the_injected_clock(tmp_path):
    engine, clock = engine_with(tmp_path)
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    clock.now += DEADLINE - 0.001
    # The silent devices are asked again, once per tick however late; the round stays open.
    assert [(m.kind, m.client_id) for m in engine.tick()] == [(TASK, "b"), (TASK, "c")]
    assert not engine.done()
    clock.now += 0.001
    assert engine.tick() == [] and engine.done()
    row = engine.close_round()
    assert row["participants"] == ["a"] and row["counted"]
    assert row["round_seconds"] == DEADLINE


def test_short_of_quorum_at_the_deadline_spare_devices_are_asked_once(tmp_path):
    engine, clock = engine_with(tmp_path, quorum=1.0)
    devices = engine.registry.devices
    _, tasks = frames(engine.open_round(1, [devices["a"], devices["b"]]))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    clock.now += DEADLINE
    retry = engine.tick()
    assert [(m.kind, m.client_id) for m in retry] == [(TASK, "c")]
    assert not engine.done() and engine.deadline() == clock.now + DEADLINE
    # Once per round: no spare device is asked again (silent "b" gets its task again).
    assert [(m.kind, m.client_id) for m in engine.tick()] == [(TASK, "b")]
    engine.receive(UPDATE, "c", echo_update(engine, retry[0].payload))
    assert not engine.done()  # "b" may still answer until the new deadline
    clock.now += DEADLINE
    assert engine.done()
    row = engine.close_round()
    assert row["participants"] == ["a", "c"] and row["counted"]


def test_an_offline_device_is_given_the_grace_then_dropped(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a",), offline_grace_s=5.0)
    engine.open_round(1)
    status(engine, "a", "offline", 0)  # its last will
    assert not engine.round_state.complete()
    clock.now += 5.0
    assert engine.tick() == [] and engine.done()
    assert engine.close_round()["dropped"] == {"a": "offline"}


def test_reconnects_get_the_open_rounds_messages_again(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a", "b"))
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    resent = engine.resend()
    key = engine.round_state.allocation_of["b"]
    expected = [(CONTROL, None), (MODEL_AT, key), (TASK, "b")]
    assert [(m.kind, m.client_id) for m in resent] == expected
    back = status(engine, "b", "online", 1, STATUS_CONNECTED)
    assert [(m.kind, m.client_id, m.payload) for m in back] == [(TASK, "b", tasks["b"])]
    assert status(engine, "a", "online", 1, STATUS_CONNECTED) == []  # already answered


def test_observers_see_frames_rounds_and_evaluations(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a",))
    events: list = []
    engine.observers.subscribe(events.append)
    _, tasks = frames(engine.open_round(1))
    update = echo_update(engine, tasks["a"])
    engine.receive(UPDATE, "a", update)
    row = engine.close_round()
    kinds = [type(e) for e in events]
    assert kinds == [RoundOpened, FrameHandled, Evaluated, RoundClosed]
    assert events[1].nbytes == len(update) and events[1].kind == UPDATE
    assert events[3].row is row


@pytest.mark.parametrize(
    ("policy", "rule"),
    [
        ({"name": "fixed", "bits": 4}, "anchored"),
        ({"name": "fixed", "bits": 4, "anchored": False}, "fedavg"),
        ({"name": "fedmpq"}, "anchored"),
        ({"name": "qsgd"}, "delta"),
    ],
)
def test_the_policy_chooses_the_aggregation_rule(policy, rule):
    params = dict(policy)
    assert rule_name(make_policy(params.pop("name"), **params)) == rule


def test_an_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="aggregation rule"):
        make_rule("median", {}, Quantization("symmetric", True, "minmax"))
