"""Re-sent tasks in the round engine, on an injected clock (no broker, no sleeping): a
selected device that stays silent is asked again well before the deadline, its re-sent
update counts once, a replay of an accepted update is still refused, and every re-sent
byte is in the link bytes of the round's row."""

from __future__ import annotations

from test_round_engine import DEADLINE, echo_update, engine_with, status

from benchmarks.round_driver import frames
from coordinator.resend import MAX_TASK_RESENDS, TaskResends
from fedmpq.topics import CONTROL, MODEL_AT, TASK, UPDATE
from fedmpq.wire.messages import STATUS_CONNECTED

FIRST = DEADLINE / 8  # when a silent device is first asked again


def asked(engine) -> list[tuple[str, str | None]]:
    return [(m.kind, m.client_id) for m in engine.tick()]


def down(engine, cid: str) -> int:
    return engine.round_state.down_bytes[cid]


def test_the_schedule_doubles_and_stops_before_the_deadline():
    resends = TaskResends.for_deadline(300.0)
    resends.arm(["a"], 0.0)
    times = []
    for t in range(0, 600):
        if resends.take_due(float(t) / 2, {"a"}, deadline=300.0):
            times.append(t / 2)
    assert times == [37.5, 112.5, 262.5] and MAX_TASK_RESENDS == 3
    late = TaskResends.for_deadline(300.0)
    late.arm(["a"], 0.0)
    assert late.take_due(300.0, {"a"}, deadline=300.0) == []  # the round is closing
    assert late.take_due(40.0, set(), deadline=300.0) == [] and late.due == {}  # not waited for


def test_a_silent_device_gets_its_task_again_before_the_deadline(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a", "b"))
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    first_down = down(engine, "b")
    clock.now += FIRST - 0.001
    assert asked(engine) == []
    clock.now += 0.001
    again = engine.tick()
    assert [(m.kind, m.client_id, m.payload) for m in again] == [(TASK, "b", tasks["b"])]
    assert down(engine, "b") == first_down + len(tasks["b"])  # counted as delivered again
    clock.now += 2 * FIRST - 0.001
    assert asked(engine) == []  # backoff: twice as long
    clock.now += 0.001
    assert asked(engine) == [(TASK, "b")]
    clock.now += 4 * FIRST
    assert asked(engine) == [(TASK, "b")]
    clock.now = engine.deadline() - 0.001
    assert asked(engine) == [] and not engine.done()  # at most MAX_TASK_RESENDS times
    row = engine.close_round()
    assert row["link_bytes"]["b"]["down"] == first_down + 3 * len(tasks["b"])


def test_a_resent_update_counts_once_and_its_replay_is_refused(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a", "b"))
    _, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    lost = echo_update(engine, tasks["b"])  # the broker dropped it: never received
    clock.now += FIRST
    assert asked(engine) == [(TASK, "b")]
    engine.receive(UPDATE, "b", lost)  # the device answers the repeated task: same bytes
    assert engine.tick() == [] and engine.done()  # complete, long before the deadline
    engine.receive(UPDATE, "b", lost)  # a replay of the accepted update
    row = engine.close_round()
    assert row["participants"] == ["a", "b"] and row["counted"]
    assert row["rejected"] == {"duplicate": 1}
    assert row["link_bytes"]["b"]["up"] == len(lost) and row["round_seconds"] == FIRST


def test_a_device_heard_from_is_asked_again_later(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a",))
    engine.open_round(1)
    clock.now += FIRST - 1.0
    status(engine, "a", "online", 1, "still here")  # its own word: it is there
    clock.now += 1.0
    assert asked(engine) == []
    clock.now += FIRST - 1.0
    assert asked(engine) == [(TASK, "a")]


def test_an_offline_device_is_not_asked_until_it_is_back(tmp_path):
    engine, clock = engine_with(tmp_path, devices=("a",), offline_grace_s=DEADLINE)
    _, tasks = frames(engine.open_round(1))
    status(engine, "a", "offline", 0)  # its last will: waiting out its grace
    clock.now += 2 * FIRST
    assert asked(engine) == []
    before = down(engine, "a")
    back = status(engine, "a", "online", 1, STATUS_CONNECTED)  # reconnected: task again
    assert [(m.kind, m.payload) for m in back] == [(TASK, tasks["a"])]
    assert down(engine, "a") == before + len(tasks["a"])


def test_what_a_reconnect_sends_again_is_counted(tmp_path):
    engine, _ = engine_with(tmp_path, devices=("a", "b"))
    models, tasks = frames(engine.open_round(1))
    engine.receive(UPDATE, "a", echo_update(engine, tasks["a"]))
    rs = engine.round_state
    before = dict(rs.down_bytes), rs.control_bytes
    resent = engine.resend()
    announce = next(m for m in resent if m.kind == CONTROL)
    model = {m.client_id: m.payload for m in resent if m.kind == MODEL_AT}
    assert model == models
    key = rs.allocation_of["b"]
    assert rs.down_bytes["b"] == before[0]["b"] + len(tasks["b"]) + len(models[key])
    assert rs.down_bytes["a"] == before[0]["a"]  # answered: nothing re-sent for it
    assert rs.control_bytes == before[1] + 2 * len(announce.payload)  # two devices online
