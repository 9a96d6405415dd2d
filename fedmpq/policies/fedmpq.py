"""FedMPQ (Chen & Vikalo, CVPR 2024): mixed precision learned from pruned bit-planes.

Client side (:class:`FedMPQHooks`): quantization-aware training at the assigned bits,
exactly as fixed precision trains (latent float weights, straight-through fake-quant),
plus FedMPQ's group lasso over each layer's magnitude bit-planes
(``fedmpq.bitplanes``), weighted by the layer's share of the model's bits::

    lambda * sum_l (N_l * n_l) * sum_k ||P_{l,k}||_2 / sum_l N_l

Its gradient reaches the weights through the same preconditioner as the cross-entropy's
(:func:`fedmpq.bitplanes.plane_lasso_grad`) and the optimizer is plain SGD with momentum,
never cleared.  With ``round_scale`` (the official client's fixed ``scale``) each layer's
grid is held at the received model's scale for the round while the lasso acts, so
shrinking the top plane's weights empties it instead of shrinking the grid with them.  After
training, the layer's quantization is cut into planes and FedMPQ's
pruning rules run (a top plane empty or under ``msb_density`` set is dropped, the latter
merged by clipping; a bottom plane at most ``lsb_density`` set is dropped; FedMPQ's 2%
each by default, 5% for the top plane on batch-norm models); the client sends the layer at
the remaining bits and reports how many planes it dropped (``UpdateMessage.bits_dropped``).
With ``lambda = 0`` and a frozen allocation the client is fixed-precision QAT bit for bit.

Server side (:class:`FedMPQPolicy`): the next round starts every client from the
sample-and-budget-weighted mean of the clients' per-layer bits; layers are ranked by
``p_l = N_l / sum N * round(mean dropped_l + 1)`` and each client's allocation is moved to
its budget as FedMPQ's ``pruning_or_growing`` does: bits come off the highest-priority
layer down to the floor before the next layer, then go onto the lowest-priority layer up
to 8 -- here only while the budget holds (the official code may overshoot by the last bit).
The floor is one plane officially, two here by default (``min_bits``).

Budget units: the paper counts magnitude planes, the wire counts the sign too
(``wire = paper + 1``, capped at 8 by the wire format).  ``budget_units`` says which
``ClientInfo.budget_bits`` is in; allocations are always wire bits, at least 2 (one plane).

``FedMPQPolicy(anchored=False, fleet_budgets=(), round_scale=True, min_bits=2)`` is the
authors' code as far as this project's wire allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedmpq.bitplanes import (
    PLANE_DENSITY,
    drop_planes,
    plane_lasso_grad,
    planes_on_grid,
    to_planes,
)
from fedmpq.errors import ConfigError
from fedmpq.fake_quant import FakeQuantize, attach_fake_quant
from fedmpq.optim import Optimizer
from fedmpq.policies import register_policy
from fedmpq.policies.base import (
    BitAllocation,
    ClientHooks,
    ClientInfo,
    ClientResult,
    LayerInfo,
    Policy,
    budget_floor,
    layer_floor,
)
from fedmpq.quant_spec import SCHEME_SYMMETRIC
from fedmpq.wire.messages import KIND_DELTA, TensorPayload

#: One magnitude plane (the paper's 1 bit) is the floor; the wire format's 8 the top.
MIN_BITS, MAX_BITS = 2, 8
#: The fewest bits this project's re-allocation gives a layer (two planes): at one plane
#: (levels -s, 0, s with s = max|w|) a layer barely trains and its norm drifts up round
#: over round (the README's ablation); a trained layer may still be *sent* at one plane.
ALLOCATION_FLOOR = 3
#: Wire budgets of the default heterogeneous fleet: the paper's [2,2,4,4,4,6,6,6,8,8]
#: magnitude planes plus the sign, capped at the wire's 8 bits.
DEFAULT_FLEET = (3.0, 3.0, 5.0, 5.0, 5.0, 7.0, 7.0, 7.0, 8.0, 8.0)
BUDGET_UNITS = ("wire", "paper")


def layer_priorities(
    layers: Sequence[LayerInfo], mean_dropped: Mapping[str, float]
) -> dict[str, float]:
    """FedMPQ's priority ``p_l = N_l / sum N * round(mean dropped_l + 1)`` per layer."""
    total = sum(layer.numel for layer in layers) or 1
    return {
        layer.name: layer.numel / total * round(mean_dropped.get(layer.name, 0.0) + 1.0)
        for layer in layers
    }


