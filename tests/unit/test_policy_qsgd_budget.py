"""QSGD error feedback, FedLQ allocation and device budgets."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpq.budget import RoundDemand, budget_bits
from fedmpq.errors import BudgetError
from fedmpq.models import build_model
from fedmpq.policies import LayerInfo
from fedmpq.policies.fedlq import significance_allocation
from fedmpq.policies.qsgd import RESIDUAL, QSGDHooks
from fedmpq.resources import model_cost
from fedmpq.wire.messages import DeviceProfile
from fedmpq.wire.tensors import decode_state


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**16))
def test_error_feedback_loses_nothing_over_rounds(bits, seed):
    rng = np.random.default_rng(seed)
    memory: dict[str, np.ndarray] = {}
    glob = {"w": np.zeros((8, 5), np.float32), "b": np.zeros(8, np.float32)}
    true_sum = np.zeros((8, 5))
    sent_sum = np.zeros((8, 5))
    for r in range(4):
        local = {n: w + rng.normal(size=w.shape).astype(np.float32) for n, w in glob.items()}
        hooks = QSGDHooks({"w": bits}, "symmetric", True, {}, memory, seed=r)
        tensors, dropped = hooks.make_update(local, glob, "delta")
        sent = decode_state(tensors)
        true_sum += local["w"] - glob["w"]
        sent_sum += sent["w"]
        assert dropped == {}
        np.testing.assert_allclose(sent["b"], local["b"] - glob["b"])  # float: exact
    np.testing.assert_allclose(sent_sum + memory[RESIDUAL + "w"], true_sum, atol=1e-4)


def test_stochastic_rounding_is_seeded_per_task():
    glob = {"w": np.zeros((4, 4), np.float32)}
    local = {"w": np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)}
    first = QSGDHooks({"w": 2}, "symmetric", True, {}, {}, seed=1).make_update(local, glob, "delta")
    again = QSGDHooks({"w": 2}, "symmetric", True, {}, {}, seed=1).make_update(local, glob, "delta")
    assert first[0][0].data == again[0][0].data


def test_fedlq_gives_bits_where_loss_per_byte_is_highest():
    layers = [LayerInfo("small_sensitive", 100), LayerInfo("big_robust", 900)]
    bits = significance_allocation(layers, {"small_sensitive": 1.0, "big_robust": 0.01}, 3.0)
    assert bits["small_sensitive"] == 8
    assert bits["big_robust"] < 3
    avg = (bits["small_sensitive"] * 100 + bits["big_robust"] * 900) / 1000
    assert avg <= 3.0
    flat = significance_allocation(layers, {"small_sensitive": 1.0, "big_robust": 9.0}, 1.0)
    assert flat == {"small_sensitive": 1, "big_robust": 1}


COST = model_cost(build_model("cnn", 10, (1, 28, 28)), (1, 28, 28))
DEMAND = RoundDemand(deadline_s=30.0, samples=1200, epochs=1, batch_size=32)


def profile(ram=2**30, gflops=10.0, uplink=1e6):
    return DeviceProfile(2 * ram, ram, 4, 1500.0, 0.0, gflops, "linux", "aarch64", None, uplink)


MIB = 2**20


@pytest.mark.parametrize(
    "weaker,stronger",
    [
        # RAM binds: 1-bit training of the cnn takes ~152.4 MiB here.
        ({"ram": 152.5 * MIB}, {"ram": 152.6 * MIB}),
        # The uplink binds the deadline.
        (
            {"ram": 2**30, "gflops": 1.0, "uplink": 2e4},
            {"ram": 2**30, "gflops": 1.0, "uplink": 3e4},
        ),
        # Compute eats into the deadline the uplink has left.
        (
            {"ram": 2**30, "gflops": 0.5, "uplink": 3e4},
            {"ram": 2**30, "gflops": 1.0, "uplink": 3e4},
        ),
    ],
)
def test_budget_grows_with_ram_compute_and_bandwidth(weaker, stronger):
    low = budget_bits(profile(**weaker), COST, DEMAND)
    high = budget_bits(profile(**stronger), COST, DEMAND)
    assert 1.0 <= low < high


def test_budget_is_capped_at_8_bits():
    assert budget_bits(profile(ram=2**30, gflops=100.0, uplink=1e8), COST, DEMAND) == 8.0


@pytest.mark.parametrize(
    "kwargs,reason",
    [({"ram": 100 * 2**20}, "RAM"), ({"gflops": 0.01}, "deadline"), ({"uplink": 1e3}, "deadline")],
)
def test_a_device_that_cannot_fit_one_bit_gets_a_budget_error(kwargs, reason):
    with pytest.raises(BudgetError, match=reason):
        budget_bits(profile(**kwargs), COST, DEMAND)
