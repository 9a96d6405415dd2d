"""Export a trained model as a mixed-precision ONNX graph with true n-bit weights.

Each quantizable weight (conv / linear, as :func:`fedmpq.models.quantizable_layers`
names them) is stored as an integer initializer at its bit-width and turned back
into float by a ``DequantizeLinear`` node in front of the layer:

=========  ===================  ======================================================
bits       ONNX storage type    values
=========  ===================  ======================================================
1, 2       INT2 (opset 25)      symmetric: ``q = (-1)**sign * m`` in ``[-M, M]``
3, 4       INT4 (opset 21)      (``M = 2**(b-1) - 1``, ``+-1`` for one bit), scale
5 .. 8     INT8 (opset 13)      ``s / M``, no zero point; affine: UINT2/4/8 codes
16, 32     FLOAT                with their integer zero point
=========  ===================  ======================================================

so 3-bit and other widths go in the next wider ONNX type.  INT2/INT4 initializers
are packed two or four to a byte in ONNX's LSB-first order, which is exactly
:func:`fedmpq.packing.pack_bits`.  Scales are per output channel (``axis=0``) or
per tensor.  The file uses the lowest opset its storage types need.

The graph takes raw pixel values (0..255 for 8-bit image data sets) of shape
``(N, C, H, W)`` and applies the data set's normalisation itself, so a device feeds
it images as they come.

Any model torch can trace exports: torch's TorchScript-based exporter writes the
float graph (``dynamo=False``: the dynamo exporter would add onnxscript to the
coordinator's dependencies for no gain here), and each quantizable weight's
initializer is then swapped for its integer storage and a ``DequantizeLinear``
that produces a tensor of the same name, so the layers reading it are untouched.
BatchNorm stays a separate node (no conv/BN folding), because the weights that were
trained and quantized are the unfolded ones.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import nn

from fedmpq.errors import ConfigError, FedmpqError
from fedmpq.fake_quant import attach_fake_quant
from fedmpq.models import quantizable_layers
from fedmpq.packing import pack_bits
from fedmpq.quant import quantize, symmetric_to_signed
from fedmpq.quant_spec import (
    FLOAT_BITS,
    OBSERVER_MINMAX,
    QUANT_BITS,
    SCHEME_AFFINE,
    SCHEME_SYMMETRIC,
)
from fedmpq.state import load_numpy_state

__all__ = [
    "ExportError",
    "ExportedModel",
    "InputSpec",
    "build_onnx",
    "fake_quant_model",
    "storage_bits",
    "torch_logits",
]

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
_IR_VERSION = 10  # the IR that opsets 21..25 need; onnxruntime >= 1.20 loads it

# Storage type (signed, unsigned) and the opset that first lets DequantizeLinear read it.
_STORAGE = {
    2: (TensorProto.INT2, TensorProto.UINT2, 25),
    4: (TensorProto.INT4, TensorProto.UINT4, 21),
    8: (TensorProto.INT8, TensorProto.UINT8, 13),
}
# What torch's TorchScript exporter writes; onnx's version converter takes it higher.
_MIN_OPSET = 13
_WRAPPED = "model"  # the attribute of _RawPixels that holds the user's model


class ExportError(FedmpqError):
    """A model, bit allocation or run directory that cannot be exported."""


@dataclass(frozen=True)
class InputSpec:
    """What the exported graph expects and how it normalises it.

    The graph computes ``(pixels / pixel_scale - mean) / std`` per channel, exactly
    as :class:`fedmpq.data.datasets.ArrayDataset` does for training.
    """

    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pixel_scale: float = 255.0


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX model and what its weights cost.

    Attributes
    ----------
    onnx_bytes
        The serialized ``ModelProto``.
    opset
        The default-domain opset it declares.
    bits
        Bit-width per quantizable layer (16/32 = float).
    weight_bytes
        Bytes of the quantizable layers' weight initializers as stored (packed data).
    ideal_weight_bytes
        ``sum(n_l * |W_l|) / 8`` over the same layers.
    """

    onnx_bytes: bytes
    opset: int
    bits: dict[str, int]
    weight_bytes: int
    ideal_weight_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)