def fit_to_budget(
    start: Mapping[str, int],
    layers: Sequence[LayerInfo],
    priorities: Mapping[str, float],
    budget: float,
    min_bits: int = MIN_BITS,
) -> dict[str, int]:
    """Move ``start`` to ``budget`` average bits in FedMPQ's order (``pruning_or_growing``).

    While the parameter-weighted average exceeds ``budget``, the highest-priority layer
    loses bits down to ``min_bits``, then the next one.  Then the lowest-priority layer
    gains bits up to 8, then the next, each bit only if the average stays within
    ``budget`` (a layer whose next bit does not fit is passed over, as one at 8 bits
    is).  Ties go to the earlier layer, as ``np.argmax``/``np.argmin`` do.
    """
    bits = {layer.name: min(max(int(start[layer.name]), min_bits), MAX_BITS) for layer in layers}
    numel = {layer.name: layer.numel for layer in layers}
    used = sum(bits[n] * numel[n] for n in bits)
    limit = budget * (sum(numel.values()) or 1) + 1e-9
    index = {layer.name: i for i, layer in enumerate(layers)}
    for name in sorted(bits, key=lambda n: (-priorities[n], index[n])):
        while used > limit and bits[name] > min_bits:
            bits[name] -= 1
            used -= numel[name]
    for name in sorted(bits, key=lambda n: (priorities[n], index[n])):
        while bits[name] < MAX_BITS and used + numel[name] <= limit:
            bits[name] += 1
            used += numel[name]
    return bits


class _PlaneFakeQuantize(FakeQuantize):
    """Fake quantization that keeps its last output: the planes the lasso acts on.

    The scale follows the weight at every step (the run's observer), as fixed QAT's does;
    ``unit`` is None for that.
    """

    last: torch.Tensor | None = None
    unit: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = super().forward(w)
        self.last = out.detach()
        return out


class _GridStraightThrough(torch.autograd.Function):
    """Forward: ``clamp(round(w / unit), -M, M) * unit``.  Backward: identity (STE)."""

    @staticmethod
    def forward(w: torch.Tensor, unit: torch.Tensor, top: float) -> torch.Tensor:
        safe = torch.where(unit > 0, unit, torch.full_like(unit, math.inf))
        return torch.clamp(torch.round(w / safe), -top, top) * unit

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        """Nothing to save: the backward pass does not depend on the input."""

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad_output, None, None


class GridFakeQuantize(_PlaneFakeQuantize):
    """Fake quantization on a grid held for the whole local round (``round_scale``).

    The official client sets a layer's ``scale`` once from the model it receives
    (``to_bin``) and its planes live on that grid until it sends; weights past the top
    level saturate (``bit_STE`` clamps).  A scale re-fitted to ``max|w|`` every step
    instead moves with the lasso: shrinking the largest weights shrinks the grid, and
    the top plane stays as dense as before.  ``unit`` is the start's step, one per
    scale; :func:`fedmpq.bitplanes.planes_on_grid` cuts the trained weight on it.
    """

    def __init__(self, bits: int, axis: int, unit: torch.Tensor) -> None:
        super().__init__(bits, SCHEME_SYMMETRIC, axis)
        self.unit = unit

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        assert self.unit is not None
        top = float((1 << (self.bits - 1)) - 1)
        out: torch.Tensor = _GridStraightThrough.apply(w, self.unit, top)
        self.last = out.detach()
        return out


