"""The bit-allocation policy interface.

A policy decides, each round, how many bits every quantizable layer gets on every
selected client, and learns from what the clients sent back.  It is a small object
with clear hooks, in the spirit of Flower's ``Strategy``:

* ``setup(layers)`` once, with the model's quantizable layers;
* ``allocate(round, clients)`` before each round;
* ``observe(round, results)`` after each round;
* ``state_dict()`` / ``load_state_dict()`` so a coordinator can checkpoint and resume.

Policies live one per module in ``fedmpq.policies`` and register themselves with
``@register_policy``; adding a policy touches one file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedmpq.wire.messages import KIND_WEIGHTS, DeviceProfile


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: its weight's parameter name and element count."""

    name: str
    numel: int


@dataclass(frozen=True)
class ClientInfo:
    """What the coordinator knows of a selected client when it allocates bits."""

    client_id: str
    profile: DeviceProfile
    num_samples: int
    budget_bits: float | None = None  # average bits the client can afford, if known


@dataclass(frozen=True)
class ClientResult:
    """What a client's accepted update taught the coordinator."""

    client_id: str
    num_samples: int
    bits: Mapping[str, int]  # per-layer bits the client actually sent
    bits_dropped: Mapping[str, int]
    metrics: Mapping[str, float]


@dataclass
class BitAllocation:
    """Per-layer bit-widths for one client and round."""

    bits: dict[str, int] = field(default_factory=dict)

    def average_bits(self, layers: Sequence[LayerInfo]) -> float:
        """Parameter-weighted average bit-width over ``layers``."""
        total = sum(layer.numel for layer in layers)
        if total == 0:
            return 0.0
        return sum(self.bits[layer.name] * layer.numel for layer in layers) / total


class Policy(ABC):
    """Base class of bit-allocation policies.

    ``update_kind`` tells the clients what to send: their full weights or a delta to
    the global model.
    """

    name: ClassVar[str]
    update_kind: ClassVar[str] = KIND_WEIGHTS

    def __init__(self) -> None:
        self.layers: list[LayerInfo] = []

    def setup(self, layers: Sequence[LayerInfo]) -> None:
        """Called once with the model's quantizable layers, before the first round."""
        self.layers = list(layers)

    @abstractmethod
    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        """Bit-widths for each selected client, keyed by client id."""

    def observe(self, round: int, results: Sequence[ClientResult]) -> None:  # noqa: B027
        """Learn from a finished round's accepted updates.  Stateless policies ignore it."""

    def client_options(self) -> dict[str, float]:
        """Numeric settings sent to clients with every task (see ``TaskMessage.options``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Learned state, msgpack-serialisable, for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027
        """Restore what ``state_dict`` returned."""

    def uniform(self, bits: int) -> BitAllocation:
        """The same bit-width for every layer."""
        return BitAllocation({layer.name: bits for layer in self.layers})