def storage_bits(bits: int) -> int:
    """Bits per element that ONNX stores a ``bits``-bit weight in (2, 4, 8 or 32)."""
    if bits in FLOAT_BITS:
        return 32
    if bits not in QUANT_BITS:
        raise ExportError(f"cannot export a {bits}-bit layer: use 1..8, 16 or 32 bits")
    return next(width for width in sorted(_STORAGE) if bits <= width)


class _Graph:
    """Quantized weights as integer initializers and their ``DequantizeLinear`` nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weight_bytes = 0
        self.ideal_weight_bytes = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(
        self,
        name: str,
        w: np.ndarray,
        bits: int,
        scheme: str,
        axis: int,
        observer: str = OBSERVER_MINMAX,
    ) -> str:
        """Add weight ``name`` at ``bits`` bits; returns the float tensor's name."""
        self.ideal_weight_bytes += (w.size * bits + 7) // 8
        if bits in FLOAT_BITS:
            self.weight_bytes += w.size * 4
            return self.const(name, w.astype(np.float32))
        width = storage_bits(bits)
        signed_type, unsigned_type, _ = _STORAGE[width]
        q = quantize(w, bits, scheme, axis=axis, observer=observer)
        if scheme == SCHEME_SYMMETRIC:
            values = symmetric_to_signed(q.codes, bits)
            scale = q.scale / np.float32(max((1 << (bits - 1)) - 1, 1))
            data_type, zero_point = signed_type, None
        else:
            values, scale = q.codes, q.scale
            data_type, zero_point = unsigned_type, q.zero_point
        # Two's complement in the low ``width`` bits is how ONNX stores INTn elements.
        raw = pack_bits(values.view(np.uint8) & np.uint8((1 << width) - 1), width, check=False)
        self.weight_bytes += len(raw)
        self.initializers.append(
            helper.make_tensor(f"{name}_quantized", data_type, list(w.shape), raw, raw=True)
        )
        scale_name = self.const(f"{name}_scale", scale if axis != -1 else scale.reshape(()))
        inputs = [f"{name}_quantized", scale_name]
        if zero_point is not None:
            zp = zero_point if axis != -1 else zero_point.reshape(())
            inputs.append(f"{name}_zero_point")
            self.initializers.append(
                helper.make_tensor(
                    f"{name}_zero_point",
                    data_type,
                    list(zp.shape),
                    pack_bits(zp, width, check=False),
                    raw=True,
                )
            )
        node = helper.make_node("DequantizeLinear", inputs, [name], name=name)
        if axis != -1:
            node.attribute.append(helper.make_attribute("axis", axis))
        self.nodes.append(node)
        return name


