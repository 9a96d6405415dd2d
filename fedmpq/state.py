"""Model state as plain numpy arrays: what the quantizer, the wire codec and aggregation see."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedmpq.errors import ConfigError
from fedmpq.wire.layout import ModelLayout


def _float_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    # Integer buffers (BatchNorm's num_batches_tracked) are bookkeeping, not weights: they are
    # neither averaged nor sent, so they never enter the numpy state.
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy the floating-point tensors of ``model.state_dict()`` into numpy.

    Parameters
    ----------
    model
        Any module.

    Returns
    -------
    dict of str to ndarray
        float32, C-contiguous copies (not views of the model's storage), in ``state_dict``
        order.  Integer buffers such as ``num_batches_tracked`` are left out.
    """
    return {
        name: np.array(t.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
        for name, t in _float_entries(model).items()
    }


def model_layout(model: nn.Module) -> ModelLayout:
    """The wire layout of ``model``'s numpy state (``state_to_numpy``), without copying it.

    A receiver decodes a model's frames against the layout of the model it built itself
    (``fedmpq.wire.codec.decode``'s ``layout``): the frames carry only its digest.
    """
    return ModelLayout.of_entries((k, v.shape) for k, v in _float_entries(model).items())


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the floating-point tensors of ``model``, in place.

    The check is strict and happens before anything is written, so a rejected state leaves
    the model unchanged.  Integer buffers are left untouched.

    Parameters
    ----------
    model
        The module to load into.
    state
        One real-valued array per floating-point ``state_dict`` entry, with the same shape;
        values are cast to the tensor's dtype.

    Raises
    ------
    ConfigError
        If a tensor is missing or unexpected, has the wrong shape or is not numeric.
    """
    targets = _float_entries(model)
    missing = [k for k in targets if k not in state]
    if missing:
        raise ConfigError(f"state is missing {len(missing)} tensor(s) of the model: {missing}")
    extra = [k for k in state if k not in targets]
    if extra:
        raise ConfigError(f"state has {len(extra)} tensor(s) the model does not have: {extra}")
    arrays = {}
    for name, target in targets.items():
        arr = np.asarray(state[name])
        if arr.dtype.kind not in "biuf":
            raise ConfigError(f"tensor {name!r} has non-numeric dtype {arr.dtype}")
        if arr.shape != tuple(target.shape):
            raise ConfigError(
                f"tensor {name!r} has shape {arr.shape}, the model expects {tuple(target.shape)}"
            )
        arrays[name] = arr
    with torch.no_grad():
        for name, target in targets.items():
            # state_dict tensors share storage with the parameters, so copy_ updates the model.
            target.copy_(torch.tensor(arrays[name], dtype=target.dtype))


def fingerprint(state: Mapping[str, np.ndarray]) -> str:
    """Content hash of a numpy state, for logs and for checking that two sides agree.

    Parameters
    ----------
    state
        Arrays by name.

    Returns
    -------
    str
        The first 32 hex characters of a SHA-256 over, in sorted-name order, each name, dtype,
        shape and the little-endian C-order bytes.  Independent of the mapping's order and of
        the arrays' memory layout; stable across processes and platforms.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.asarray(state[name])
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        # Length-prefix every field so that no two different states feed the same byte stream.
        for field in (name.encode(), arr.dtype.str.encode(), repr(arr.shape).encode()):
            h.update(struct.pack("<Q", len(field)))
            h.update(field)
        h.update(struct.pack("<Q", arr.nbytes))
        h.update(arr.tobytes())
    return h.hexdigest()[:32]
