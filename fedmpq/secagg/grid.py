"""A training round's grid: what the coordinator announces and what each side does with it.

The coordinator announces one :class:`LayerGrid` per tensor of the model
(:func:`round_grid`): every tensor goes through the grid, the float ones (biases,
BatchNorm) too, since one sent in the clear would leak.  A device puts its trained weights
on it (:func:`device_codes`) and the coordinator turns the unmasked sum into the next model
(:func:`mean_state`): the plain mean over the contributors of their grid values.

Scales come from the global model with headroom, because a scale bounds what the next
model can hold: a weight beyond it is clipped.  A quantized layer's scale is
``QUANT_HEADROOM * max|w|`` (its weights may grow by a quarter a round); a tensor no device
quantizes goes on the 8-bit grid (:data:`FINE_BITS`) with ``FINE_HEADROOM * max|w|``, at
least :data:`FINE_FLOOR` (a BatchNorm bias or running mean starts at zero).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedmpq.secagg.coordinator import SecureSum
from fedmpq.secagg.errors import SecAggError
from fedmpq.secagg.messages import LayerGrid, SecAggSetup
from fedmpq.secagg.ring import GRID_BITS, grid_codes

#: Grid bits of a tensor no device quantizes this round (biases, BatchNorm).
FINE_BITS = 8
QUANT_HEADROOM = 1.25
QUANT_FLOOR = 1e-3
FINE_HEADROOM = 2.0
FINE_FLOOR = 0.125


def round_grid(
    state: Mapping[str, np.ndarray], allocations: Iterable[Mapping[str, int]]
) -> list[LayerGrid]:
    """One grid per tensor of ``state`` (sorted by name) for devices at ``allocations``.

    Parameters
    ----------
    state
        The global model the round starts from (float tensors).
    allocations
        Each selected device's bits per layer; bits outside 1..8 (float32) do not count.

    Raises
    ------
    SecAggError
        If a tensor is not floating point or not finite.
    """
    top: dict[str, int] = {}
    for bits in allocations:
        for name, b in bits.items():
            if b in GRID_BITS:
                top[name] = max(top.get(name, 0), b)
    grids = []
    for name in sorted(state):
        w = np.asarray(state[name])
        if w.dtype.kind != "f" or not np.isfinite(w).all():
            raise SecAggError(f"tensor {name!r} must hold finite floats to go on a grid")
        peak = float(np.abs(w).max(initial=0.0))
        if name in top:
            grid = LayerGrid(name, w.size, top[name], max(QUANT_HEADROOM * peak, QUANT_FLOOR))
        else:
            grid = LayerGrid(name, w.size, FINE_BITS, max(FINE_HEADROOM * peak, FINE_FLOOR))
        grids.append(grid)
    return grids


def device_bits(setup: SecAggSetup, allocation: Mapping[str, int]) -> dict[str, int]:
    """A device's precision per layer: its assigned bits, or the grid's for the rest."""
    return {
        layer.name: allocation[layer.name]
        if allocation.get(layer.name) in GRID_BITS
        else layer.bits
        for layer in setup.layers
    }


def device_codes(
    state: Mapping[str, np.ndarray],
    setup: SecAggSetup,
    allocation: Mapping[str, int],
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """A device's trained ``state`` on the round's grid, stochastically rounded (unbiased).

    Returns
    -------
    codes, bits
        Per layer of the setup: the int32 codes (in the tensor's shape) and the precision
        they are at, as
        :meth:`fedmpq.secagg.DeviceSession.masked_input` takes them.

    Raises
    ------
    SecAggError
        If a layer is missing from ``state`` or has another size.
    """
    bits = device_bits(setup, allocation)
    codes = {}
    for layer in setup.layers:
        w = state.get(layer.name)
        if w is None or np.asarray(w).size != layer.size:
            raise SecAggError(f"the trained model has no {layer.size} values for {layer.name!r}")
        codes[layer.name] = grid_codes(np.asarray(w), layer.scale, bits[layer.name], rng)
    return codes, bits


def mean_state(
    total: SecureSum, setup: SecAggSetup, template: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The plain mean of the contributors' grid values, shaped and typed as ``template``."""
    if not total.contributors:
        raise SecAggError("no input is in the sum")
    sums = total.dequantized(setup)
    count = len(total.contributors)
    return {
        name: (sums[name] / count).reshape(w.shape).astype(w.dtype) for name, w in template.items()
    }