class _RawPixels(nn.Module):
    """``model`` behind the data set's normalisation, so the graph takes raw pixels."""

    input_gain: torch.Tensor
    input_offset: torch.Tensor

    def __init__(self, model: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        # The same float32 arithmetic as ArrayDataset: x * (1 / (scale * std)) - mean / std.
        self.register_buffer("input_gain", 1.0 / (torch.tensor(spec.pixel_scale) * std))
        self.register_buffer("input_offset", -mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.input_gain + self.input_offset)


def _float_graph(model: nn.Module, spec: InputSpec, opset: int) -> onnx.ModelProto:
    """The float graph of ``model`` (weights as initializers named by ``state_dict`` key)
    at ``opset``, from torch's TorchScript-based exporter.

    BatchNorm stays a node (``TrainingMode.PRESERVE`` on an eval model: no conv/BN
    fusion) and constant folding is off, so every weight reaches the graph unchanged.
    """
    wrapped = _RawPixels(model, spec).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation; its output is what we check.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapped,
                (torch.zeros(1, *spec.shape),),
                buffer,  # type: ignore[arg-type]  # file objects work; the stub says paths
                dynamo=False,
                opset_version=_MIN_OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )
        except Exception as exc:  # torch raises many types for an untraceable model
            raise ExportError(f"torch cannot export {type(model).__name__}: {exc}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    if opset > _MIN_OPSET:
        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as exc:  # the converter raises RuntimeError and friends
            raise ExportError(f"cannot raise the graph to opset {opset}: {exc}") from exc
    _compact_names(proto)
    return proto


def _compact_names(proto: onnx.ModelProto) -> None:
    """Name initializers by the user's ``state_dict`` keys and intermediate tensors ``/0``,
    ``/1``, ... (no ``state_dict`` key starts with ``/``); drop node names, doc strings and
    shape annotations.  All are optional in ONNX, and torch's long scoped names weigh as
    much as a small network's 4-bit weights."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    renamed = {
        t.name: t.name.removeprefix(f"{_WRAPPED}.")
        for t in graph.initializer
        if t.name.startswith(f"{_WRAPPED}.")
    }
    intermediate = [o for node in graph.node for o in node.output if o and o not in outputs]
    renamed.update((name, f"/{i}") for i, name in enumerate(intermediate))
    for t in graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
        node.name = ""
        node.doc_string = ""
    del graph.value_info[:]


def _distinct_placeholders(model: nn.Module, layers: list[str]) -> None:
    """Give each quantizable weight a value no other tensor has.

    The exporter merges initializers with equal values into one; placeholders keep one
    initializer per layer (each layer may have its own bit-width).  Their values never
    reach the file: each is replaced by the layer's quantized weight.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(layers):
            params[name].fill_(-1000.0 - i)


def build_onnx(
    model: nn.Module,
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    spec: InputSpec,
    *,
    scheme: str = SCHEME_SYMMETRIC,
    per_channel: bool = True,
    metadata: Mapping[str, str] | None = None,
    observer: str = OBSERVER_MINMAX,
) -> ExportedModel:
    """Build the ONNX graph of ``model`` with ``state``'s weights at ``bits``.

    Parameters
    ----------
    model
        An instance of the architecture (its weights are not used; ``state``'s are).
    state
        float32 arrays by ``state_dict`` name, e.g. a run's global model.
    bits
        Bit-width (1..8, 16 or 32) for every quantizable layer of ``model``.
    spec
        Input shape, class count and normalisation baked into the graph.
    scheme
        ``"symmetric"`` (default; INTn storage) or ``"affine"`` (UINTn + zero point).
    per_channel
        One scale per output channel (default) rather than per tensor.
    metadata
        Extra ``metadata_props`` to store (e.g. run id, round).
    observer
        How symmetric scales are chosen (``"minmax"`` or ``"mse"``), as in the run.

    Returns
    -------
    ExportedModel

    Raises
    ------
    ExportError
        For a model torch cannot export, a state that does not fit it, a bit-width that
        cannot be stored, or a bit map that does not name exactly the quantizable layers.
    """
    layers = quantizable_layers(model)
    _check_export_request(layers, bits, scheme, spec)
    opset = _needed_opset(bits)
    proto = _float_graph(_placeholder_copy(model, state, layers), spec, opset)
    g = _quantized_weights(proto, state, bits, layers, scheme, 0 if per_channel else -1, observer)
    proto.ir_version = _IR_VERSION
    proto.producer_name = "fedmpq"
    meta = _model_props(spec, bits, metadata)
    helper.set_model_props(proto, meta)
    return ExportedModel(
        onnx_bytes=_checked_bytes(proto),
        opset=opset,
        bits=dict(bits),
        weight_bytes=g.weight_bytes,
        ideal_weight_bytes=g.ideal_weight_bytes,
        metadata=meta,
    )


def _check_export_request(
    layers: list[str], bits: Mapping[str, int], scheme: str, spec: InputSpec
) -> None:
    """Raise :class:`ExportError` unless ``bits``, ``scheme`` and ``spec`` can be exported."""
    if set(bits) != set(layers):
        missing, extra = sorted(set(layers) - set(bits)), sorted(set(bits) - set(layers))
        raise ExportError(
            f"bit map does not match the model's layers: missing {missing}, extra {extra}"
        )
    if scheme not in (SCHEME_SYMMETRIC, SCHEME_AFFINE):
        raise ExportError(f"unknown scheme {scheme!r}: use symmetric or affine")
    for name, b in bits.items():
        storage_bits(b)  # raises for an impossible width
        if b == 1 and scheme == SCHEME_AFFINE:
            raise ExportError(f"{name}: 1-bit weights need the symmetric scheme")
    channels = spec.shape[0]
    if len(spec.mean) != channels or len(spec.std) != channels:
        raise ExportError(f"mean/std need {channels} values, one per input channel")


def _placeholder_copy(
    model: nn.Module, state: Mapping[str, np.ndarray], layers: list[str]
) -> nn.Module:
    """A copy of ``model`` holding ``state``, its quantizable weights made placeholders."""
    copy = deepcopy(model)
    try:
        load_numpy_state(copy, state)
    except ConfigError as exc:
        raise ExportError(f"state does not fit {type(model).__name__}: {exc}") from exc
    _distinct_placeholders(copy, layers)
    return copy


def _needed_opset(bits: Mapping[str, int]) -> int:
    """The lowest opset whose ``DequantizeLinear`` reads every storage type ``bits`` need."""
    return max(
        [_MIN_OPSET] + [_STORAGE[storage_bits(b)][2] for b in bits.values() if b in QUANT_BITS]
    )


def _quantized_weights(
    proto: onnx.ModelProto,
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    layers: list[str],
    scheme: str,
    axis: int,
    observer: str,
) -> _Graph:
    """Swap each placeholder initializer of ``proto`` for its quantized weight and the
    ``DequantizeLinear`` node that restores it; returns what was added."""
    g = _Graph()
    pending = set(layers)
    kept = []
    for init in proto.graph.initializer:
        if init.name in pending:
            pending.remove(init.name)
            g.weight(init.name, state[init.name], bits[init.name], scheme, axis, observer)
        else:
            kept.append(init)
    if pending:
        raise ExportError(f"the exported graph lost the weights {sorted(pending)}")
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + g.initializers)
    # Dequantization needs only initializers, so it can run first.
    nodes = g.nodes + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return g


