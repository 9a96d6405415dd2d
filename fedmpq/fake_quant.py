"""Fake quantization for quantization-aware training (QAT), with a straight-through
estimator.

The forward pass replaces a weight by ``dequantize(quantize(w))`` (round to
nearest) computed by :mod:`fedmpq.quant` itself, so what a model trains against is
bit-for-bit what the wire will carry.  The backward pass is the straight-through
estimator: the upstream gradient reaches ``w`` unchanged.

It is a custom :class:`torch.autograd.Function` rather than the
``w + (q - w).detach()`` trick for two reasons: the trick's forward value
``w + (q - w)`` is not always bit-equal to ``q`` in float32, and the custom
backward makes it plain that nothing flows through the scale (``max|w|`` or the
min/max range), which would otherwise send gradient only to the extreme element.

:func:`attach_fake_quant` installs :class:`FakeQuantize` with
``torch.nn.utils.parametrize``; while attached, the latent float weight of a
module is registered as ``<module>.parametrizations.weight.original`` instead of
``<module>.weight`` (in ``named_parameters()`` and ``state_dict()``).
:func:`detach_fake_quant` restores the original names, keeping the latent float
weights, so save and load state dicts after detaching.  (torch re-registers a
restored parameter last, so after a detach a module lists e.g. ``bias`` before
``weight``; look tensors up by name, not by position.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch.nn.utils import parametrize

from fedmpq.errors import ConfigError
from fedmpq.quant import check_quant_args, dequantize, quantize
from fedmpq.quant_spec import FLOAT_BITS, OBSERVER_MINMAX, SCHEME_SYMMETRIC

__all__ = ["FakeQuantize", "attach_fake_quant", "detach_fake_quant", "fake_quantize"]


class _QuantizeStraightThrough(torch.autograd.Function):
    """Forward: the numpy quantize/dequantize round trip.  Backward: identity."""

    @staticmethod
    def forward(w: torch.Tensor, bits: int, scheme: str, axis: int, observer: str) -> torch.Tensor:
        # .to() is a no-op (no copy) for the usual CPU float32 weight.
        w_np = w.detach().to(device="cpu", dtype=torch.float32).numpy()
        w_hat = dequantize(quantize(w_np, bits, scheme, axis=axis, observer=observer))
        return torch.from_numpy(w_hat).to(device=w.device, dtype=w.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        """Nothing to save: the backward pass does not depend on the input."""

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad_output, None, None, None, None


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    scheme: str = SCHEME_SYMMETRIC,
    axis: int = -1,
    observer: str = OBSERVER_MINMAX,
) -> torch.Tensor:
    """Quantize and dequantize ``w`` in the forward pass, pass gradients straight through.

    Parameters
    ----------
    w : torch.Tensor
        A floating-point tensor (quantized in float32, returned in ``w``'s dtype
        and device).
    bits : int
        1..8 to quantize; 16 or 32 return ``w`` itself (float pass-through).
    scheme : str
        ``SCHEME_SYMMETRIC`` (default) or ``SCHEME_AFFINE``.
    axis : int
        -1 for one scale per tensor, else the channel axis with one scale per slice.
    observer : str
        How a symmetric scale is chosen: ``"minmax"`` (default) or ``"mse"``.

    Returns
    -------
    torch.Tensor
        ``dequantize(quantize(w, bits, scheme, axis=axis, observer=observer))`` with
        round to nearest;
        its gradient with respect to ``w`` is the identity.

    Raises
    ------
    fedmpq.quant.QuantizationError
        For an invalid bit-width, scheme or axis, or non-finite values in ``w``.
    """
    if bits in FLOAT_BITS and not isinstance(bits, bool):
        return w
    out: torch.Tensor = _QuantizeStraightThrough.apply(w, bits, scheme, axis, observer)
    return out


class FakeQuantize(torch.nn.Module):
    """A parametrization that fake-quantizes the tensor it is registered on.

    Parameters
    ----------
    bits : int
        1..8, or 16/32 for no quantization.
    scheme : str
        ``SCHEME_SYMMETRIC`` (default) or ``SCHEME_AFFINE``.
    axis : int
        -1 for one scale per tensor, else the channel axis (0 = output channels).
    observer : str
        How a symmetric scale is chosen: ``"minmax"`` (default) or ``"mse"``.

    Raises
    ------
    fedmpq.quant.QuantizationError
        For an invalid bit-width or scheme (the axis is checked against the
        tensor on the first forward pass).
    """

    def __init__(
        self,
        bits: int,
        scheme: str = SCHEME_SYMMETRIC,
        axis: int = -1,
        observer: str = OBSERVER_MINMAX,
    ) -> None:
        super().__init__()
        if bits not in FLOAT_BITS or isinstance(bits, bool):
            check_quant_args(bits, scheme)
        self.bits = bits
        self.scheme = scheme
        self.axis = axis
        self.observer = observer

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Return ``fake_quantize(w, self.bits, self.scheme, self.axis, self.observer)``."""
        return fake_quantize(w, self.bits, self.scheme, self.axis, self.observer)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}, axis={self.axis}, observer={self.observer}"


