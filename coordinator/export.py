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
it images as they come.  Supported architectures are chains of layers, i.e.
models whose ``forward`` applies their (nested ``nn.Sequential``) children in
registration order: ``mlp`` and ``cnn``.  Layers: Linear, Conv2d, ReLU,
MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), BatchNorm2d (eval), Flatten, Dropout,
Identity.  Residual networks (``resnet20``/``resnet18``) are not supported.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fedmpq.errors import FedmpqError
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
_MIN_OPSET = 13


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
    """Nodes and initializers accumulated while walking the model."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.opset = _MIN_OPSET
        self.weight_bytes = 0
        self.ideal_weight_bytes = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

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
        signed_type, unsigned_type, opset = _STORAGE[width]
        self.opset = max(self.opset, opset)
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
        attrs = {"axis": axis} if axis != -1 else {}
        return self.node("DequantizeLinear", inputs, name, **attrs)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's leaf modules in execution order, if it is a chain of layers."""
    children = list(model.children())
    if not isinstance(model, nn.Sequential) and not all(
        isinstance(c, nn.Sequential) for c in children
    ):
        raise ExportError(
            f"cannot export {type(model).__name__}: only models built as chains of "
            "nn.Sequential layers (mlp, cnn) are supported, not residual networks"
        )
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def _pair(value: int | tuple[int, ...]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _weighted(
    g: _Graph,
    name: str,
    module: nn.Linear | nn.Conv2d,
    x: str,
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    scheme: str,
    axis: int,
    observer: str,
) -> str:
    """A linear or convolution layer with its weights quantized at ``bits``."""
    wname = f"{name}.weight"
    w = g.weight(wname, state[wname], bits[wname], scheme, axis, observer)
    inputs = [x, w]
    if module.bias is not None:
        inputs.append(g.const(f"{name}.bias", state[f"{name}.bias"]))
    out = name or type(module).__name__.lower()
    if isinstance(module, nn.Linear):
        return g.node("Gemm", inputs, out, transB=1)
    if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
        raise ExportError(f"{name}: only explicit zero padding can be exported")
    pads = _pair(module.padding)
    return g.node(
        "Conv",
        inputs,
        out,
        kernel_shape=_pair(module.kernel_size),
        strides=_pair(module.stride),
        pads=pads + pads,
        dilations=_pair(module.dilation),
        group=module.groups,
    )


def _pool(g: _Graph, name: str, module: nn.MaxPool2d | nn.AvgPool2d, x: str, out: str) -> str:
    pads = _pair(module.padding)
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride or module.kernel_size)
    attrs: dict[str, object] = {"kernel_shape": kernel, "strides": stride, "pads": pads + pads}
    if module.ceil_mode:
        attrs["ceil_mode"] = 1
    if isinstance(module, nn.MaxPool2d):
        if _pair(module.dilation) != [1, 1]:
            raise ExportError(f"{name}: dilated max-pooling is not supported")
        return g.node("MaxPool", [x], out, **attrs)
    attrs["count_include_pad"] = int(module.count_include_pad)
    return g.node("AveragePool", [x], out, **attrs)


def _add_layer(
    g: _Graph,
    name: str,
    module: nn.Module,
    x: str,
    state: Mapping[str, np.ndarray],
    bits: Mapping[str, int],
    scheme: str,
    axis: int,
    observer: str,
) -> str:
    """Append ``module`` applied to tensor ``x``; returns its output tensor's name."""
    out = name or type(module).__name__.lower()
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return _weighted(g, name, module, x, state, bits, scheme, axis, observer)
    if isinstance(module, nn.ReLU):
        return g.node("Relu", [x], out)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool(g, name, module, x, out)
    if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == [1, 1]:  # type: ignore[arg-type]
        return g.node("GlobalAveragePool", [x], out)
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ExportError(f"{name}: only Flatten(1, -1) is supported")
        return g.node("Flatten", [x], out, axis=1)
    if isinstance(module, nn.BatchNorm2d):
        params = [
            g.const(f"{name}.{p}", state[f"{name}.{p}"])
            for p in ("weight", "bias", "running_mean", "running_var")
        ]
        return g.node("BatchNormalization", [x, *params], out, epsilon=module.eps)
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return x
    raise ExportError(f"{name}: layer type {type(module).__name__} cannot be exported")


def _check_bits(layers: list[str], bits: Mapping[str, int], scheme: str) -> None:
    """Raise ExportError unless ``bits`` names exactly ``layers`` at exportable widths."""
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


def _normalised_input(g: _Graph, spec: InputSpec) -> str:
    """The graph input scaled and normalised as the training data was."""
    channels = spec.shape[0]
    if len(spec.mean) != channels or len(spec.std) != channels:
        raise ExportError(f"mean/std need {channels} values, one per input channel")
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    # The same float32 arithmetic as ArrayDataset: x * (1 / (scale * std)) - mean / std.
    gain = g.const("input_gain", np.float32(1) / (np.float32(spec.pixel_scale) * std))
    offset = g.const("input_offset", -mean / std)
    return g.node("Add", [g.node("Mul", [INPUT_NAME, gain], "input_scaled"), offset], "input_norm")


def _metadata(spec: InputSpec, bits: Mapping[str, int], extra: Mapping[str, str]) -> dict[str, str]:
    """``metadata_props``: what a runtime needs to feed the graph, the bits, and ``extra``."""
    return {
        "input_shape": ",".join(map(str, spec.shape)),
        "num_classes": str(spec.num_classes),
        "mean": ",".join(map(repr, spec.mean)),
        "std": ",".join(map(repr, spec.std)),
        "pixel_scale": repr(spec.pixel_scale),
        "bits": ",".join(f"{k}={v}" for k, v in bits.items()),
        **extra,
    }


def _model_bytes(g: _Graph, spec: InputSpec, meta: Mapping[str, str]) -> bytes:
    """The checked, serialised model of graph ``g``."""
    graph = helper.make_graph(
        g.nodes,
        "fedmpq",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *spec.shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", spec.num_classes])],
        g.initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", g.opset)],
        producer_name="fedmpq",
        ir_version=_IR_VERSION,
    )
    helper.set_model_props(proto, dict(meta))
    onnx.checker.check_model(proto, full_check=True)
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()


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
        For an architecture, layer or bit-width that cannot be exported, or a bit map
        that does not name exactly the quantizable layers.
    """
    _check_bits(quantizable_layers(model), bits, scheme)
    g = _Graph()
    x = _normalised_input(g, spec)
    axis = 0 if per_channel else -1
    for name, module in _chain(model):
        x = _add_layer(g, name, module, x, state, bits, scheme, axis, observer)
    g.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name=OUTPUT_NAME))
    meta = _metadata(spec, bits, metadata or {})
    return ExportedModel(
        onnx_bytes=_model_bytes(g, spec, meta),
        opset=g.opset,
        bits=dict(bits),
        weight_bytes=g.weight_bytes,
        ideal_weight_bytes=g.ideal_weight_bytes,
        metadata=meta,
    )


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