def without_radial(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``grad`` less its component along ``w``: a step that reshapes ``w`` without
    shrinking it (``keep_norm``).  Before a batch norm a layer's scale does not change
    its output and nothing pushes it back up, so a lasso that also shrinks the layer
    compounds round over round; this keeps only its push from the top plane's weights
    onto the rest."""
    norm2 = float((w * w).sum())
    if norm2 == 0.0:
        return grad
    return grad - (float((grad * w).sum()) / norm2) * w


def start_unit(w: np.ndarray, bits: int, axis: int, observer: str) -> np.ndarray:
    """The step ``s / M`` of ``w``'s quantization at ``bits`` (the run's observer), shaped
    to broadcast against ``w``: the grid a ``round_scale`` client holds for the round."""
    return to_planes(w, bits, axis, observer).unit


class FedMPQHooks(ClientHooks):
    """QAT plus the plane group lasso; FedMPQ's plane pruning before sending.

    Options (``FedMPQPolicy.client_options``): ``lambda``, ``msb_density``,
    ``lsb_density`` and ``drop`` (0: send at the assigned bits, a frozen allocation).
    """

    def attach(self, model: nn.Module) -> None:
        self._planes: dict[str, tuple[nn.Parameter, _PlaneFakeQuantize]] = {}
        planar = {n: b for n, b in self.quantized.items() if b >= MIN_BITS}
        hold = bool(self.options.get("round_scale", 0.0)) and bool(self.options.get("lambda"))
        attach_fake_quant(
            model,
            {n: b for n, b in self.quantized.items() if n not in planar},
            self.scheme,
            axis=self.axis,
            observer=self.observer,
        )
        for name, bits in planar.items():
            module = model.get_submodule(name.rpartition(".")[0])
            # The latent weight: registering keeps this very Parameter as ``original``.
            original = module.weight
            assert isinstance(original, nn.Parameter)
            fq: _PlaneFakeQuantize
            if hold:
                axis = self.axis if original.dim() > 1 else -1
                w = original.detach().to(torch.float32).cpu().numpy()
                unit = start_unit(w, bits, axis, self.observer)
                fq = GridFakeQuantize(bits, axis, torch.from_numpy(unit).to(original))
            else:
                fq = _PlaneFakeQuantize(bits, self.scheme, self.axis, self.observer)
            parametrize.register_parametrization(module, "weight", fq)
            self._planes[name] = (original, fq)
        sizes = {n: p.numel() for n, (p, _) in self._planes.items()}
        total = sum(sizes.values()) or 1
        # FedMPQ's weight of a layer's lasso: N_l * n_l over the model's parameters.
        self._coef = {n: sizes[n] * (fq.bits - 1) / total for n, (_, fq) in self._planes.items()}

    def step(self, model: nn.Module, optimizer: Optimizer) -> None:
        strength = float(self.options.get("lambda", 0.0))
        if strength:
            axis = self.axis
            for name, (param, fq) in self._planes.items():
                if fq.last is None or param.grad is None:
                    continue
                grad = plane_lasso_grad(
                    fq.last, fq.bits - 1, axis if fq.last.dim() > 1 else -1, fq.unit
                )
                if self.options.get("keep_norm", 0.0):
                    grad = without_radial(grad, param.detach())
                param.grad.add_(grad, alpha=strength * self._coef[name])
        optimizer.step()

    def make_update(
        self,
        local: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        kind: str,
    ) -> tuple[list[TensorPayload], dict[str, int]]:
        if kind == KIND_DELTA:
            raise ConfigError("FedMPQ clients send weights, not deltas")
        drop = bool(self.options.get("drop", 1.0))
        units = {n: fq.unit for n, (_, fq) in getattr(self, "_planes", {}).items()}
        msb = float(self.options.get("msb_density", PLANE_DENSITY))
        lsb = float(self.options.get("lsb_density", PLANE_DENSITY))
        exact: dict[str, TensorPayload] = {}
        dropped: dict[str, int] = {}
        for name, bits in self.quantized.items():
            unit = units.get(name)
            if bits < MIN_BITS or not (drop or unit is not None):
                continue
            w = local[name]
            axis = self.axis if w.ndim >= 2 else -1
            trained = (
                to_planes(w, bits, axis, self.observer)
                if unit is None
                else planes_on_grid(w, unit.cpu().numpy(), bits)
            )
            kept = drop_planes(trained, msb_density=msb, lsb_density=lsb) if drop else trained
            if drop:
                dropped[name] = trained.planes - kept.planes
            # On a held grid the payload is the grid itself, dropped planes or not.
            if kept.planes < trained.planes or unit is not None:
                exact[name] = kept.payload(name, axis)
        rest = self.encode({n: w for n, w in local.items() if n not in exact}, self.bits)
        position = {name: i for i, name in enumerate(local)}
        payloads = sorted([*rest, *exact.values()], key=lambda p: position[p.name])
        return payloads, dropped


@register_policy
class FedMPQPolicy(Policy):
    """FedMPQ's server side: per-client allocations from reported bits and dropped planes.

    The faithful mode (module docstring) is the authors' code as far as this project's
    wire allows (see the README's deviations); the defaults add this project's choices,
    each an option ablated in ``benchmarks/accuracy_per_bit.py``.

    Parameters
    ----------
    bits
        Average bits of a client whose budget is unknown (in ``budget_units``).
    lam
        Group-lasso strength per local step, sent to the clients (``options["lambda"]``);
        the paper's 1e-3 by default.  The official configs use 1e-3 / 1e-2 over ~195
        local steps a round; with ``round_scale`` a device taking ~10 steps a round needs
        more (resnet20: 0.03; the README's sweep).
    msb_density, lsb_density
        Thresholds for merging the top and dropping the bottom plane (FedMPQ's 2% each).
        On batch-norm models 5% for the top plane (the benchmark's resnet20 setting): a
        ``max|w|`` scale leaves 3-5% of a layer's weights in its top plane, which 2% never
        merges; merging clips them to half the range at the same step, and the batch norm
        after the layer absorbs the clip.  Without a batch norm the clip shrinks the
        layer's output (cnn: 55% against 65% after 3 rounds), hence 2% by default.
    min_bits
        Fewest wire bits the re-allocation gives a layer (the official floor is one
        plane, 2; default 3, ``ALLOCATION_FLOOR``), or the client's budget rounded down
        when that is less.  Pruning may still send a layer below it.
    anchored
        Aggregate each client's change from the quantized model it started from
        (``Policy.anchored``) instead of plain weighted FedAvg (the paper's).
    frozen
        Keep every client at its budget on every layer and drop no planes: FedMPQ's
        training with the fixed allocation, for ablations.
    budget_units
        ``"wire"`` (sign included, this project's budgets) or ``"paper"`` (magnitude
        planes; wire = paper + 1, capped at 8).
    fleet_budgets
        Wire budgets of a heterogeneous default fleet: client i (in order of first
        appearance) is capped at ``fleet_budgets[i % len]``, so a fleet of identical
        devices still shows mixed precision.  Empty: the budgets as given.
    round_scale
        While the lasso acts (``lam > 0``), hold each layer's grid at the received
        model's scale for the whole local round, as the official client does, instead
        of re-fitting it every step (``GridFakeQuantize``); with ``lam = 0`` the scale
        follows the weights as fixed QAT's does.  Needed for planes to drop after round 1
        on batch-norm models (resnet20); off by default, as the BN-free mlp and cnn drop
        planes every round with the re-fitted scale and train better with it.
    keep_norm
        Take the lasso's step without its component along the layer's weight
        (``without_radial``): it reshapes a layer, never shrinks it.  On by default:
        without a batch norm after it, a layer the lasso shrinks gives a smaller output
        (mlp, 3 rounds: first layer at 0.65 of fixed's norm with it off, 0.98 with it on;
        cnn 55 -> 68% accuracy against fixed's 68%).  Batch-norm models may turn it off
        (the benchmark's resnet20 does: the re-fitted scale already keeps its norms within
        0.91-1.13 of fixed's, and it measured no better on).
    """

    name = "fedmpq"
    hooks = FedMPQHooks

    def __init__(
        self,
        bits: float = 4,
        lam: float = 1e-3,
        msb_density: float = PLANE_DENSITY,
        lsb_density: float = PLANE_DENSITY,
        min_bits: int = ALLOCATION_FLOOR,
        anchored: bool = True,
        frozen: bool = False,
        budget_units: str = "wire",
        fleet_budgets: Sequence[float] = DEFAULT_FLEET,
        round_scale: bool = False,
        keep_norm: bool = True,
    ) -> None:
        super().__init__(anchored)
        if not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"fedmpq policy: bits must be within 1..8, got {bits}")
        if budget_units not in BUDGET_UNITS:
            raise ConfigError(f"fedmpq policy: budget_units must be one of {BUDGET_UNITS}")
        if lam < 0 or not all(1 <= b <= MAX_BITS for b in fleet_budgets):
            raise ConfigError("fedmpq policy: lam >= 0 and fleet budgets within 1..8")
        if not MIN_BITS <= min_bits <= MAX_BITS:
            raise ConfigError(f"fedmpq policy: min_bits must be within 2..8, got {min_bits}")
        self.bits = float(bits)
        self.lam = lam
        self.msb_density = msb_density
        self.min_bits = min_bits
        self.lsb_density = lsb_density
        self.frozen = frozen
        self.budget_units = budget_units
        self.fleet_budgets = tuple(float(b) for b in fleet_budgets)
        self.round_scale = round_scale
        self.keep_norm = keep_norm
        self.mean_bits: dict[str, float] = {}
        self.mean_dropped: dict[str, float] = {}
        self.budgets: dict[str, float] = {}  # last wire budget of every client seen
        self.fleet_slots: dict[str, int] = {}

    def client_options(self) -> dict[str, float]:
        return {
            "lambda": self.lam,
            "msb_density": self.msb_density,
            "lsb_density": self.lsb_density,
            "drop": 0.0 if self.frozen else 1.0,
            "round_scale": 1.0 if self.round_scale else 0.0,
            "keep_norm": 1.0 if self.keep_norm else 0.0,
        }

    def priorities(self) -> dict[str, float]:
        return layer_priorities(self.layers, self.mean_dropped)

    def wire_budget(self, client: ClientInfo) -> float:
        """``client``'s average budget in wire bits (see ``budget_units``, ``fleet_budgets``)."""
        budget = self.bits if client.budget_bits is None else client.budget_bits
        if self.budget_units == "paper":
            budget += 1.0
        if self.fleet_budgets:
            slot = self.fleet_slots.setdefault(client.client_id, len(self.fleet_slots))
            budget = min(budget, self.fleet_budgets[slot % len(self.fleet_budgets)])
        return min(max(budget, float(MIN_BITS)), float(MAX_BITS))

    def allocate(self, round: int, clients: Sequence[ClientInfo]) -> dict[str, BitAllocation]:
        priorities = self.priorities()
        allocation = {}
        for client in sorted(clients, key=lambda c: c.client_id):
            budget = self.wire_budget(client)
            self.budgets[client.client_id] = budget
            uniform = dict.fromkeys((layer.name for layer in self.layers), budget_floor(budget))
            if self.frozen:
                bits = uniform
            else:
                start = (
                    {n: round_half_up(b) for n, b in self.mean_bits.items()}
                    if self.mean_bits
                    else uniform
                )
                floor = layer_floor(budget, self.min_bits, MIN_BITS)
                bits = fit_to_budget(start, self.layers, priorities, budget, floor)
            allocation[client.client_id] = BitAllocation(bits)
        return allocation

    def observe(self, round: int, results: Sequence[ClientResult]) -> None:
        if not results:
            return
        # FedMPQ weighs a client's bits and dropped planes by samples x budget.
        weights = np.array(
            [r.num_samples * self.budgets.get(r.client_id, self.bits) for r in results], float
        )
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(results), 1.0)
        names = [layer.name for layer in self.layers]
        self.mean_bits = {
            n: float(
                sum(w * r.bits.get(n, self.bits) for w, r in zip(weights, results, strict=True))
            )
            for n in names
        }
        self.mean_dropped = {
            n: float(
                sum(w * r.bits_dropped.get(n, 0) for w, r in zip(weights, results, strict=True))
            )
            for n in names
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean_bits": dict(self.mean_bits),
            "mean_dropped": dict(self.mean_dropped),
            "budgets": dict(self.budgets),
            "fleet_slots": dict(self.fleet_slots),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean_bits = {str(k): float(v) for k, v in state.get("mean_bits", {}).items()}
        self.mean_dropped = {str(k): float(v) for k, v in state.get("mean_dropped", {}).items()}
        self.budgets = {str(k): float(v) for k, v in state.get("budgets", {}).items()}
        self.fleet_slots = {str(k): int(v) for k, v in state.get("fleet_slots", {}).items()}


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() goes to even)."""
    return math.floor(x + 0.5)
