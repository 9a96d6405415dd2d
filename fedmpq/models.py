"""Model registry: small networks for federated training on edge devices, built by name.

Built-in models
---------------
``mlp``
    Flatten, two hidden layers of 200 ReLU units, linear classifier (the "2NN" of
    McMahan et al. 2017).
``cnn``
    Two 5x5 conv layers (8 and 16 channels, each followed by ReLU and 2x2 max-pooling) and two
    fully connected layers (128 hidden units); about 0.1M parameters.  Kept narrow so that a
    training step is cheap on one CPU core (a Raspberry Pi-class device).
``resnet20``
    The CIFAR ResNet-20 of He et al. 2016 (section 4.2): a 3x3 stem, three stages of three
    basic blocks with 16/32/64 channels, global average pooling and a linear classifier;
    about 0.27M parameters.  Shortcuts use the paper's *option A*: identity, and where the
    shape changes, stride-2 subsampling with zero-padded extra channels.  Option A adds no
    weights, so every weight tensor of the model is a conv or linear layer that the quantizer
    sees, and the parameter count matches the paper's.
``resnet18``
    The ImageNet ResNet-18 (four stages of two basic blocks, 64-512 channels, 1x1 projection
    shortcuts) with the 7x7 stride-2 stem and max-pool replaced by one 3x3 stride-1 conv, the
    usual adaptation to 32x32 inputs; about 11.2M parameters.  Used by benchmarks for its size.

Your own model
--------------
``module:PKG.MOD:FUNC`` names a factory in any importable module (the ``module:`` form of
data set specs), e.g. ``--model module:examples.tiny_model:build``: ``FUNC(num_classes=...,
in_shape=(c, h, w))`` must return an ``nn.Module``.  The name travels in the run's messages,
so every agent must be able to import the module too.  Its ``nn.Linear`` and ``nn.Conv*``
weights are what gets quantized; anything torch's ONNX exporter can trace exports.

Every factory takes ``num_classes`` and ``in_shape`` (channels, height, width), so 1x28x28 and
3x32x32 inputs both work.  Initialisation draws only from torch's global generator, so
``torch.manual_seed`` before :func:`build_model` makes the weights reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedmpq.errors import ConfigError
from fedmpq.plugins import MODULE_PREFIX, load_function

ModelFactory = Callable[..., nn.Module]
"""``factory(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module``."""


class MLP(nn.Module):
    """Two-hidden-layer perceptron over the flattened input."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], hidden: int = 200):
        super().__init__()
        c, h, w = in_shape
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class SmallCNN(nn.Module):
    """Two conv + pool stages and two fully connected layers."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = in_shape
        if h < 4 or w < 4:
            raise ConfigError(f"model 'cnn' needs inputs of at least 4x4 pixels, got {h}x{w}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 8, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * (h // 4) * (w // 4), 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Residual network of basic blocks for small images (3x3 stem, no max-pool)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: tuple[int, ...],
        blocks_per_stage: int,
        shortcut: str,
    ):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, shortcut))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def _resnet20(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return ResNet(num_classes, in_shape[0], (16, 32, 64), 3, shortcut="A")


def _resnet18(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return ResNet(num_classes, in_shape[0], (64, 128, 256, 512), 2, shortcut="B")


_REGISTRY: dict[str, ModelFactory] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet20": _resnet20,
    "resnet18": _resnet18,
}


def register_model(name: str, factory: ModelFactory) -> None:
    """Make a user-defined model available to :func:`build_model` under ``name``.

    Parameters
    ----------
    name
        Registry key; must be non-empty and not already registered.
    factory
        Called as ``factory(num_classes=..., in_shape=(c, h, w))``; returns an ``nn.Module``.

    Raises
    ------
    ConfigError
        If the name is empty or taken, or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(MODULE_PREFIX):
        raise ConfigError(f"model names starting {MODULE_PREFIX!r} name modules; choose another")
    if name in _REGISTRY:
        raise ConfigError(f"model {name!r} is already registered; choose another name")
    if not callable(factory):
        raise ConfigError(f"factory for model {name!r} must be callable")
    _REGISTRY[name] = factory


def _module_factory(name: str) -> ModelFactory:
    """The factory that ``module:pkg.mod:func`` names."""
    factory: ModelFactory = load_function("model", name, name.removeprefix(MODULE_PREFIX))
    return factory


def model_names() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def build_model(
    name: str, num_classes: int = 10, in_shape: tuple[int, int, int] = (1, 28, 28)
) -> nn.Module:
    """Build a freshly initialised model.

    Parameters
    ----------
    name
        A registered model name (see :func:`model_names`) or ``module:pkg.mod:func``.
    num_classes
        Size of the output layer (>= 2).
    in_shape
        Input shape ``(channels, height, width)`` of one sample.

    Returns
    -------
    nn.Module
        The model, in training mode.

    Raises
    ------
    ConfigError
        For an unknown name, a ``module:`` factory that cannot be imported or does not
        return an ``nn.Module``, or an invalid ``num_classes``/``in_shape``.
    """
    factory = _module_factory(name) if name.startswith(MODULE_PREFIX) else _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(model_names())} "
            f"or {MODULE_PREFIX}pkg.mod:func"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    shape = tuple(in_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"in_shape must be three positive ints (C, H, W), got {in_shape!r}")
    try:
        model = factory(num_classes=num_classes, in_shape=shape)
    except TypeError as exc:
        if not name.startswith(MODULE_PREFIX):
            raise
        raise ConfigError(
            f"model {name!r} cannot be called as f(num_classes=..., in_shape=...): {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned {type(model).__name__}, expected nn.Module")
    return model


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear weight tensors of ``model``, in module order.

    These are the tensors that mixed-precision quantization assigns bit-widths to; biases,
    BatchNorm parameters and buffers stay in float.

    Parameters
    ----------
    model
        Any module.

    Returns
    -------
    list of str
        ``state_dict`` keys such as ``"features.0.weight"``.
    """
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    ]
