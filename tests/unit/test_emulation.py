"""An emulated device obeys its profile: reported figures, memory fit, time, churn, crashes;
and the coordinator stops waiting for a selected device that drops out."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.round_driver import enroll
from coordinator.config import RunConfig
from coordinator.engine import RoundEngine
from edge_client.emulation import ANALYTIC, ProfileBinding, round_seconds
from edge_client.memory import fit_batch_size
from fedmpq.errors import BudgetError, ConfigError
from fedmpq.models import build_model
from fedmpq.profiles import Figure, load_profile
from fedmpq.resources import model_cost, training_memory_bytes, training_seconds
from fedmpq.topics import STATUS
from fedmpq.wire.codec import encode
from fedmpq.wire.messages import RegisterMessage, StatusMessage, TaskMessage

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
IN_SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def zero():
    return load_profile(PROFILES / "rpi-zero-2w.toml")


@pytest.fixture(scope="module")
def cost():
    return model_cost(build_model("cnn", 10, IN_SHAPE), IN_SHAPE)


def _task(bits: int = 4, batch: int = 32) -> TaskMessage:
    net = build_model("cnn", 10, IN_SHAPE)
    names = [n for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    return TaskMessage(
        "run", 1, "d", "cnn", "fp", "fixed", dict.fromkeys(names, bits), "symmetric", True,
        1, batch, 0.05, 60.0, False,
    )  # fmt: skip


def test_reports_the_profile_not_the_host(zero):
    reported = ProfileBinding(zero, host_gflops=40.0, seed="s").reported_profile()
    assert reported.profile_name == "rpi-zero-2w"
    assert reported.total_ram == 512 * 2**20
    assert reported.available_ram == (512 - 120) * 2**20
    assert reported.gflops == 5.1 and reported.cpu_count == 4
    assert reported.uplink_bps == 25e6 and reported.downlink_bps == 30e6
    assert reported.latency_s == pytest.approx(0.005)


def test_compute_is_stretched_and_transfers_take_bytes_over_bandwidth(zero, cost):
    device = ProfileBinding(zero, host_gflops=51.0, seed="s")
    device.open_round(1, global_bytes=3_000_000)
    device.task_received(1000)
    compute = device.compute_seconds(0.2, cost, samples=100, epochs=1)
    assert compute == pytest.approx(2.0)  # 0.2 s x 51 / 5.1
    total = device.emulated_seconds(compute, uplink_bytes=250_000)
    down = 0.005 + 8 * 3_001_000 / 30e6
    up = 0.005 + 8 * 250_000 / 25e6
    assert total == pytest.approx(down + 2.0 + up)
    assert total == pytest.approx(round_seconds(zero, 2.0, 3_001_000, 250_000))
    analytic = ProfileBinding(zero, 51.0, "s", compute_time=ANALYTIC)
    assert analytic.compute_seconds(0.2, cost, 100, 1) == training_seconds(cost, 100, 1, 5.1)
    with pytest.raises(ConfigError, match="compute time"):
        ProfileBinding(zero, 51.0, "s", compute_time="guess")


def test_churn_follows_availability_and_session_length(zero):
    device = ProfileBinding(zero, 40.0, seed="churn")
    states, changes = [], 0
    for r in range(1, 20_001):
        if device.open_round(r, 0) is not None:
            changes += 1
        states.append(device.online)
    assert device.open_round(5, 0) is None  # an old round changes nothing
    online = sum(states) / len(states)
    assert online == pytest.approx(0.9, abs=0.02)
    # Mean online session = rounds online / sessions started.
    sessions = sum(1 for a, b in itertools.pairwise(states) if b and not a) + 1
    assert sum(states) / sessions == pytest.approx(10, rel=0.15)
    assert changes == pytest.approx(2 * sessions, abs=3)


def test_draws_are_seeded_and_crashes_follow_the_profile(zero):
    crashy = replace(zero, crash_probability=Figure(0.25, "test"))
    a = ProfileBinding(crashy, 40.0, seed="x")
    b = ProfileBinding(crashy, 40.0, seed="x")
    draws = [a.crashes() for _ in range(4000)]
    assert draws == [b.crashes() for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(0.25, abs=0.03)
    c = ProfileBinding(crashy, 40.0, seed="y")
    assert [c.crashes() for _ in range(4000)] != draws


def test_round_one_is_online_and_a_crash_is_announced_back(zero):
    always_crash = replace(zero, crash_probability=Figure(1.0, "test"))
    device = ProfileBinding(always_crash, 40.0, seed="s")
    assert device.open_round(1, 0) in (None, False)
    assert device.online
    assert device.crashes()
    assert device.announced_online is False
    announced = [device.open_round(r, 0) for r in range(2, 60)]
    assert True in announced  # it reboots and says so


def test_memory_fit_keeps_halves_or_refuses(cost):
    task = _task(bits=4, batch=32)
    need = training_memory_bytes(cost, 4.0, 32)
    assert fit_batch_size(task, cost, need) == 32
    assert fit_batch_size(task, cost, need - 1) == 16
    assert fit_batch_size(task, cost, training_memory_bytes(cost, 4.0, 1)) == 1
    with pytest.raises(BudgetError, match="even at batch size 1") as err:
        fit_batch_size(task, cost, training_memory_bytes(cost, 4.0, 1) - 1)
    assert "MiB are free" in str(err.value)


def test_memory_fit_uses_the_profile_free_ram(zero, cost):
    tiny = replace(zero, ram_mb=Figure(300, "test"), os_reserved_mb=Figure(160, "test"))
    device = ProfileBinding(tiny, 40.0, "s")
    with pytest.raises(BudgetError):
        fit_batch_size(_task(), cost, device.available_ram)  # 140 MiB < the runtime alone
    assert fit_batch_size(_task(), cost, ProfileBinding(zero, 40.0, "s").available_ram) == 32


PROFILE = load_profile(PROFILES / "rpi-4b-4gb.toml")


def _coordinator(tmp_path) -> RoundEngine:
    config = RunConfig(
        run_id="drop",
        model="mlp",
        rounds=1,
        min_clients=3,
        out_dir=str(tmp_path),
        offline_grace_s=0,
    )
    coordinator = RoundEngine(config)
    reported = ProfileBinding(PROFILE, 40.0, "s").reported_profile()
    for cid in ("a", "b", "c"):
        reg = RegisterMessage(cid, "test", reported, 600, True, time.time())
        enroll(coordinator, reg)
    return coordinator


def _status(coordinator, cid, state, round):
    msg = StatusMessage(cid, state, round, "test", time.time())
    coordinator.receive(STATUS, cid, encode(msg))


def test_coordinator_stops_waiting_for_devices_that_drop_out(tmp_path):
    coordinator = _coordinator(tmp_path)
    coordinator.open_round(1)
    _status(coordinator, "a", "offline", 2)  # away next round: still expected now
    assert not coordinator.round_state.dropped
    _status(coordinator, "a", "offline", 1)  # crashed this round
    _status(coordinator, "b", "offline", 0)  # last will
    assert not coordinator.round_state.complete()
    _status(coordinator, "c", "rejected", 1)  # refused: does not fit
    assert coordinator.round_state.complete()
    row = coordinator.close_round()
    assert set(row["dropped"]) == {"a", "b", "c"}
    assert row["participants"] == [] and not row["counted"]
    # Offline devices are not selected for the next round; the one that refused is.
    assert [d.client_id for d in coordinator.registry.select(0, coordinator.rng)] == ["c"]
    # "a" said it is away; "b" lost its link (will): only "b" is waited for.
    assert {d.client_id for d in coordinator.registry.accounted_for()} == {"a", "c"}
