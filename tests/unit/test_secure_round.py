"""Secure rounds in the round engine, without a transport: frames in, frames out, a fake
clock for the step deadlines; the model is the plain mean of exactly the inputs that
arrived.  Also the grid a round announces and the config checks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.round_driver import enroll
from coordinator.config import RunConfig
from coordinator.engine import RoundEngine
from fedmpq.errors import ConfigError
from fedmpq.secagg import DeviceSession, SecAggError, SecureSum
from fedmpq.secagg.grid import FINE_BITS, device_codes, mean_state, round_grid
from fedmpq.secagg.messages import ForwardedShares, KeyRoster, UnmaskRequest
from fedmpq.secagg.ring import lift
from fedmpq.state import fingerprint
from fedmpq.topics import STATUS, TASK, UPDATE
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import (
    DeviceProfile,
    RegisterMessage,
    ResourceUsage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.signing import generate_coordinator_key, generate_keys, write_keyring

PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64")
IDS = ("a", "b", "c", "d", "e")
KEYS = generate_keys(list(IDS))
STEP_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def secure_engine(tmp_path, **settings) -> tuple[RoundEngine, FakeClock]:
    key_file = tmp_path / "keys.toml"
    private, public = generate_coordinator_key()
    write_keyring(str(key_file), KEYS, coordinator_public=public, coordinator_private=private)
    config = RunConfig(
        device_keys=str(key_file),
        run_id="sec",
        model="mlp",
        rounds=3,
        out_dir=str(tmp_path),
        publish_onnx=False,
        round_deadline_s=60.0,
        secure_aggregation=True,
        secure_step_s=STEP_S,
        clip_multiple=0.0,
        policy={"name": "fixed", "bits": 4, "anchored": False},
        **settings,
    )
    clock = FakeClock()
    engine = RoundEngine(config, clock=clock)
    for cid in IDS:
        enroll(engine, RegisterMessage(cid, "test", PROFILE, 100, True, time.time()), KEYS[cid])
    return engine, clock


class Fleet:
    """Devices that answer the engine's frames with their sessions; ``silent`` ones stop."""

    def __init__(self, engine: RoundEngine, tasks: dict[str, TaskMessage]) -> None:
        self.engine = engine
        self.tasks = tasks
        self.sessions = {c: DeviceSession(c, t.secagg) for c, t in tasks.items() if t.secagg}
        rng = np.random.default_rng(0)
        self.codes = {}
        for cid, task in tasks.items():
            noisy = {n: w + rng.normal(0, 0.01, w.shape) for n, w in engine.global_state.items()}
            self.codes[cid] = device_codes(noisy, task.secagg, task.bits, rng)
        self.silent: set[str] = set()
        self.inbox: list = []

    def send(self, cid: str, msg) -> None:
        if cid not in self.silent:
            self.deliver(self.engine.receive(UPDATE, cid, encode(msg, key=KEYS[cid])))

    def deliver(self, out) -> None:
        for m in out:
            if m.kind == TASK and m.client_id not in self.silent:
                self.inbox.append((m.client_id, decode(m.payload)))

    def run(self) -> None:
        """Answer every frame that came in, until none is left."""
        while self.inbox:
            cid, msg = self.inbox.pop(0)
            session = self.sessions[cid]
            if isinstance(msg, KeyRoster):
                self.send(cid, session.share_keys(msg))
            elif isinstance(msg, ForwardedShares):
                self.send(cid, session.masked_input(msg, *self.codes[cid]))
            elif isinstance(msg, UnmaskRequest):
                self.send(cid, session.unmask(msg))

    def plain_mean(self, contributors) -> dict[str, np.ndarray]:
        """What the round must produce: the mean of the contributors' grid values."""
        setup = next(iter(self.tasks.values())).secagg
        sums = {
            g.name: sum(lift(self.codes[c][0][g.name], self.codes[c][1][g.name], g.bits)
                        for c in contributors)
            for g in setup.layers
        }  # fmt: skip
        total = SecureSum(tuple(contributors), sums)
        return mean_state(total, setup, self.engine.global_state)


def open_secure(engine: RoundEngine) -> Fleet:
    out = engine.open_round(1)
    tasks = {m.client_id: decode(m.payload, TaskMessage) for m in out if m.kind == TASK}
    fleet = Fleet(engine, tasks)
    for cid, session in fleet.sessions.items():
        fleet.send(cid, session.advertise())
    return fleet


def test_a_secure_round_gives_the_plain_mean_of_every_input(tmp_path):
    engine, _ = secure_engine(tmp_path)
    fleet = open_secure(engine)
    setup = fleet.tasks["a"].secagg
    assert setup.client_ids == list(IDS) and setup.threshold == 3
    fleet.run()
    assert engine.done()
    expected = fleet.plain_mean(IDS)
    row = engine.close_round()
    assert row["counted"] and row["participants"] == list(IDS)
    assert row["model_fingerprint"] == fingerprint(expected)
    assert row["secure"]["answered"] == {"keys": 5, "shares": 5, "masked": 5, "unmask": 5}
    assert row["link_bytes"]["a"]["up"] > 0


