"""Tensors to wire payloads and back: quantize + bit-pack, or float pass-through.

This is the only place that joins the quantizer (``fedmpq.quant``), the packer
(``fedmpq.packing``) and the payload dataclass, so the agent and the coordinator
cannot disagree on how a layer travels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedmpq.packing import pack_bits, unpack_bits
from fedmpq.quant import QuantizedTensor, Rounding, dequantize, quantize, steps_per_scale
from fedmpq.quant_scales import units_from_bytes, units_to_bytes
from fedmpq.quant_spec import (
    FLOAT_BITS,
    OBSERVER_MINMAX,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_FLOAT,
    SCHEME_SYMMETRIC,
    channel_axis,
)
from fedmpq.wire.messages import TensorPayload

_FLOAT_DTYPES: dict[int, np.dtype[np.floating]] = {16: np.dtype("<f2"), 32: np.dtype("<f4")}


def encode_tensor(
    name: str,
    w: np.ndarray,
    bits: int,
    scheme: str = SCHEME_SYMMETRIC,
    *,
    per_channel: bool = True,
    rounding: Rounding | str = Rounding.NEAREST,
    rng: np.random.Generator | None = None,
    observer: str = OBSERVER_MINMAX,
) -> TensorPayload:
    """Quantize and pack ``w`` at ``bits`` (1..8), or store it as float16/float32.

    Parameters
    ----------
    name
        The tensor's name in the model's state dict.
    w
        The float tensor.
    bits
        1..8 to quantize; 16 or 32 to send floats (``scheme`` is then ignored).
    scheme
        ``"symmetric"`` (sign-magnitude, FedMPQ) or ``"affine"`` (min-max).
    per_channel
        One scale per output channel (axis 0) for tensors of two or more dimensions.
    rounding, rng
        Round to nearest, or stochastically with ``rng`` (unbiased; for QSGD-style updates).
    observer
        How a symmetric scale is chosen: ``"minmax"`` or ``"mse"`` (see ``fedmpq.quant``).
    """
    shape = [int(d) for d in w.shape]
    if bits in FLOAT_BITS or scheme == SCHEME_FLOAT:
        width = bits if bits in FLOAT_BITS else 32
        data = np.ascontiguousarray(w, dtype=_FLOAT_DTYPES[width]).tobytes()
        return TensorPayload(name, shape, width, SCHEME_FLOAT, -1, b"", b"", data)
    axis = channel_axis(w.ndim, per_channel)
    q = quantize(w, bits, scheme, axis=axis, rounding=rounding, rng=rng, observer=observer)
    return TensorPayload(
        name=name,
        shape=shape,
        bits=bits,
        scheme=scheme,
        axis=axis,
        scale=scale_bytes(q.scale, axis, bits, scheme),
        zero_point=q.zero_point.astype(np.uint8).tobytes() if scheme == SCHEME_AFFINE else b"",
        data=pack_bits(q.codes, bits, check=False),
    )


def decode_tensor(p: TensorPayload) -> np.ndarray:
    """The float32 tensor a (validated) payload stands for."""
    shape = tuple(p.shape)
    if p.scheme == SCHEME_FLOAT:
        flat = np.frombuffer(p.data, dtype=_FLOAT_DTYPES[p.bits])
        return flat.astype(np.float32).reshape(shape)
    count = int(np.prod(shape, dtype=np.int64))
    codes = unpack_bits(p.data, p.bits, count).reshape(shape)
    q = QuantizedTensor(
        codes=codes,
        bits=p.bits,
        scheme=p.scheme,
        axis=p.axis,
        scale=scales_of(p),
        zero_point=np.frombuffer(p.zero_point, dtype=np.uint8),
    )
    return dequantize(q)


def scale_bytes(scale: np.ndarray, axis: int, bits: int, scheme: str) -> bytes:
    """A quantized tensor's scales as they travel: one little-endian float32 per tensor
    (``axis == -1``); per slice, their steps on ``fedmpq.quant_scales``' grid (2 bytes and
    a byte a slice), exact for the scales ``fedmpq.quant`` makes."""
    if axis == -1:
        return np.ascontiguousarray(scale, dtype="<f4").tobytes()
    return units_to_bytes(np.asarray(scale, dtype=np.float32) / steps_per_scale(bits, scheme))


def scales_of(p: TensorPayload) -> np.ndarray:
    """The float32 scales of a (validated) quantized payload."""
    if p.axis == -1:
        return np.frombuffer(p.scale, dtype="<f4").astype(np.float32)
    with np.errstate(over="ignore"):  # the codec refuses a frame whose scales overflow
        return units_from_bytes(p.scale) * steps_per_scale(p.bits, p.scheme)


def encode_state(
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    scheme: str = SCHEME_SYMMETRIC,
    *,
    per_channel: bool = True,
    rounding: Rounding | str = Rounding.NEAREST,
    rng: np.random.Generator | None = None,
    observer: str = OBSERVER_MINMAX,
) -> list[TensorPayload]:
    """Encode a whole state dict; tensors not named in ``bits`` travel as float32."""
    return [
        encode_tensor(
            name,
            w,
            bits.get(name, 32),
            scheme,
            per_channel=per_channel,
            rounding=rounding,
            rng=rng,
            observer=observer,
        )
        for name, w in state.items()
    ]


def decode_state(payloads: Iterable[TensorPayload]) -> dict[str, np.ndarray]:
    """Decode every payload of a message into a name -> float32 array map."""
    return {p.name: decode_tensor(p) for p in payloads}


def ideal_nbytes(state: Mapping[str, np.ndarray], bits: Mapping[str, int]) -> float:
    """The information a message of ``state`` at ``bits`` must carry: ``n * b / 8`` bytes
    for each quantized tensor of ``n`` elements, 4 bytes a value for the float32 rest.
    (Scales, framing and message fields are what a frame adds on top.)"""
    return sum(
        w.size * (b if (b := bits.get(n, 32)) in QUANT_BITS else 32) / 8 for n, w in state.items()
    )
