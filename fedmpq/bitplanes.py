"""FedMPQ's bit-plane view of a sign-magnitude quantized weight.

A layer at ``b`` wire bits (sign included) is FedMPQ's ``n = b - 1``-bit magnitude.
With ``M = 2**n - 1`` and ``unit = s / M`` (``s`` the layer's scale, per tensor or per
output channel) a weight is

    w = sign * unit * sum_k 2**k * P_k,     k = 0 .. n-1

where ``P_k`` in {0, 1} are the bit-planes of its magnitude (FedMPQ's ``bweight`` with
the least significant plane first).  The planes are always the bits of the weight's
current quantization: FedMPQ re-binarises them after every optimizer step
(``BitConv2d.quant``); here the client keeps the latent float weight of quantization-
aware training and reads the planes off its quantization (see ``fedmpq.policies.fedmpq``).

:func:`plane_lasso_grad` is the group lasso's gradient moved into weight space through
the same preconditioner as the cross-entropy gradient; :func:`drop_planes` applies
FedMPQ's pruning rules (``ResNet.pruning``) after local training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmpq.packing import pack_bits
from fedmpq.quant import quantize, symmetric_to_signed
from fedmpq.quant_spec import OBSERVER_MINMAX, SCHEME_SYMMETRIC
from fedmpq.wire.messages import TensorPayload
from fedmpq.wire.tensors import scale_bytes

#: FedMPQ's threshold (``thre = 2.0`` percent): a sparser top plane is merged, a
#: bottom plane at most this dense is dropped.
PLANE_DENSITY = 0.02


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

    def payload(self, name: str, axis: int) -> TensorPayload:
        """This exact form as a symmetric wire tensor at ``planes + 1`` bits.

        Re-quantizing :meth:`weight` would stretch the grid of a layer whose largest
        magnitude is below ``M`` (an emptied top plane) or re-clip it (observer
        ``mse``); the payload carries the levels and step as they are.  (Per slice, a
        dropped plane keeps a step on ``fedmpq.quant_scales``' grid or doubles it, which
        keeps it there too.)
        """
        bits = self.planes + 1
        levels = (1 << self.planes) - 1
        codes = self.magnitude | ((self.negative & (self.magnitude > 0)) << self.planes)
        scale = (self.unit * np.float32(levels)).astype(np.float32).reshape(-1)
        return TensorPayload(
            name=name,
            shape=[int(d) for d in self.magnitude.shape],
            bits=bits,
            scheme=SCHEME_SYMMETRIC,
            axis=axis,
            scale=scale_bytes(scale, axis, bits, SCHEME_SYMMETRIC),
            zero_point=b"",
            data=pack_bits(codes.astype(np.uint8), bits, check=False),
        )


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
        How the scale is chosen (``fedmpq.quant``); FedMPQ's is ``max|w|``.
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


def planes_on_grid(w: np.ndarray, unit: np.ndarray, bits: int) -> PlaneLayer:
    """``w`` on a given grid ``unit`` (held fixed, not fitted to ``w``) at ``bits`` wire bits.

    Magnitudes are ``rint(|w| / unit)`` clipped to ``M = 2**(bits-1) - 1``: a weight
    that grew past the grid's top saturates, as the official ``bit_STE`` clamps it.  A
    zero ``unit`` (an all-zero slice) gives magnitude 0.  This is, bit for bit, what
    :class:`fedmpq.policies.fedmpq.GridFakeQuantize` trains against.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bit-planes need 2..8 wire bits (sign + >= 1 plane), got {bits}")
    w32 = np.asarray(w, dtype=np.float32)
    unit32 = np.asarray(unit, dtype=np.float32)
    safe = np.where(unit32 > 0, unit32, np.float32(np.inf))
    levels = np.minimum(np.rint(np.abs(w32) / safe), np.float32((1 << (bits - 1)) - 1))
    magnitude = levels.astype(np.int64)
    return PlaneLayer(magnitude, (w32 < 0) & (magnitude > 0), unit32, bits - 1)


def plane_bits(magnitude: np.ndarray, planes: int) -> np.ndarray:
    """Bit-planes of ``magnitude``: uint8 array of shape ``(planes, *magnitude.shape)``."""
    shifts = np.arange(planes, dtype=np.int64).reshape((planes,) + (1,) * magnitude.ndim)
    return ((magnitude[None] >> shifts) & 1).astype(np.uint8)


def plane_density(magnitude: np.ndarray, planes: int) -> np.ndarray:
    """Fraction of set bits in each plane, least significant first."""
    return plane_bits(magnitude, planes).reshape(planes, -1).mean(axis=1)


