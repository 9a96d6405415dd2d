"""A model fedmpq does not ship, for ``--model module:examples.tiny_model:build``.

A depthwise-separable convolutional network with one residual block (about 1.4k weights):
the kind of architecture a user brings for a microcontroller-class budget.  Any importable
module works the same way; only the factory's signature matters::

    PYTHONPATH=. fedmpq coordinator --model module:examples.tiny_model:build ...
    PYTHONPATH=. fedmpq agent ...        # agents import the same module
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinySeparableNet(nn.Module):
    """Strided stem, one depthwise-separable residual block, global pooling, linear head."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.pointwise = nn.Conv2d(width, width, 1, bias=False)
        self.block_bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.block_bn(self.pointwise(self.depthwise(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """The factory fedmpq calls: ``build(num_classes=..., in_shape=(c, h, w))``."""
    return TinySeparableNet(num_classes, in_shape[0])