def attach_fake_quant(
    model: torch.nn.Module,
    bits: Mapping[str, int],
    scheme: str = SCHEME_SYMMETRIC,
    axis: int = 0,
    observer: str = OBSERVER_MINMAX,
) -> None:
    """Fake-quantize the named parameters of ``model`` in place.

    Parameters
    ----------
    model : torch.nn.Module
        Must not have a parametrization on any of the named tensors yet.
    bits : Mapping[str, int]
        Full parameter name as in ``model.named_parameters()`` (e.g.
        ``"features.0.weight"``) to its bit-width (1..8, or 16/32 for none).
    scheme : str
        ``SCHEME_SYMMETRIC`` (default) or ``SCHEME_AFFINE``.
    axis : int
        Channel axis for per-channel scales (default 0, output channels), or -1
        for one scale per tensor.
    observer : str
        How symmetric scales are chosen: ``"minmax"`` (default) or ``"mse"``.

    Raises
    ------
    ConfigError
        If a name is not a parameter of ``model`` or already has a
        parametrization; nothing is attached then.
    fedmpq.quant.QuantizationError
        For an invalid bit-width or scheme; nothing is attached then.

    Notes
    -----
    While attached, ``model.named_parameters()`` and ``model.state_dict()`` name
    each latent weight ``<module>.parametrizations.<tensor>.original``; call
    :func:`detach_fake_quant` to get the plain names back.
    """
    known = dict(model.named_parameters())
    targets = []
    for name, nbits in bits.items():
        module_name, _, tensor_name = name.rpartition(".")
        module = _find_submodule(model, module_name)
        if module is not None and parametrize.is_parametrized(module, tensor_name):
            raise ConfigError(
                f"cannot fake-quantize {name!r}: it already has a parametrization "
                "(fake quantization attached twice?); call detach_fake_quant first"
            )
        if module is None or name not in known:
            raise ConfigError(
                f"cannot fake-quantize {name!r}: not a parameter of the model; "
                f"known parameters: {sorted(known)}"
            )
        targets.append((module, tensor_name, FakeQuantize(nbits, scheme, axis, observer)))
    for module, tensor_name, fake_quant in targets:
        parametrize.register_parametrization(module, tensor_name, fake_quant)


def _find_submodule(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def detach_fake_quant(model: torch.nn.Module) -> None:
    """Remove every :class:`FakeQuantize` from ``model``, keeping the latent float
    weights under their original parameter names.

    Parameters
    ----------
    model : torch.nn.Module
        A model :func:`attach_fake_quant` was applied to (anything else is left
        unchanged).
    """
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        chains = cast(torch.nn.ModuleDict, module.parametrizations)
        for tensor_name, chain in list(chains.items()):
            if any(isinstance(p, FakeQuantize) for p in chain.children()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
