"""The device interface without a broker: a real device trains and encodes; the emulated
wrapper around it crashes, goes offline, refuses or halves its batch as its profile says,
and reports the emulated time it was made of."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edge_client.device import Availability, Crashed, RealDevice, Refused, Trained
from edge_client.emulated_device import EmulatedDevice
from edge_client.emulation import ProfileBinding, round_seconds
from edge_client.profiling import measure_profile
from edge_client.shared_models import ModelPool
from fedmpq.profiles import Figure, load_profile
from fedmpq.resources import training_memory_bytes
from fedmpq.state import state_to_numpy
from fedmpq.wire.codec import decode, decode_envelope, verify_envelope
from fedmpq.wire.messages import TaskMessage, UpdateMessage

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
IN_SHAPE = (1, 28, 28)
MIB = 2**20
KEY = b"k" * 32


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool(num_classes=10, in_shape=IN_SHAPE)


@pytest.fixture(scope="module")
def global_state(pool):
    return state_to_numpy(pool.net("cnn"))


@pytest.fixture(scope="module")
def zero():
    return load_profile(PROFILES / "rpi-zero-2w.toml")


def _task(pool: ModelPool, batch: int = 32, round: int = 1) -> TaskMessage:
    names = [n for n, p in pool.net("cnn").named_parameters() if p.dim() > 1]
    return TaskMessage(
        "run", round, "dev-0", "cnn", "fp", "fixed", dict.fromkeys(names, 4), "symmetric", True,
        1, batch, 0.05, 60.0, False,
    )  # fmt: skip


def _real(samples: int = 40) -> RealDevice:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(samples, *IN_SHAPE, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return RealDevice("dev-0", x, y, measure_profile(gflops=50.0), seed=3, key=KEY)


def _emulated(spec, **binding) -> EmulatedDevice:
    return EmulatedDevice(_real(), ProfileBinding(spec, host_gflops=50.0, seed="t", **binding))


def test_real_device_trains_and_signs_its_update(pool, global_state):
    device = _real()
    assert device.online and device.round_opened(1, 1000) is None
    outcome = device.run_task(_task(pool), global_state, pool)
    assert isinstance(outcome, Trained)
    assert outcome.delay == 0.0 and outcome.timing == {}  # nothing emulated about it
    assert outcome.batch_size == 32 and outcome.host_seconds > 0
    assert verify_envelope(decode_envelope(outcome.frame), KEY)
    update = decode(outcome.frame, UpdateMessage)
    assert update.client_id == "dev-0" and update.num_samples == 40
    assert update.usage.emulated_seconds == 0.0


def test_emulated_device_reports_its_profile_not_the_host(zero):
    device = _emulated(zero)
    assert device.profile.profile_name == "rpi-zero-2w"
    assert device.profile.gflops == 5.1
    assert device.client_id == "dev-0" and device.key == KEY and device.num_samples == 40


def test_emulated_device_that_always_crashes_answers_nothing(pool, global_state, zero):
    device = _emulated(replace(zero, crash_probability=Figure(1.0, "test")))
    outcome = device.run_task(_task(pool), global_state, pool)
    assert outcome == Crashed("crashed (emulated)")
    assert device.binding.announced_online is False  # its last will said offline


def test_emulated_device_goes_offline_as_announced(zero):
    # Every online session lasts one round; the device is rarely back.
    flaky = replace(
        zero, online_probability=Figure(0.01, "test"), mean_session_rounds=Figure(1, "test")
    )
    device = _emulated(flaky)
    assert device.round_opened(1, 0) == Availability(False, 2, "emulated churn")
    assert device.online  # round 1: it has just registered
    assert device.round_opened(2, 0) is None  # still away: the coordinator already knows
    assert not device.online  # round 2, as announced


def test_emulated_device_halves_its_batch_to_fit_its_ram(pool, global_state, zero):
    cost = pool.cost("cnn")
    need16 = training_memory_bytes(cost, 4.0, 16)
    assert need16 < training_memory_bytes(cost, 4.0, 32)
    reserved = zero.os_reserved_mb.value
    small = replace(zero, ram_mb=Figure(need16 / MIB + reserved + 0.01, "test"))
    device = _emulated(small)
    device.round_opened(1, global_bytes=400_000)
    device.task_arrived(2_000)
    outcome = device.run_task(_task(pool, batch=32), global_state, pool)
    assert isinstance(outcome, Trained)
    assert outcome.batch_size == 16
    timing = outcome.timing
    assert timing["host_seconds"] == outcome.host_seconds
    assert timing["compute_seconds"] == pytest.approx(outcome.host_seconds * 50.0 / 5.1)
    assert timing["downlink_bytes"] == 402_000 and timing["host_gflops"] == 50.0
    emulated = round_seconds(small, timing["compute_seconds"], 402_000, len(outcome.frame))
    assert decode(outcome.frame, UpdateMessage).usage.emulated_seconds == pytest.approx(emulated)
    assert outcome.delay == 0.0  # not realtime: reported only


def test_emulated_device_refuses_what_its_ram_cannot_hold(pool, global_state, zero):
    tiny = replace(zero, ram_mb=Figure(300, "test"), os_reserved_mb=Figure(160, "test"))
    outcome = _emulated(tiny).run_task(_task(pool), global_state, pool)
    assert isinstance(outcome, Refused)
    assert "even at batch size 1" in outcome.reason


def test_realtime_emulation_holds_the_update_for_the_emulated_time(pool, global_state, zero):
    device = _emulated(zero, realtime=True)
    device.round_opened(1, global_bytes=3_000_000)
    outcome = device.run_task(_task(pool), global_state, pool)
    assert isinstance(outcome, Trained)
    emulated = outcome.update.usage.emulated_seconds
    assert outcome.delay == pytest.approx(emulated - outcome.result.seconds)
    assert outcome.delay > 0  # a 5.1 GFLOPS board on a 30 Mbit/s link is slower than the host
