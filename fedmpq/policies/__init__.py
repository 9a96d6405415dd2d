"""Bit-allocation policies: one module each, found and registered automatically.

``make_policy("fixed", bits=4)`` builds a policy by name; ``policy_names()`` lists them.
A new policy is one new module in this package that decorates its class with
``@register_policy``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from fedmpq.errors import ConfigError
from fedmpq.policies.base import (
    BitAllocation,
    ClientHooks,
    ClientInfo,
    ClientResult,
    LayerInfo,
    Policy,
    PolicyContext,
)
from fedmpq.policy_catalog import parse_policy

__all__ = [
    "BitAllocation",
    "ClientHooks",
    "ClientInfo",
    "ClientResult",
    "LayerInfo",
    "Policy",
    "PolicyContext",
    "make_policy",
    "parse_policy",
    "policy_class",
    "policy_names",
    "register_policy",
]

_REGISTRY: dict[str, type[Policy]] = {}
P = TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    """Class decorator: make a policy available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def policy_names() -> list[str]:
    """Names of every registered policy."""
    _discover()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    """The registered policy class called ``name`` (clients read its class attributes)."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown policy {name!r}; known policies: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def make_policy(name: str, **params: Any) -> Policy:
    """Build the policy called ``name`` with its keyword parameters."""
    cls = policy_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(
            f"policy {name!r} does not take these parameters {params}: {exc}"
        ) from exc
