import random

import numpy as np
import pytest

from coordinator.checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint, save_checkpoint
from coordinator.registry import DeviceRecord
from fedmpq.errors import ConfigError
from fedmpq.state import fingerprint
from fedmpq.wire.codec import encode
from fedmpq.wire.messages import DeviceProfile, GlobalModelMessage
from fedmpq.wire.tensors import decode_state, encode_state

PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64", uplink_bps=1e6)


def make_checkpoint():
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32)}
    frame = encode(GlobalModelMessage("r", 3, "mlp", fingerprint(state), encode_state(state, {})))
    rng = random.Random(5)
    rng.random()
    return (
        state,
        rng,
        Checkpoint(
            run_id="r",
            round=3,
            global_frame=frame,
            policy_state={"mean_bits": {"w": 3.5}},
            devices=[DeviceRecord("device-0001", PROFILE, 100, True)],
            rng_state=rng.getstate(),
            cumulative_uplink_bytes=12345,
            rejected={"stale": 2},
        ),
    )


def test_round_trip_keeps_model_bytes_rng_and_state(tmp_path):
    state, rng, ckpt = make_checkpoint()
    save_checkpoint(tmp_path, ckpt)
    loaded = load_checkpoint(tmp_path)
    assert loaded.global_frame == ckpt.global_frame
    restored = decode_state(loaded.global_model().tensors)
    assert all(np.array_equal(restored[k], state[k]) for k in state)
    other = random.Random()
    other.setstate(loaded.rng_state)
    assert other.random() == rng.random()
    assert loaded.policy_state == ckpt.policy_state
    assert loaded.devices[0].profile == PROFILE
    assert loaded.devices[0].online is False
    assert (loaded.round, loaded.cumulative_uplink_bytes, loaded.rejected) == (
        3,
        12345,
        {"stale": 2},
    )


def test_missing_and_damaged_checkpoints_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x93\x01")
    with pytest.raises(ConfigError, match="cannot resume"):
        load_checkpoint(tmp_path)


def test_save_leaves_no_temporary_file(tmp_path):
    _, _, ckpt = make_checkpoint()
    save_checkpoint(tmp_path, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