def test_dropped_after_sending_still_counts_and_before_sending_does_not(tmp_path):
    engine, clock = secure_engine(tmp_path)
    fleet = open_secure(engine)
    # "e" shares its keys, then stops before its masked input goes out.
    roster = [m for m in fleet.inbox]
    fleet.inbox = []
    for cid, msg in roster:
        fleet.send(cid, fleet.sessions[cid].share_keys(msg))
    fleet.silent.add("e")
    fleet.inbox = [(c, m) for c, m in fleet.inbox if c != "e"]
    while fleet.inbox:  # masked inputs, then "d" stops after sending its own
        cid, msg = fleet.inbox.pop(0)
        if isinstance(msg, ForwardedShares):
            fleet.send(cid, fleet.sessions[cid].masked_input(msg, *fleet.codes[cid]))
        else:
            fleet.inbox.insert(0, (cid, msg))
            break
    assert not engine.done() and fleet.inbox == []
    clock.now += 60.0  # the round deadline closes the masked inputs without "e"
    fleet.deliver(engine.tick())
    fleet.silent.add("d")
    fleet.inbox = [(c, m) for c, m in fleet.inbox if c != "d"]
    assert {type(m) for _, m in fleet.inbox} == {UnmaskRequest}
    fleet.run()
    assert not engine.done()  # "d" is still expected to answer
    clock.now += STEP_S
    fleet.deliver(engine.tick())
    assert engine.done()
    row = engine.close_round()
    assert row["participants"] == ["a", "b", "c", "d"]
    assert row["model_fingerprint"] == fingerprint(fleet.plain_mean("abcd"))


def test_a_gone_device_closes_a_step_before_its_deadline(tmp_path):
    engine, _ = secure_engine(tmp_path, offline_grace_s=0.0)
    out = engine.open_round(1)
    tasks = {m.client_id: decode(m.payload, TaskMessage) for m in out if m.kind == TASK}
    fleet = Fleet(engine, tasks)
    for cid in "abcd":
        fleet.send(cid, fleet.sessions[cid].advertise())
    assert fleet.inbox == []  # still waiting for "e"
    engine.receive(
        STATUS, "e", encode(StatusMessage("e", "error", 1, "broken", time.time()), key=KEYS["e"])
    )
    fleet.deliver(engine.tick())
    assert sorted(c for c, _ in fleet.inbox) == list("abcd")
    fleet.run()
    assert engine.done()
    assert engine.close_round()["participants"] == list("abcd")


def test_too_few_devices_left_fails_the_round_and_keeps_the_model(tmp_path):
    engine, clock = secure_engine(tmp_path)
    before = fingerprint(engine.global_state)
    fleet = open_secure(engine)
    fleet.silent.update("cde")
    fleet.run()
    clock.now += 60.0
    engine.tick()
    assert engine.done()
    row = engine.close_round()
    assert not row["counted"] and row["secure"]["failure"].startswith("shares")
    assert row["model_fingerprint"] == before


def test_a_plain_update_is_refused_in_a_secure_round(tmp_path):
    engine, _ = secure_engine(tmp_path)
    fleet = open_secure(engine)
    task = fleet.tasks["a"]
    update = UpdateMessage(
        "sec", 1, "a", 100, task.model_fingerprint, "weights", [], ResourceUsage(0, 0, 0), {},
        token=task.token,
    )  # fmt: skip
    engine.receive(UPDATE, "a", encode(update, key=KEYS["a"]))
    # b, with its own key, speaks for a:
    engine.receive(UPDATE, "b", encode(fleet.sessions["a"].advertise(), key=KEYS["b"]))
    assert engine.rejections.counts["unexpected"] == 0
    assert engine.rejections.counts["kind"] == 1
    assert engine.rejections.counts["spoofed"] == 1


def test_the_grid_covers_every_tensor_with_headroom():
    state = {"w": np.array([[-0.5, 0.25]], np.float32), "b": np.zeros(3, np.float32)}
    grids = {g.name: g for g in round_grid(state, [{"w": 2}, {"w": 4}, {"w": 32}])}
    assert (grids["w"].bits, grids["w"].size) == (4, 2) and grids["w"].scale == 0.625
    assert grids["b"].bits == FINE_BITS and grids["b"].scale == 0.125
    with pytest.raises(SecAggError, match="finite"):
        round_grid({"w": np.array([np.nan], np.float32)}, [])


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({}, "clip_multiple"),
        ({"clip_multiple": 0.0, "max_update_norm": 1.0}, "max_update_norm"),
        ({"clip_multiple": 0.0, "policy": {"name": "qsgd"}}, "qsgd"),
        ({"clip_multiple": 0.0, "policy": {"name": "float32"}}, "float32"),
        ({"clip_multiple": 0.0, "policy": {"name": "fedmpq"}}, "fedmpq"),
        ({"clip_multiple": 0.0}, "device_keys"),
    ],
)
def test_secure_aggregation_refuses_what_needs_individual_updates(settings, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(secure_aggregation=True, **settings)