def drop_planes(
    layer: PlaneLayer,
    *,
    msb_density: float = PLANE_DENSITY,
    lsb_density: float = PLANE_DENSITY,
    min_planes: int = 1,
) -> PlaneLayer:
    """FedMPQ's pruning of a trained layer's bit-planes (``ResNet.pruning``).

    From the top, with the densities of the planes as trained: an empty plane is
    dropped (no weight changes); a plane with fewer than ``msb_density`` of its bits
    set is merged into the planes below and dropped -- the few weights that had it
    set are clipped to the new largest magnitude ``M' = 2**(n-1) - 1``, the step
    stays.  Then from the bottom, with the densities after that: a plane with at most
    ``lsb_density`` of its bits set is dropped (``magnitude >> 1``, the step
    doubles).  Either way stops at the first plane that stays, and a layer keeps
    ``min_planes`` planes.  ``msb_density = 0`` drops only empty top planes;
    ``lsb_density < 0`` keeps every bottom plane.
    """
    magnitude, unit, planes = layer.magnitude, layer.unit, layer.planes
    density = plane_density(magnitude, planes)
    for k in range(layer.planes - 1, -1, -1):
        if planes <= min_planes or not (density[k] == 0 or density[k] < msb_density):
            break
        planes -= 1
        magnitude = np.minimum(magnitude, (1 << planes) - 1)
    density = plane_density(magnitude, planes)
    for k in range(planes):
        if planes <= min_planes or density[k] > lsb_density:
            break
        magnitude = magnitude >> 1
        unit = (unit * np.float32(2)).astype(np.float32)
        planes -= 1
    return PlaneLayer(magnitude, layer.negative & (magnitude > 0), unit, planes)


def signed_levels(w_hat: torch.Tensor, planes: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integer levels and step of a symmetric quantized weight ``w_hat``.

    Every symmetric scale puts the slice's largest weight on level ``M`` (observer
    ``minmax`` exactly, ``mse`` by saturating the clipped ones), so the step is the
    slice's ``max|w_hat| / M``; an all-zero slice gets step 0 and levels 0.
    """
    levels = float((1 << planes) - 1)
    mag = w_hat.abs()
    peak = mag.amax(dim=tuple(range(1, w_hat.dim())), keepdim=True) if axis == 0 else mag.max()
    unit = peak / levels
    safe = torch.where(unit > 0, unit, torch.ones_like(unit))
    return torch.round(w_hat / safe), unit


def plane_lasso_grad(
    w_hat: torch.Tensor, planes: int, axis: int, unit: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient in weight space of the plane group lasso ``sum_k ||P_k||_2``.

    On plane ``k`` of a weight of level ``l`` the lasso's gradient is
    ``P_k / ||P_k||``.  A weight's planes move it by ``sign * unit * sum_k 2**k dP_k``,
    and the cross-entropy's plane gradients are ``sign * unit * 2**k * dL/dw``; the
    preconditioner ``1 / (unit**2 * sum_k 4**k)`` makes one plane step move ``w`` as a
    plain SGD step on ``dL/dw`` would.  Passing the lasso through the same
    preconditioner (as FedMPQ passes both through one optimizer) gives its weight
    gradient ``sign(l) * sum_k 2**k P_k / ||P_k|| / (unit * sum_k 4**k)``.

    ``unit``: the grid's step when it is held fixed (``planes_on_grid``); None reads it
    off ``w_hat`` (a scale fitted to the weight puts its largest on level ``M``).
    """
    if unit is None:
        levels, unit = signed_levels(w_hat, planes, axis)
    else:
        safe_unit = torch.where(unit > 0, unit, torch.ones_like(unit))
        levels = torch.round(w_hat / safe_unit)
    # A weight's term sum_k 2**k P_k / ||P_k|| depends on its magnitude alone: one table
    # entry per magnitude, the plane norms from a histogram of the magnitudes (a few passes
    # over the layer instead of several per plane).
    size = 1 << planes
    magnitude = levels.abs().to(torch.int64).bitwise_and_(size - 1)
    counts = torch.bincount(magnitude.reshape(-1), minlength=size).to(torch.float64)
    ks = torch.arange(planes)
    bits = ((torch.arange(size)[None, :] >> ks[:, None]) & 1).to(torch.float64)
    norms = torch.sqrt(bits @ counts + 1e-8)
    table = ((2.0 ** ks.to(torch.float64))[:, None] * bits / norms[:, None]).sum(0)
    total = table.to(w_hat.dtype)[magnitude]
    power = float(sum(4**k for k in range(planes)))
    safe = torch.where(unit > 0, unit, torch.full_like(unit, float("inf")))
    return torch.sign(levels) * total / (safe * power)
