"""The bit-allocation policies by name, their parameters and defaults, without torch.

Command lines and config checks need the policy names before anything heavy is imported
(``fedmpq.policies`` imports torch). A test checks this table against the registry and
each policy's constructor, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmpq.errors import ConfigError

#: A policy parameter's default: its type is what a config value must have.
ParamDefault = bool | int | float | str | tuple[float, ...]


@dataclass(frozen=True)
class PolicyEntry:
    """One policy: a one-line summary, and its parameters with their defaults."""

    summary: str
    params: Mapping[str, ParamDefault]


POLICIES: Mapping[str, PolicyEntry] = {
    "float32": PolicyEntry("plain FedAvg, float32 updates", {"anchored": False}),
    "fixed": PolicyEntry(
        "uniform n-bit quantization-aware training",
        {"bits": 4, "use_budget": False, "anchored": True},
    ),
    "qsgd": PolicyEntry("float training, stochastically rounded n-bit deltas", {"bits": 4}),
    "fedmpq": PolicyEntry(
        "FedMPQ: QAT with a bit-plane lasso, planes pruned, per-layer bits within budgets",
        {
            "bits": 4.0,
            "lam": 1e-3,
            "msb_density": 0.02,
            "lsb_density": 0.02,
            "min_bits": 3,
            "anchored": True,
            "frozen": False,
            "budget_units": "wire",
            "fleet_budgets": (3.0, 3.0, 5.0, 5.0, 5.0, 7.0, 7.0, 7.0, 8.0, 8.0),
            "round_scale": False,
            "keep_norm": True,
        },
    ),
    "fedlq": PolicyEntry(
        "FedLQ-style per-layer bits from measured loss significance",
        {"bits": 4.0, "probe_bits": 2, "every": 5, "floor": 1e-4, "anchored": True, "min_bits": 3},
    ),
}


def policy_help() -> str:
    """The policies as ``--policy`` help lists them, e.g. ``fixed[:BITS]``."""
    return ", ".join(
        f"{name}[:BITS]" if "bits" in entry.params else name for name, entry in POLICIES.items()
    )


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse a command-line policy spec: ``"float32"``, ``"fixed:4"`` -> ``("fixed", {"bits": 4})``.

    The value after the colon is the policy's first parameter, ``bits``; richer settings
    belong in the run config's ``[policy]`` table.
    """
    name, _, value = spec.partition(":")
    if not value:
        return name, {}
    try:
        return name, {"bits": int(value)}
    except ValueError as exc:
        raise ConfigError(f"policy spec {spec!r}: expected NAME or NAME:BITS") from exc


def _kind(default: ParamDefault) -> str:
    kinds = {bool: "a bool", int: "an integer", str: "a string", tuple: "a list of numbers"}
    return kinds.get(type(default), "a number")


def _fits(value: Any, default: ParamDefault) -> bool:
    if isinstance(default, tuple):
        return isinstance(value, list | tuple) and all(_fits(v, 0.0) for v in value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    return isinstance(value, (int, float))


def check_policy(table: Mapping[str, Any], where: str) -> None:
    """Check a ``[policy]`` table: a known name, and parameters of the right kinds.

    Raises
    ------
    ConfigError
        Naming the key, the value and what is expected.
    """
    name = table.get("name")
    if not isinstance(name, str) or name not in POLICIES:
        raise ConfigError(
            f"{where}: policy.name: expected one of {', '.join(POLICIES)}, got {name!r}"
        )
    params = POLICIES[name].params
    for key, value in table.items():
        if key == "name":
            continue
        if key not in params:
            takes = ", ".join(params) or "no parameters"
            raise ConfigError(f"{where}: policy.{key}: policy {name!r} takes {takes}")
        if not _fits(value, params[key]):
            raise ConfigError(
                f"{where}: policy.{key}: expected {_kind(params[key])}, got {value!r}"
            )
