"""The downlink through the round engine and the agent's model cache: a selected device
starts from the coordinator's ``Q_b(w)`` bit for bit, only the selected get a model,
one payload per allocation, cleared when the round closes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from benchmarks.round_driver import enroll, frames
from coordinator.config import RunConfig
from coordinator.engine import RoundEngine
from edge_client.shared_models import GlobalModelCache, ModelPool
from fedmpq.dither import dithered_start
from fedmpq.errors import DecodeError
from fedmpq.fake_quant import fake_quantize
from fedmpq.quant_spec import (
    OBSERVER_MINMAX,
    OBSERVER_MSE,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_SYMMETRIC,
)
from fedmpq.topics import CONTROL, MODEL_AT, TASK
from fedmpq.wire.codec import DecodeLimits, decode
from fedmpq.wire.messages import DeviceProfile, RegisterMessage, TaskMessage

PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64")
DEVICES = ("a", "b", "c", "d")


def engine_for(tmp_path, policy: dict, **settings) -> RoundEngine:
    config = RunConfig(
        run_id="down", model="mlp", rounds=1, out_dir=str(tmp_path), publish_onnx=False,
        policy=policy, budgets=[2.0, 4.0, 4.0, 6.0], **settings,
    )  # fmt: skip
    engine = RoundEngine(config)
    for cid in DEVICES:
        enroll(engine, RegisterMessage(cid, "test", PROFILE, 100, True, time.time()))
    return engine


def device_start(payload: bytes, task: TaskMessage) -> dict[str, np.ndarray]:
    """What the agent trains ``task`` from after receiving ``payload`` on its link."""
    cache = GlobalModelCache()
    cache.add(payload, DecodeLimits(), ModelPool(10, (1, 28, 28)).layout(task.model_name))
    state = cache.get(task.model_fingerprint, task.model_allocation)
    assert state is not None
    return state


def fake_quantized(state: dict[str, np.ndarray], task: TaskMessage) -> dict[str, np.ndarray]:
    """``Q_b(state)`` as the device's own fake quantization computes it for ``task``."""
    axis = 0 if task.per_channel else -1
    out = dict(state)
    for name, bits in task.bits.items():
        if bits in QUANT_BITS:
            w = torch.from_numpy(state[name].copy())
            out[name] = fake_quantize(w, bits, task.scheme, axis, task.observer).detach().numpy()
    return out


@pytest.mark.parametrize(
    ("policy", "scheme", "observer"),
    [
        ({"name": "fixed", "bits": 4}, SCHEME_SYMMETRIC, OBSERVER_MINMAX),
        ({"name": "fixed", "bits": 2}, SCHEME_SYMMETRIC, OBSERVER_MSE),
        ({"name": "fixed", "bits": 3}, SCHEME_AFFINE, OBSERVER_MINMAX),
        ({"name": "fedmpq"}, SCHEME_SYMMETRIC, OBSERVER_MINMAX),
        ({"name": "fedlq"}, SCHEME_SYMMETRIC, OBSERVER_MINMAX),
    ],
)
def test_a_selected_device_starts_from_the_coordinators_q_b_w(tmp_path, policy, scheme, observer):
    engine = engine_for(tmp_path, policy, scheme=scheme, observer=observer)
    models, tasks = frames(engine.open_round(1))
    assert set(tasks) == set(DEVICES)
    for raw in tasks.values():
        task = decode(raw, TaskMessage)
        start = device_start(models[task.model_allocation], task)
        expected = fake_quantized(engine.global_state, task)
        assert set(start) == set(expected)
        for name, w in expected.items():
            assert start[name].dtype == np.float32
            assert start[name].tobytes() == w.tobytes(), name
        # The latent weights it trains from (spread over the cells) quantize to the same:
        # the forward pass sees Q_b(w).
        latent = dithered_start(
            start, task.bits, task.scheme, per_channel=task.per_channel,
            observer=task.observer, seed=7,
        )  # fmt: skip
        seen = fake_quantized(latent, task)
        assert all(seen[n].tobytes() == start[n].tobytes() for n in start)


def test_float_training_policies_get_the_float_model(tmp_path):
    for policy in ({"name": "qsgd", "bits": 4}, {"name": "float32"}):
        engine = engine_for(tmp_path, policy)
        models, tasks = frames(engine.open_round(1))
        assert list(models) == [""]  # one all-float32 payload for everyone
        task = decode(tasks["a"], TaskMessage)
        start = device_start(models[""], task)
        assert all(start[n].tobytes() == w.tobytes() for n, w in engine.global_state.items())


def test_only_the_selected_get_a_model_one_payload_per_allocation(tmp_path):
    engine = engine_for(tmp_path, {"name": "fixed", "bits": 4, "use_budget": True})
    sent = engine.open_round(1, [engine.registry.devices[c] for c in ("a", "b", "c")])
    kinds = [(m.kind, m.client_id) for m in sent]
    assert kinds[0] == (CONTROL, None)  # the round's announcement, to every device
    assert ("d" not in {c for k, c in kinds if k == TASK}) and len(kinds) == 1 + 2 + 3
    models, tasks = frames(sent)
    keys = {decode(t, TaskMessage).model_allocation for t in tasks.values()}
    assert keys == set(models) and len(models) == 2  # budgets 2, 4, 4: two allocations
    row = engine.close_round()
    assert set(row["link_bytes"]) == {"a", "b", "c"}
    for cid, link in row["link_bytes"].items():
        key = decode(tasks[cid], TaskMessage).model_allocation
        assert link == {"up": 0, "down": len(tasks[cid]) + len(models[key])}
    assert (
        row["downlink_bytes"]
        == sum(d["down"] for d in row["link_bytes"].values()) + (row["control_bytes"])
    )
    assert row["control_bytes"] == len(sent[0].payload) * len(DEVICES)
    cleared = engine.withdraw_models()
    assert sorted((m.kind, m.client_id, m.payload) for m in cleared) == sorted(
        (MODEL_AT, key, b"") for key in models
    )
    assert engine.withdraw_models() == []


def test_a_device_of_another_model_refuses_the_payload_naming_both_layouts(tmp_path):
    engine = engine_for(tmp_path, {"name": "fixed", "bits": 4})
    models, tasks = frames(engine.open_round(1))
    task = decode(tasks["a"], TaskMessage)
    ours = ModelPool(10, (1, 28, 28)).layout(task.model_name)
    theirs = ModelPool(7, (1, 28, 28)).layout(task.model_name)  # 7 classes: another head
    cache = GlobalModelCache()
    with pytest.raises(DecodeError, match=f"layout is {ours.hex}, this model's is {theirs.hex}"):
        cache.add(models[task.model_allocation], DecodeLimits(), theirs)
    assert cache.get(task.model_fingerprint, task.model_allocation) is None
