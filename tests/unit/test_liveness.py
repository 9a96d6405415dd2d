"""Liveness in the round engine, on injected clocks (no broker, no sleeping): the offline
grace, reconnects, per-connection nonces against replayed and spoofed statuses, error
statuses, per-round rejections, shared data shares and the final bits."""

from __future__ import annotations

import json
import logging
import time

from test_round_engine import DEADLINE, PROFILE, FakeClock, echo_update, engine_with

from benchmarks.round_driver import enroll, frames
from coordinator.model_release import FINAL_BITS, release_model
from coordinator.resume import restore, snapshot
from fedmpq.topics import REGISTER, STATUS, TASK, UPDATE
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import STATUS_CONNECTED, RegisterMessage, StatusMessage


def say(engine, cid, state, round, *, nonce, at, detail=""):
    """``cid``'s status over the connection ``nonce``, sent at device time ``at``."""
    msg = StatusMessage(cid, state, round, detail, at, nonce)
    return engine.receive(STATUS, cid, encode(msg))


def connect(engine, cid, nonce, at):
    return say(engine, cid, "online", 0, nonce=nonce, at=at, detail=STATUS_CONNECTED)


def will(engine, cid, nonce, at=0.0):
    return say(engine, cid, "offline", 0, nonce=nonce, at=at, detail="connection lost")


def closes(engine) -> bool:
    """Whether the open round closes now (as the transport asks: tick, then done)."""
    engine.tick()
    return engine.done()


def test_the_grace_runs_on_the_grace_clock_not_on_wall_time(tmp_path):
    grace = FakeClock()  # what the transport heard: idle and connected
    engine, clock = engine_with(tmp_path, devices=("a",), offline_grace_s=5.0)
    engine.grace_clock = grace
    connect(engine, "a", "n1", 1.0)
    engine.open_round(1)
    will(engine, "a", "n1")
    clock.now += 20.0  # a worker busy for a while, or cut off from the broker
    assert not closes(engine)
    grace.now += 5.0
    assert closes(engine) and engine.round_state.dropped == {"a": "offline"}


def test_a_device_back_within_the_grace_is_waited_for_and_gets_its_task_again(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a", "b"), offline_grace_s=5.0)
    connect(engine, "a", "n1", 1.0)
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "b", echo_update(engine, tasks["b"]))
    will(engine, "a", "n1")
    clock.now += 4.0
    again = connect(engine, "a", "n2", 2.0)
    assert [(m.kind, m.client_id, m.payload) for m in again] == [(TASK, "a", tasks["a"])]
    clock.now += 10.0  # past the grace of the will it replaced
    assert not closes(engine)
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    assert closes(engine)
    assert engine.close_round()["participants"] == ["a", "b"]


def test_a_device_dropped_after_the_grace_is_back_if_it_returns_before_the_round_closes(
    tmp_path,
):
    engine, clock = engine_with(tmp_path, devices=("a", "b"), offline_grace_s=5.0)
    connect(engine, "a", "n1", 1.0)
    _, tasks = frames(engine.open_round(1))
    will(engine, "a", "n1")
    clock.now += 5.0
    assert not closes(engine)  # b has not answered
    assert engine.round_state.dropped == {"a": "offline"}
    connect(engine, "a", "n2", 2.0)
    assert engine.round_state.dropped == {}
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    engine.receive(UPDATE, "b", echo_update(engine, tasks["b"]))
    row = engine.close_round()
    assert row["participants"] == ["a", "b"] and row["dropped"] == {}


