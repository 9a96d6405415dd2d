"""The accuracy-per-bit benchmark's policy table: every entry is a valid ``[policy]`` table
once the benchmark's own ``budgets`` key is taken out, and that key gives every device a
budget."""

import pytest

from benchmarks.accuracy_per_bit import CLIENTS, POLICIES, WIRE_BUDGETS, Run, policy_params
from fedmpq.policy_catalog import check_policy


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_benchmark_policy_is_a_valid_policy_table(name):
    params = policy_params(Run("fashion-mnist-small", "cnn", 0.5, name, 1, 1, 0))
    assert "budgets" not in params
    check_policy(params, "accuracy_per_bit")  # raises ConfigError on an unknown key
    budgets = POLICIES[name].get("budgets", WIRE_BUDGETS)
    assert len(budgets) == CLIENTS and all(1 <= b <= 8 for b in budgets)


def test_the_4_bit_fleet_policies_are_adaptive_at_4_bits():
    for name, policy in (("fedlq4", "fedlq"), ("fedmpq4", "fedmpq")):
        assert POLICIES[name]["name"] == policy
        assert POLICIES[name]["budgets"] == [4] * CLIENTS
