"""The torch-free policy table matches the registry and each policy's constructor."""

from __future__ import annotations

import inspect

from fedmpq.policies import policy_class, policy_names
from fedmpq.policy_catalog import POLICIES, policy_help


def test_catalog_names_the_registered_policies() -> None:
    assert sorted(POLICIES) == policy_names()


def test_catalog_parameters_are_the_constructors() -> None:
    for name, entry in POLICIES.items():
        signature = inspect.signature(policy_class(name).__init__)
        params = {
            p.name: p.default
            for p in signature.parameters.values()
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
        }
        assert params == dict(entry.params), name


def test_policy_help_marks_the_policies_that_take_bits() -> None:
    assert "fixed[:BITS]" in policy_help() and "float32," in policy_help()
