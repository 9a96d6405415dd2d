"""FedMPQ's bit-plane form of a sign-magnitude quantized weight.

Mapping to fedmpq's wire convention: a layer at ``b`` wire bits (sign included) is
FedMPQ's ``n = b - 1``-bit magnitude.  With ``M = 2**n - 1`` and ``unit = s / M``
(``s = max|w|`` per tensor, or per output channel when ``axis == 0``), a weight is

    w = unit * (sum_k 2**k * P_k  -  sum_k 2**k * N_k),     k = 0 .. n-1

where ``P_k`` / ``N_k`` are the k-th bit-planes of the magnitude of the positive /
negative weights (as in BSQ, on which FedMPQ builds, so a weight can change sign
during training).  At initialisation the planes are exactly the bits of
``fedmpq.quant``'s symmetric codes, so the bit-plane model and the wire agree.  During
training the planes are floats clipped to [0, 2] (the least significant plane starts
with the weight's sub-level fraction added, so rounding the planes' sum gives exactly
the quantized weight); the forward pass rounds each magnitude sum to an integer with a
straight-through estimator, and re-quantizes a slice whose levels grew past ``M`` to
``M`` levels, so the loss sees the weights the wire will carry.

After training, :func:`drop_planes` removes bit-planes that carry (almost) nothing:
an empty most significant plane (the step stays, the scale ``s' = unit * M'``
shrinks) and least significant planes with at most ``lsb_density`` non-zero bits
(the magnitude is shifted right, the step doubles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmpq.optim import Optimizer
from fedmpq.quant import quantize, symmetric_to_signed
from fedmpq.quant_spec import OBSERVER_MINMAX, OBSERVER_MSE, SCHEME_SYMMETRIC

#: FedMPQ drops a least significant plane when at most this fraction of its bits are set.
LSB_DENSITY = 0.02


@dataclass(frozen=True)
class PlaneLayer:
    """A layer's integer sign-magnitude form: ``w = sign * magnitude * unit``."""

    magnitude: np.ndarray  # int64, the weight's shape, each < 2**planes
    negative: np.ndarray  # bool, the weight's shape
    unit: np.ndarray  # float32, broadcastable to the weight (one per scale)
    planes: int  # magnitude bit-planes n = wire bits - 1

    def weight(self) -> np.ndarray:
        """The float32 weight this form stands for."""
        signed = np.where(self.negative, -self.magnitude, self.magnitude).astype(np.float32)
        return (signed * self.unit).astype(np.float32)


def _unit_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return (shape[0],) + (1,) * (len(shape) - 1) if axis == 0 else (1,) * len(shape)