def test_an_update_counts_whatever_was_said_of_the_device_before(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a", "b"))
    _, tasks = frames(engine.open_round(1))
    say(engine, "a", "error", 1, nonce="", at=1.0, detail="spoofed")
    assert engine.round_state.dropped == {"a": "error: spoofed"}
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    engine.receive(UPDATE, "b", echo_update(engine, tasks["b"]))
    row = engine.close_round()
    assert row["participants"] == ["a", "b"] and row["dropped"] == {}


def test_an_error_status_drops_only_a_device_whose_update_is_not_aggregated(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a", "b"))
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    say(engine, "a", "error", 1, nonce="", at=1.0, detail="spoofed")
    say(engine, "b", "error", 1, nonce="", at=1.0, detail="RuntimeError: out of memory")
    assert closes(engine)  # b will not answer: no waiting for the deadline
    row = engine.close_round()
    assert row["participants"] == ["a"]
    assert row["dropped"] == {"b": "error: RuntimeError: out of memory"}


def test_a_will_of_an_earlier_connection_is_ignored(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a",), offline_grace_s=5.0)
    connect(engine, "a", "n1", 1.0)
    connect(engine, "a", "n2", 2.0)  # reconnected; n1's will may still come, or be replayed
    engine.open_round(1)
    will(engine, "a", "n1")
    clock.now += 5.0
    assert engine.registry.devices["a"].online
    assert engine.round_state.offline_since == {} and not closes(engine)


def test_a_replayed_status_of_the_current_connection_is_ignored_but_its_will_is_not(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a",))
    connect(engine, "a", "n1", 1.0)
    say(engine, "a", "offline", 2, nonce="n1", at=2.0, detail="emulated churn")
    say(engine, "a", "online", 3, nonce="n1", at=3.0, detail="emulated churn")
    say(engine, "a", "offline", 2, nonce="n1", at=2.0, detail="emulated churn")  # replayed
    record = engine.registry.devices["a"]
    assert record.online and not record.away
    will(engine, "a", "n1")  # sent_at: when the connection was made, before the rest
    assert not record.online


def test_an_old_online_status_cannot_revive_a_newer_connection_it_is_not(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a",))
    connect(engine, "a", "n2", 2.0)
    assert connect(engine, "a", "n1", 1.0) == []  # replayed from an earlier connection
    assert engine.registry.devices["a"].connection == "n2"
    will(engine, "a", "n2")
    assert not engine.registry.devices["a"].online
    # A board back after a reboot may have an earlier clock: it is back all the same.
    connect(engine, "a", "n3", 0.5)
    assert engine.registry.devices["a"].online


def test_an_offline_status_for_a_later_round_leaves_the_open_round_alone(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a",), offline_grace_s=5.0)
    connect(engine, "a", "n1", 1.0)
    engine.open_round(1)
    say(engine, "a", "offline", 7, nonce="n1", at=2.0, detail="away")
    clock.now += 5.0
    assert not closes(engine) and engine.round_state.dropped == {}
    # What the device says next (its own word again) makes it selectable.
    say(engine, "a", "online", 0, nonce="n1", at=3.0, detail=STATUS_CONNECTED)
    assert [d.client_id for d in engine.registry.online()] == ["a"]


def test_rejected_counts_per_round_and_in_total(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a",))
    _, tasks = frames(engine.open_round(1))
    update = echo_update(engine, tasks["a"])
    engine.receive(UPDATE, "a", update)
    engine.receive(UPDATE, "a", update)
    assert engine.close_round()["rejected"] == {"duplicate": 1}
    engine.receive(UPDATE, "a", update)  # between rounds: counted in the next row
    _, tasks = frames(engine.open_round(2))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    assert engine.close_round()["rejected"] == {"stale": 1}
    _, tasks = frames(engine.open_round(3))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    assert engine.close_round()["rejected"] == {}
    ckpt = snapshot(engine, 3, 0)
    assert ckpt.rejected == {"duplicate": 1, "stale": 1}
    resumed, _ = engine_with(tmp_path, devices=())
    restore(resumed, ckpt)
    _, tasks = frames(resumed.open_round(4))
    assert resumed.close_round()["rejected"] == {}


def test_two_devices_with_the_same_data_are_warned_about(tmp_path, caplog):
    engine, _ = engine_with(tmp_path, devices=())
    caplog.set_level(logging.WARNING, "fedmpq.coordinator")
    for cid, fp in (("a", "f1"), ("b", "f2"), ("c", "f1"), ("d", "")):
        enroll(engine, RegisterMessage(cid, "test", PROFILE, 100, True, time.time(), fp))
    warnings = [r.getMessage() for r in caplog.records if "same data" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("c trains on the same data as a (data fingerprint f1)")


def test_a_round_without_answers_leaves_the_released_bits_alone(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a",))
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    engine.close_round()
    trained_at = dict(engine.last_allocation)
    engine.open_round(2)
    clock.now += DEADLINE
    engine.close_round()  # no answer: the model is still the one of round 1
    assert engine.last_allocation == trained_at
    w = engine.workload
    release_model(engine.config, w.model, w.global_state, trained_at, w.data, 2)
    written = json.loads((tmp_path / FINAL_BITS).read_text())
    assert written["bits"] and set(written["bits"].values()) == {4}
    # A resumed run with nothing left to train keeps the bits it had.
    release_model(engine.config, w.model, w.global_state, {}, w.data, 2)
    assert json.loads((tmp_path / FINAL_BITS).read_text())["bits"] == written["bits"]


def test_with_no_bits_anywhere_no_final_bits_file_is_written(tmp_path):
    engine, _ = engine_with(tmp_path, devices=())
    w = engine.workload
    assert release_model(engine.config, w.model, w.global_state, {}, w.data, 1) is None
    assert not (tmp_path / FINAL_BITS).exists()


def test_a_status_without_the_nonce_the_device_uses_is_ignored(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a",))
    connect(engine, "a", "n1", 1.0)
    will(engine, "a", "")  # the constant will of agents before nonces: spoofable by anyone
    assert engine.registry.devices["a"].online


def test_the_first_nonce_learned_is_not_a_reconnect(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a",))
    engine.open_round(1)
    assert connect(engine, "a", "n1", 1.0) == []  # said right after registering: no re-send
    assert [m.kind for m in connect(engine, "a", "n2", 2.0)] == [TASK]


def test_a_device_whose_will_overtook_its_update_is_in_the_next_round(tmp_path):
    """After a broker restart the will of the broken connection can arrive, then the
    device's update (sent over its new connection), and only then its new connection's
    status: the next round opens in between and must not leave the device out."""
    engine, _ = engine_with(tmp_path, devices=("a", "b"))
    connect(engine, "a", "n1", 1.0)
    _, tasks = frames(engine.open_round(1))
    will(engine, "a", "n1")
    for cid in ("a", "b"):
        engine.receive(UPDATE, cid, echo_update(engine, tasks[cid]))
    assert engine.close_round()["participants"] == ["a", "b"]
    _, tasks = frames(engine.open_round(2))
    assert sorted(tasks) == ["a", "b"]


def test_the_probe_answer_teaches_the_devices_connection(tmp_path):
    """A device's first status can arrive before its registration is proven; the probe's
    answer, sent over the same connection, still tells the coordinator which one is its."""
    engine, _ = engine_with(tmp_path, devices=())
    reg = RegisterMessage("a", "test", PROFILE, 100, True, time.time())
    (probe,) = engine.receive(REGISTER, "a", encode(reg))
    connect(engine, "a", "n1", 1.0)  # about no known device yet
    say(engine, "a", "rejected", 0, nonce="n1", at=1.5, detail=decode(probe.payload).reason)
    will(engine, "a", "n0")  # the will of an earlier connection
    assert [d.client_id for d in engine.registry.online()] == ["a"]
