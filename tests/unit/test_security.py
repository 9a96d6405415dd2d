"""The pure parts of issue 15's defences: coordinator signatures and sequences, key files,
bounded decompression, clipping, the aggregate guard, sample caps, rate-limited logs,
device task limits, the training stop flag, liveness probes and poisoned updates."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pytest
import torch
import zstandard

from benchmarks.round_driver import enroll, frames
from coordinator.aggregation import AdaptiveClip
from coordinator.aggregation.robust import change_norm, clip_factor
from coordinator.config import RunConfig
from coordinator.engine import RoundEngine
from coordinator.enrolment import MAX_PENDING_REGISTRATIONS
from coordinator.validation import MoveGuard, Rejections, norm_problem, update_weight
from edge_client.downlink_check import DownlinkCheck, RateLimitedLog
from edge_client.task import TaskLimits, limit_problem
from edge_client.training import TrainingStopped, train_local
from fedmpq.errors import ConfigError, DecodeError
from fedmpq.keys_cli import main as keys_main
from fedmpq.models import build_model
from fedmpq.topics import REGISTER, UPDATE
from fedmpq.wire.codec import (
    DecodeLimits,
    decode,
    decode_body,
    decode_envelope,
    encode,
    sign_frame,
    verify_coordinator,
)
from fedmpq.wire.messages import (
    ControlMessage,
    DeviceProfile,
    RegisterMessage,
    ResourceUsage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.signing import (
    CoordinatorSigner,
    generate_coordinator_key,
    load_key_file,
    write_keyring,
)
from fedmpq.wire.tensors import encode_state

PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64")
LIMITS = DecodeLimits()


def control(state: str = "finished", run: str = "r") -> ControlMessage:
    return ControlMessage(run, state, 3, "", time.time())


# --------------------------------------------------------------------------- signatures


@pytest.fixture(scope="module")
def coordinator_key() -> tuple[bytes, bytes]:
    return generate_coordinator_key()


def test_coordinator_frames_verify_only_under_its_key(coordinator_key):
    private, public = coordinator_key
    signer = CoordinatorSigner(private)
    frame = encode(control(), key=signer)
    assert verify_coordinator(decode_envelope(frame), public) is not None
    _, other_public = generate_coordinator_key()
    assert verify_coordinator(decode_envelope(frame), other_public) is None
    assert verify_coordinator(decode_envelope(encode(control())), public) is None


def test_a_signed_frame_with_any_byte_of_its_body_changed_is_refused(coordinator_key):
    private, public = coordinator_key
    env = decode_envelope(encode(control(), key=CoordinatorSigner(private)))
    for i in range(len(env.body)):
        body = bytearray(env.body)
        body[i] ^= 0x01
        forged = type(env)(env.version, env.type, env.codec, bytes(body), env.sig)
        assert verify_coordinator(forged, public) is None


def test_sign_frame_signs_an_encoded_frame_with_a_fresh_sequence(coordinator_key):
    private, public = coordinator_key
    signer = CoordinatorSigner(private)
    plain = encode(control(), compress=True)
    first, second = sign_frame(plain, signer), sign_frame(plain, signer)
    seq1 = verify_coordinator(decode_envelope(first), public)
    seq2 = verify_coordinator(decode_envelope(second), public)
    assert seq1 is not None and seq2 is not None and seq2 > seq1
    assert decode(first) == decode(plain)


def test_downlink_check_refuses_unsigned_forged_and_replayed_frames(coordinator_key, caplog):
    private, public = coordinator_key
    signer = CoordinatorSigner(private)
    check = DownlinkCheck(public, RateLimitedLog())
    old = encode(control("open"), key=signer)
    new = encode(control("open"), key=signer)
    assert check.admit("d", "control", new, LIMITS)
    assert check.admit("d", "control", new, LIMITS)  # the same frame again (QoS 1, retained)
    assert not check.admit("d", "control", old, LIMITS)  # captured earlier, played back
    assert check.admit("d", "global", old, LIMITS)  # sequences are per topic kind
    with caplog.at_level(logging.WARNING, "fedmpq.agent"):
        for _ in range(50):
            assert not check.admit("d", "control", encode(control()), LIMITS)
    assert check.refusals.counts == {"replay": 1, "signature": 50}
    unsigned = [r for r in caplog.records if "not signed" in r.getMessage()]
    assert len(unsigned) == 1  # once per reason per second
    assert DownlinkCheck(None, RateLimitedLog()).admit("d", "control", old, LIMITS)


def test_keys_cli_writes_the_coordinator_pair_and_one_file_per_device(tmp_path, capsys):
    out, devices = tmp_path / "keys.toml", tmp_path / "devices"
    assert keys_main(["--out", str(out), "--count", "2", "--device-dir", str(devices)]) == 0
    coordinator = load_key_file(out)
    assert sorted(coordinator.keys) == ["device-0000", "device-0001"]
    assert coordinator.coordinator_private is not None
    signer = coordinator.signer(out)
    one = load_key_file(devices / "device-0001.toml")
    assert one.keys == {"device-0001": coordinator.keys["device-0001"]}
    assert one.coordinator_private is None
    public = one.require_public(devices / "device-0001.toml")
    assert verify_coordinator(decode_envelope(encode(control(), key=signer)), public)
    with pytest.raises(ConfigError, match="no \\[coordinator\\] private_key"):
        one.signer("device-0001.toml")
    assert oct((devices / "device-0001.toml").stat().st_mode & 0o777) == "0o600"


def test_a_key_file_whose_coordinator_keys_do_not_match_is_refused(tmp_path, coordinator_key):
    private, _ = coordinator_key
    _, other_public = generate_coordinator_key()
    path = tmp_path / "k.toml"
    keys = {"d": b"k" * 32}
    write_keyring(path, keys, coordinator_public=other_public, coordinator_private=private)
    with pytest.raises(ConfigError, match="do not belong together"):
        load_key_file(path)


# --------------------------------------------------------------------------- zstd bombs


def _zstd_frame(msg_type: str, declared: int) -> bytes:
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * declared)
    ok = encode(control(), compress=True)
    env = decode_envelope(ok)
    return type(env)(env.version, msg_type, "zstd", bomb, b"")  # type: ignore[return-value]


@pytest.mark.parametrize(("msg_type", "declared"), [("update", 64 * 2**20), ("control", 2**21)])
def test_a_zstd_bomb_is_refused_before_it_is_decompressed(msg_type, declared):
    env = _zstd_frame(msg_type, declared)
    assert len(env.body) < 1024 * 64  # type: ignore[attr-defined]
    started = time.perf_counter()
    with pytest.raises(DecodeError, match="declares"):
        decode_body(env)  # type: ignore[arg-type]
    assert time.perf_counter() - started < 1.0  # refused from the header, not by inflating it


# --------------------------------------------------------------------------- robust aggregation


def _state(value: float, n: int = 4) -> dict[str, np.ndarray]:
    return {"w": np.full(n, value, dtype=np.float32)}


def test_adaptive_clip_scales_an_outlier_onto_the_median_bound():
    glob = _state(0.0)
    clip = AdaptiveClip(glob, "weights", multiple=2.0, warmup=3)
    assert clip.add(_state(1.0), 1.0, 2.0) == []  # held until the warm-up is over
    assert clip.add(_state(1.5), 1.0, 3.0) == []
    out = clip.add(_state(1e30), 1.0, change_norm(_state(1e30), glob, "weights"))
    assert len(out) == 3
    norms = [change_norm(t, glob, "weights") for t, _ in out]
    assert norms[:2] == pytest.approx([2.0, 3.0])
    assert norms[2] == pytest.approx(2.0 * 3.0)  # 2 x the median of (2, 3, 2e30)
    ((later, _),) = clip.add(_state(0.5), 1.0, 1.0)
    assert change_norm(later, glob, "weights") == pytest.approx(1.0)  # under the bound: as is
    assert clip.clipped == 1


def test_clip_factor_and_norm_problem():
    assert clip_factor(1.0, 2.0) == 1.0
    assert clip_factor(4.0, 2.0) == 0.5
    assert norm_problem(math.inf, 0.0) is not None
    assert norm_problem(5.0, 0.0) is None
    assert norm_problem(5.0, 4.0) is not None
    huge = change_norm(_state(3e38), _state(0.0), "weights")
    assert math.isfinite(huge)  # float64: finite float32 weights never overflow the norm


def test_an_update_weighs_at_most_what_its_device_registered():
    msg = UpdateMessage("r", 1, "d", 10**12, "fp", "weights", [], ResourceUsage(0, 0, 0), {})
    assert update_weight(msg, 600) == 600.0
    msg.num_samples = 50
    assert update_weight(msg, 600) == 50.0


def test_move_guard_discards_non_finite_and_far_moves_and_relaxes_when_honest():
    glob = _state(0.0)
    guard = MoveGuard(10.0)
    assert guard.check(_state(1.0), glob) is None  # first round: only finiteness
    assert guard.check(_state(np.nan), glob) is not None
    assert guard.check(_state(1e30), glob) is not None
    # A legitimate 30x jump waits two rounds (the bound doubles per discard), never forever.
    verdicts = [guard.check(_state(30.0), glob) is None for _ in range(4)]
    assert verdicts.index(True) <= 2
    assert MoveGuard(0.0).check(_state(1e30), glob) is None


def test_rejections_are_all_counted_and_logged_once_per_reason_per_second(caplog):
    now = [0.0]
    rejections = Rejections(clock=lambda: now[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, "fedmpq.coordinator"):
        for _ in range(1000):
            rejections.reject("bad_signature", "x", "no")
        rejections.reject("malformed", "x", "no")
        now[0] = 1.5
        rejections.reject("bad_signature", "x", "no")
    assert rejections.counts == {"bad_signature": 1001, "malformed": 1}
    assert len(caplog.records) == 3
    assert "and 999 more" in caplog.records[-1].getMessage()


# --------------------------------------------------------------------------- the device


def _task(**overrides: object) -> TaskMessage:
    fields = dict(
        run_id="r", round=1, client_id="d", model_name="mlp", model_fingerprint="fp",
        policy="fixed", bits={}, scheme="symmetric", per_channel=True, epochs=1,
        batch_size=32, learning_rate=0.05, deadline_s=60.0, compress=False,
    )  # fmt: skip
    return TaskMessage(**{**fields, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [{"epochs": 10**6}, {"batch_size": 10**7}, {"learning_rate": 1e9}, {"deadline_s": 1e12}],
)
def test_a_task_outside_the_devices_limits_is_refused(overrides):
    assert limit_problem(_task(), TaskLimits(), 10_000) is None
    assert "outside this device's limits" in str(limit_problem(_task(**overrides), TaskLimits(), 1))
    assert limit_problem(_task(), TaskLimits(), 10**9) is not None  # model too large


def test_training_stops_between_batches_when_asked():
    net = build_model("mlp", 10, (1, 28, 28))
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingStopped):
        train_local(
            net, x, y, {}, scheme="symmetric", per_channel=True, epochs=10**6, batch_size=8,
            learning_rate=0.01, stop=stop,
        )  # fmt: skip


# --------------------------------------------------------------------------- the engine


def _engine(tmp_path, **settings: object) -> RoundEngine:
    config = RunConfig(
        run_id="sec", model="mlp", rounds=1, out_dir=str(tmp_path), publish_onnx=False,
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    return RoundEngine(config)


def test_a_register_flood_never_reaches_the_registry(tmp_path):
    engine = _engine(tmp_path)
    started = time.perf_counter()
    for i in range(5000):
        reg = RegisterMessage(f"fake-{i}", "x", PROFILE, 10**12, True, 0.0)
        out = engine.receive(REGISTER, reg.client_id, encode(reg))
        assert len(out) == 1  # one probe each, nothing else
    elapsed = time.perf_counter() - started
    assert engine.registry.devices == {}
    assert len(engine.enrolment.pending) == MAX_PENDING_REGISTRATIONS
    assert engine.rejections.counts["unproven"] == 5000 - MAX_PENDING_REGISTRATIONS
    assert engine.select(3) == []
    enroll(engine, RegisterMessage("real", "x", PROFILE, 100, True, 0.0))  # answers its probe
    assert [d.client_id for d in engine.select(3)] == ["real"]
    print(f"5000 registrations handled in {elapsed:.2f} s")


@pytest.mark.parametrize("attack", ["samples", "scales"])
def test_a_compromised_devices_update_cannot_poison_the_model(tmp_path, attack):
    engine = _engine(tmp_path, quorum=0.0, client_budgets={"a": 4.0, "b": 4.0, "c": 4.0})
    for cid in ("a", "b", "c"):
        samples = 10**12 if cid == "c" else 100  # c claims a huge share at registration too
        enroll(engine, RegisterMessage(cid, "x", PROFILE, samples, True, 0.0))
    start = {k: v.copy() for k, v in engine.global_state.items()}
    _, tasks = frames(engine.open_round(1))
    rng = np.random.default_rng(0)
    for cid, frame in tasks.items():
        task = decode(frame, TaskMessage)
        state = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in start.items()}
        samples = 100
        if cid == "c" and attack == "scales":
            state = {k: v * np.float32(1e30) for k, v in state.items()}
        if cid == "c" and attack == "samples":
            state = {k: v + np.float32(12.0 / math.sqrt(v.size)) for k, v in state.items()}
            samples = 10**12
        tensors = encode_state(state, task.bits)
        update = UpdateMessage(
            "sec", 1, cid, samples, task.model_fingerprint, "weights", tensors,
            ResourceUsage(0, 0, 0), {}, token=task.token,
        )  # fmt: skip
        engine.receive(UPDATE, cid, encode(update))
    row = engine.close_round()
    new = engine.global_state
    assert all(np.isfinite(w).all() for w in new.values())
    move = change_norm(new, start, "weights")
    honest = change_norm(
        {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in start.items()},
        start,
        "weights",
    )
    # Clipped to 10x the median change, weighing at most 10 typical devices.
    assert engine.intake.sample_cap == 1000.0
    assert move <= 10 * honest * 1000 / 1200 + honest, (move, honest, row)