def _model_props(
    spec: InputSpec, bits: Mapping[str, int], metadata: Mapping[str, str] | None
) -> dict[str, str]:
    """The ``metadata_props`` a device reads: input shape, normalisation, bits, extras."""
    return {
        "input_shape": ",".join(map(str, spec.shape)),
        "num_classes": str(spec.num_classes),
        "mean": ",".join(map(repr, spec.mean)),
        "std": ",".join(map(repr, spec.std)),
        "pixel_scale": repr(spec.pixel_scale),
        "bits": ",".join(f"{k}={v}" for k, v in bits.items()),
        **(metadata or {}),
    }


def _checked_bytes(proto: onnx.ModelProto) -> bytes:
    """``proto`` serialized, once the ONNX checker accepts it."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()


def fake_quant_model(
    model: nn.Module,
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    *,
    scheme: str = SCHEME_SYMMETRIC,
    per_channel: bool = True,
    observer: str = OBSERVER_MINMAX,
) -> nn.Module:
    """``model`` loaded with ``state`` and fake-quantized at ``bits``, in eval mode:
    the torch reference the exported graph must agree with."""
    load_numpy_state(model, state)
    axis = 0 if per_channel else -1
    attach_fake_quant(model, dict(bits), scheme, axis=axis, observer=observer)
    return model.eval()


def torch_logits(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Logits of ``model`` on normalised inputs ``x``, batched, as float32 numpy."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()