def to_planes(w: np.ndarray, bits: int, axis: int, observer: str = OBSERVER_MINMAX) -> PlaneLayer:
    """Quantize ``w`` symmetrically at ``bits`` (2..8) wire bits into sign-magnitude form.

    Parameters
    ----------
    w
        The float weight.
    bits
        Wire bits including the sign; ``bits - 1`` magnitude planes.
    axis
        -1 for one scale per tensor, 0 for one per output channel.
    observer
        How the scale is chosen (``fedmpq.quant``): FedMPQ's ``max|w|`` by default.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bit-planes need 2..8 wire bits (sign + >= 1 plane), got {bits}")
    q = quantize(w, bits, SCHEME_SYMMETRIC, axis=axis, observer=observer)
    signed = symmetric_to_signed(q.codes, bits).astype(np.int64)
    levels = (1 << (bits - 1)) - 1
    unit = (q.scale / np.float32(levels)).astype(np.float32)
    return PlaneLayer(
        magnitude=np.abs(signed),
        negative=signed < 0,
        unit=unit.reshape(_unit_shape(w.shape, axis)),
        planes=bits - 1,
    )


def plane_bits(magnitude: np.ndarray, planes: int) -> np.ndarray:
    """Bit-planes of ``magnitude``: uint8 array of shape ``(planes, *magnitude.shape)``."""
    shifts = np.arange(planes, dtype=np.int64).reshape((planes,) + (1,) * magnitude.ndim)
    return ((magnitude[None] >> shifts) & 1).astype(np.uint8)


def drop_planes(
    layer: PlaneLayer, *, lsb_density: float = LSB_DENSITY, min_planes: int = 1
) -> PlaneLayer:
    """Remove an empty most significant plane and sparse least significant planes.

    Repeats while a plane qualifies and more than ``min_planes`` remain (a layer never
    loses its last magnitude plane: zero planes would mean sign-only weights ``+-s``,
    not zeros).  An empty MSB changes nothing in the weights; a dropped LSB moves the
    weights whose bit was set by one old step (``magnitude >> 1``, step doubled).
    """
    magnitude, unit, planes = layer.magnitude, layer.unit, layer.planes
    while planes > min_planes and not (magnitude >> (planes - 1)).any():
        planes -= 1
    while planes > min_planes and np.mean(magnitude & 1) <= lsb_density:
        magnitude = magnitude >> 1
        unit = (unit * np.float32(2)).astype(np.float32)
        planes -= 1
    return PlaneLayer(magnitude, layer.negative & (magnitude > 0), unit, planes)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class BitPlaneWeight(nn.Module):
    """A parametrization holding a weight as trainable positive/negative bit-planes.

    Register it on a module's weight with ``torch.nn.utils.parametrize``; the latent
    float weight it replaces is ignored while it is attached.
    """

    unit: torch.Tensor  # step s / M, broadcastable to the weight
    powers: torch.Tensor  # 2**k, shape (planes, 1, ..., 1)

    def __init__(
        self, w: np.ndarray, bits: int, axis: int, observer: str = OBSERVER_MINMAX
    ) -> None:
        super().__init__()
        layer = to_planes(w, bits, axis, observer)
        self.axis = axis
        levels = (1 << layer.planes) - 1
        # The magnitude in levels before rounding; its integer part goes into the planes
        # and its fraction onto the least significant plane, so the planes start exactly
        # where the float weight is and small local steps are not lost to a fresh
        # rounding every round.  A weight beyond a clipped scale (observer "mse") starts
        # at up to 2M with every plane at exact / M, as it would have grown in training.
        scale = layer.unit * np.float32(levels)
        exact = np.abs(w.astype(np.float32)) / np.where(scale > 0, scale, 1) * np.float32(levels)
        exact = np.minimum(exact, np.float32(2 * levels))
        whole = np.minimum(np.floor(exact), levels).astype(np.int64)
        bit_planes = plane_bits(whole, layer.planes).astype(np.float32)
        bit_planes[0] += exact - whole
        over = exact > levels
        bit_planes = np.where(over, exact / np.float32(levels), bit_planes).astype(np.float32)
        planes = torch.from_numpy(bit_planes)
        negative = torch.from_numpy(w < 0)
        self.levels = levels
        self.positive = nn.Parameter(planes * ~negative)
        self.negative = nn.Parameter(planes * negative)
        self.register_buffer("unit", torch.from_numpy(layer.unit))
        powers = 2.0 ** torch.arange(layer.planes, dtype=torch.float32)
        self.register_buffer("powers", powers.reshape((-1,) + (1,) * w.ndim))

    @property
    def planes(self) -> int:
        return int(self.powers.shape[0])

    def signed_levels(self) -> torch.Tensor:
        """Integer weight levels (rounded with a straight-through gradient).

        Planes within [0, 2] allow levels up to ``2M``: a weight may outgrow the scale it
        started with (the scale is trained this way, as BSQ trains it); the forward pass
        and :meth:`to_layer` re-quantize such a slice to ``M`` levels.
        """
        pos = _round_ste((self.positive * self.powers).sum(0))
        neg = _round_ste((self.negative * self.powers).sum(0))
        return pos - neg

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """The weight as it will be sent: slices grown past ``M`` levels re-quantized.

        The loss must see what the wire carries; training against the grown
        (up to ``2M``-level) weights and sending their re-quantization lost ~10 points
        at two wire bits.  The gradient passes straight through the re-quantization.
        """
        levels = self.signed_levels()
        w = levels * self.unit
        with torch.no_grad():
            sent = self._fit(levels.to(torch.int64).numpy())
        if sent is None:
            return w
        return w + (torch.from_numpy(sent.weight()) - w).detach()

    def plane_norms(self) -> torch.Tensor:
        """``||[P_k; N_k]||_2`` for every plane k: the groups of FedMPQ's group lasso."""
        flat_p = self.positive.reshape(self.planes, -1)
        flat_n = self.negative.reshape(self.planes, -1)
        return torch.sqrt((flat_p**2).sum(1) + (flat_n**2).sum(1) + 1e-12)

    def add_lasso_grad_(self, strength: float) -> None:
        """Add the gradient of ``strength * sum_k ||[P_k; N_k]||_2`` to the planes' grads."""
        with torch.no_grad():
            norms = self.plane_norms().reshape((-1,) + (1,) * (self.positive.dim() - 1))
            for p in (self.positive, self.negative):
                lasso = p * (strength / norms)
                if p.grad is None:
                    p.grad = lasso
                else:
                    p.grad.add_(lasso)

    def clip_(self, optimizer: Optimizer | None = None) -> None:
        """Keep every plane value within [0, 2] (BSQ's constraint) after a step.

        What clipping a plane takes off a weight's level goes onto its other planes
        that have room, least significant first: a step spreads over the planes in
        proportion to ``2**k``, so the most significant plane hits 0 or 2 first and,
        clipped, would stall a weight's move towards zero.  Momentum that keeps pushing
        a clipped value out of range is cleared, or it would pile up while clipped and
        delay the plane's turn when the gradient reverses.
        """
        with torch.no_grad():
            for p in (self.positive, self.negative):
                wanted = (p * self.powers).sum(0)
                p.clamp_(0.0, 2.0)
                residual = wanted - (p * self.powers).sum(0)
                for k in range(self.planes):
                    add = torch.clamp(residual / 2.0**k, min=-p[k], max=2.0 - p[k])
                    p[k].add_(add)
                    residual -= add * 2.0**k
                state = optimizer.state.get(p, {}) if optimizer is not None else {}
                buf = state.get("momentum_buffer")
                if isinstance(buf, torch.Tensor):
                    # SGD moves p by -lr * buf: buf > 0 pushes down, buf < 0 up.
                    stuck = ((p <= 0.0) & (buf > 0)) | ((p >= 2.0) & (buf < 0))
                    buf.masked_fill_(stuck, 0.0)

    def precondition_(self) -> None:
        """Rescale plane gradients so one SGD step moves the weight as plain SGD would.

        ``dL/dP_k = unit * 2**k * dL/dw``, so an unscaled plane step moves ``w`` by
        ``unit**2 * sum_k 4**k`` times the plain step (about ``s**2``): local training
        would stall.  Dividing by that factor restores the weight-space step.  Only the
        planes of a weight's current sign move (both while its level is 0): otherwise a
        magnitude could shrink through both P and N but grow through P alone, a bias
        towards zero that compounds over rounds.
        """
        factor = 1.0 / (self.unit**2 * float((self.powers**2).sum()) + 1e-30)
        with torch.no_grad():
            level = ((self.positive - self.negative) * self.powers).sum(0)
        for p, inactive in ((self.positive, level < -0.5), (self.negative, level > 0.5)):
            if p.grad is not None:
                p.grad.mul_(factor)
                p.grad.masked_fill_(inactive, 0.0)

    def to_layer(self) -> PlaneLayer:
        """The integer sign-magnitude form the trained planes stand for."""
        with torch.no_grad():
            signed = self.signed_levels().to(torch.int64).numpy()
        fitted = self._fit(signed)
        if fitted is not None:
            return fitted
        return PlaneLayer(np.abs(signed), signed < 0, self.unit.numpy().copy(), self.planes)

    def _fit(self, signed: np.ndarray) -> PlaneLayer | None:
        """``signed`` levels with every slice grown past ``M`` re-quantized; None if none grew.

        The re-quantization (FedMPQ/BSQ's) takes the scale of least squared error.
        Stretching the grid to the new peak instead rounds every level-1 weight of a
        one-plane layer grown to level 2 to zero (0.5 rounds to even).
        """
        magnitude = np.abs(signed)
        unit = self.unit.numpy()
        reduce = tuple(i for i, n in enumerate(unit.shape) if n == 1)
        grown = magnitude.max(axis=reduce, keepdims=True, initial=0) > self.levels
        if not grown.any():
            return None
        layer = PlaneLayer(magnitude, signed < 0, unit, self.planes)
        refit = to_planes(layer.weight(), self.planes + 1, self.axis, OBSERVER_MSE)
        return PlaneLayer(
            magnitude=np.where(grown, refit.magnitude, magnitude),
            negative=np.where(grown, refit.negative, signed < 0),
            unit=np.where(grown, refit.unit, unit).astype(np.float32),
            planes=self.planes,
        )
