"""The bit-allocation policy interface.

A policy decides, each round, how many bits every quantizable layer gets on every
selected client, and learns from what the clients sent back.  It is a small object
with clear hooks, in the spirit of Flower's ``Strategy``:

* ``setup(layers, context)`` once, with the model's quantizable layers and a
  :class:`PolicyContext` (held-out loss of a modified global model, for policies
  that measure layer sensitivity);
* ``allocate(round, clients)`` before each round;
* ``observe(round, results)`` after each round;
* ``state_dict()`` / ``load_state_dict()`` so a coordinator can checkpoint and resume.

What a device does for a policy (train quantization-aware, add a regulariser, drop
bit-planes, keep error-feedback memory, ...) is the policy's :class:`ClientHooks`
class, named by ``Policy.hooks``; the agent's one task path
(``edge_client.task.execute_task`` -> ``edge_client.training.train_local``) calls them.

Policies live one per module in ``fedmpq.policies`` and register themselves with
``@register_policy``; adding a policy touches one file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedmpq.fake_quant import attach_fake_quant, detach_fake_quant
from fedmpq.optim import Optimizer
from fedmpq.quant import Rounding
from fedmpq.quant_spec import OBSERVER_MINMAX, QUANT_BITS
from fedmpq.wire.messages import KIND_DELTA, KIND_WEIGHTS, DeviceProfile, TensorPayload
from fedmpq.wire.tensors import encode_state


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


@dataclass(frozen=True)
class PolicyContext:
    """What the coordinator lends a policy: the current global model and a held-out loss.

    ``heldout_loss(state)`` is the mean cross-entropy of a (modified) global state on a
    small held-out sample the coordinator owns; ``scheme``, ``per_channel`` and
    ``observer`` say how the run quantizes.
    """

    global_state: Callable[[], Mapping[str, np.ndarray]]
    heldout_loss: Callable[[Mapping[str, np.ndarray]], float]
    scheme: str
    per_channel: bool
    observer: str = OBSERVER_MINMAX


class ClientHooks:
    """What a device does for a policy during one task.

    The default trains quantization-aware (STE fake-quant) at the assigned bits and
    sends its weights (or, for ``KIND_DELTA`` policies, the delta to the global model)
    at those bits.  Policies that do more subclass this and name the subclass in
    ``Policy.hooks``.

    Parameters
    ----------
    bits
        Assigned per-layer bits (``TaskMessage.bits``).
    scheme, per_channel
        How the run quantizes.
    options
        The policy's ``client_options()`` as the task carried them.
    memory
        State the device keeps for this policy across rounds (e.g. error feedback);
        the agent keeps one dict per device.
    seed
        Seeds any randomness of the update (e.g. stochastic rounding).
    observer
        How symmetric scales are chosen (``TaskMessage.observer``).
    """

    def __init__(
        self,
        bits: Mapping[str, int],
        scheme: str,
        per_channel: bool,
        options: Mapping[str, float] | None = None,
        memory: MutableMapping[str, np.ndarray] | None = None,
        seed: int = 0,
        observer: str = OBSERVER_MINMAX,
    ) -> None:
        self.bits = dict(bits)
        self.observer = observer
        self.scheme = scheme
        self.per_channel = per_channel
        self.options = dict(options or {})
        self.memory: MutableMapping[str, np.ndarray] = {} if memory is None else memory
        self.seed = seed
        self.axis = 0 if per_channel else -1

    @property
    def quantized(self) -> dict[str, int]:
        """The layers assigned 1..8 bits."""
        return {name: b for name, b in self.bits.items() if b in QUANT_BITS}

    def attach(self, model: nn.Module) -> None:
        """Before training: make the forward pass see the weights the wire will carry."""
        attach_fake_quant(
            model, self.quantized, self.scheme, axis=self.axis, observer=self.observer
        )

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the cross-entropy of every batch, or None."""
        return None

    def step(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Apply one optimizer step after ``backward()``."""
        optimizer.step()

    def detach(self, model: nn.Module) -> None:
        """After training: leave plain float weights in ``model`` for ``make_update``."""
        detach_fake_quant(model)

    def make_update(
        self,
        local: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        kind: str,
    ) -> tuple[list[TensorPayload], dict[str, int]]:
        """The update's tensors and the bit-planes dropped per layer (empty if none)."""
        if kind == KIND_DELTA:
            local = {name: w - global_state[name] for name, w in local.items()}
        return self.encode(local, self.bits), {}

    def encode(
        self,
        state: Mapping[str, np.ndarray],
        bits: Mapping[str, int],
        rounding: Rounding = Rounding.NEAREST,
    ) -> list[TensorPayload]:
        """``state`` as the wire carries it: ``bits`` per layer, the task's quantizer
        (stochastic rounding is seeded with ``seed``)."""
        rng = None if rounding is Rounding.NEAREST else np.random.default_rng(self.seed)
        return encode_state(
            state,
            bits,
            self.scheme,
            per_channel=self.per_channel,
            rounding=rounding,
            rng=rng,
            observer=self.observer,
        )


def budget_floor(budget: float) -> int:
    """``budget`` average bits rounded down; a float a hair under an integer counts as it."""
    return math.floor(budget + 1e-9)


def layer_floor(budget: float, min_bits: int, lowest: int) -> int:
    """The fewest bits a policy gives a layer: ``min_bits``, or ``budget`` rounded down
    when that is less, but never under ``lowest`` (the policy's smallest bit-width)."""
    return max(lowest, min(min_bits, budget_floor(budget)))


def client_bits(client: ClientInfo, default: int) -> int:
    """A client's uniform bit-width: its budget rounded down into 1..8, or ``default``."""
    if client.budget_bits is None:
        return default
    return min(max(budget_floor(client.budget_bits), 1), 8)


class Policy(ABC):
    """Base class of bit-allocation policies.

    ``update_kind`` tells the clients what to send: their full weights or a delta to
    the global model; ``hooks`` is what a client does for this policy.

    ``anchored`` (for weight updates) makes the coordinator aggregate each client's
    change from the quantized model it started from: it adds ``w - Q_b(w)`` (the
    global weight's own quantization error at the client's assigned bits) back to
    the client's layer before averaging.  Plain weight averaging instead folds that
    error, large at two bits, into the model every round.
    """

    name: ClassVar[str]
    update_kind: ClassVar[str] = KIND_WEIGHTS
    hooks: ClassVar[type[ClientHooks]] = ClientHooks
    #: What a device starts training from, hence what the downlink sends it: the global
    #: model quantized at the device's bits (``Q_b(w)``, what its forward pass sees
    #: anyway), or, when False, the float32 model (for policies that train in float).
    starts_quantized: ClassVar[bool] = True
    #: Whether a device that starts from ``Q_b(w)`` spreads its latent weights within the
    #: quantization cells (``fedmpq.dither``; the forward pass is the same either way).
    spreads_start: ClassVar[bool] = True

    def __init__(self, anchored: bool = False) -> None:
        self.layers: list[LayerInfo] = []
        self.context: PolicyContext | None = None
        self.anchored = anchored

    def setup(self, layers: Sequence[LayerInfo], context: PolicyContext | None = None) -> None:
        """Called once with the model's quantizable layers, before the first round."""
        self.layers = list(layers)
        self.context = context

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
