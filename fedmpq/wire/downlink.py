"""The quantized downlink: the global model as each selected device starts from it.

A device trains from ``Q_b(w)``: the global weights quantized at its per-layer bits
with the run's scheme, scale axis and observer (``fedmpq.fake_quant``).  Sending it
exactly that, instead of float32 ``w``, cuts the downlink by ``32 / b`` on the
quantized layers; the other tensors (biases, norms) travel as float32.  Devices
with the same allocation get the same bytes, so the coordinator publishes one
payload per distinct allocation (:func:`group_by_allocation`), named by
:func:`allocation_key`.

Decoding (``fedmpq.wire.tensors.decode_state``) gives back, bit for bit, what
``dequantize(quantize(w, b, scheme, axis=axis, observer=observer))`` gives on the
device itself: the codes and the float32 scales are sent exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from fedmpq.quant_spec import OBSERVER_MINMAX, QUANT_BITS, SCHEME_SYMMETRIC
from fedmpq.wire.messages import GlobalModelMessage
from fedmpq.wire.tensors import encode_state

__all__ = ["allocation_key", "global_model_at", "group_by_allocation"]


def allocation_key(
    bits: Mapping[str, int],
    scheme: str = SCHEME_SYMMETRIC,
    *,
    per_channel: bool = True,
    observer: str = OBSERVER_MINMAX,
) -> str:
    """A short stable name for how a model is quantized; ``""`` when nothing is.

    Parameters
    ----------
    bits
        Per-layer bit-widths; entries of 16/32 bits (float) do not count.
    scheme, per_channel, observer
        The run's quantizer, as in ``TaskMessage``.

    Returns
    -------
    str
        16 hex characters of a SHA-256 over the quantized layers, their bits and the
        quantizer; equal for equal allocations whatever the mapping's order.
    """
    quantized = {name: int(b) for name, b in bits.items() if b in QUANT_BITS}
    if not quantized:
        return ""
    spec = [sorted(quantized.items()), scheme, bool(per_channel), observer]
    return hashlib.sha256(json.dumps(spec, separators=(",", ":")).encode()).hexdigest()[:16]


def group_by_allocation(
    allocations: Mapping[str, Mapping[str, int]],
    scheme: str = SCHEME_SYMMETRIC,
    *,
    per_channel: bool = True,
    observer: str = OBSERVER_MINMAX,
) -> dict[str, list[str]]:
    """Devices by the payload they need: ``allocation_key -> [client ids]``.

    Parameters
    ----------
    allocations
        ``client id -> per-layer bits`` for the devices selected this round.

    Returns
    -------
    dict
        One entry per distinct allocation, in first-seen order; client ids in input order.
    """
    groups: dict[str, list[str]] = {}
    for client_id, bits in allocations.items():
        key = allocation_key(bits, scheme, per_channel=per_channel, observer=observer)
        groups.setdefault(key, []).append(client_id)
    return groups


def global_model_at(
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    *,
    run_id: str,
    round: int,
    model_name: str,
    fingerprint: str,
    scheme: str = SCHEME_SYMMETRIC,
    per_channel: bool = True,
    observer: str = OBSERVER_MINMAX,
) -> GlobalModelMessage:
    """The global model quantized at one allocation, as its devices start from it.

    Parameters
    ----------
    state
        The float global model (name -> float32 array).
    bits
        Per-layer bits of the allocation; tensors not named travel as float32.
    run_id, round, model_name, fingerprint
        As in ``GlobalModelMessage``; ``fingerprint`` is the float model's.
    scheme, per_channel, observer
        The run's quantizer: the device's fake quantization uses the same.

    Returns
    -------
    GlobalModelMessage
        With ``allocation == allocation_key(bits, ...)``.
    """
    # 16/32-bit entries mean "not quantized": fake quantization passes those tensors
    # through as they are, so they travel as float32, not float16.
    quantized = {name: b for name, b in bits.items() if b in QUANT_BITS}
    return GlobalModelMessage(
        run_id=run_id,
        round=round,
        model_name=model_name,
        fingerprint=fingerprint,
        tensors=encode_state(state, quantized, scheme, per_channel=per_channel, observer=observer),
        allocation=allocation_key(quantized, scheme, per_channel=per_channel, observer=observer),
    )
