"""What the devices hosted by one process share: decoded global models and one network per
architecture, so a process emulating hundreds of devices holds each model once."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from edge_client.task import execute_task
from fedmpq.models import build_model
from fedmpq.resources import ModelCost, model_cost
from fedmpq.state import model_layout
from fedmpq.wire.codec import DecodeLimits, decode
from fedmpq.wire.layout import ModelLayout
from fedmpq.wire.messages import GlobalModelMessage, TaskMessage
from fedmpq.wire.tensors import decode_state


class GlobalModelCache:
    """Decoded global models by (fingerprint, allocation); identical payloads are decoded
    once even when hundreds of emulated devices in this process each receive their own
    copy."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep  # models kept: a round may use several allocations
        self._models: OrderedDict[tuple[str, str], tuple[dict[str, np.ndarray], int]] = (
            OrderedDict()
        )
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # payload digest -> its round

    def add(self, payload: bytes, limits: DecodeLimits, layout: ModelLayout) -> int:
        """Decode and cache ``payload`` (unless this exact payload is cached); its round.

        ``layout`` is the model the device built (``ModelPool.layout``): the payload names
        its layout only by digest, and one of another layout is a ``DecodeError``.
        """
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest in self._seen:
            return self._seen[digest]
        msg = decode(payload, GlobalModelMessage, limits, layout=layout)
        self._models[(msg.fingerprint, msg.allocation)] = (decode_state(msg.tensors), len(payload))
        self._seen[digest] = msg.round
        for cache in (self._models, self._seen):
            while len(cache) > self.keep:
                cache.popitem(last=False)
        return msg.round

    def get(self, fingerprint: str, allocation: str) -> dict[str, np.ndarray] | None:
        """The decoded model of ``fingerprint`` at ``allocation``, if cached."""
        entry = self._models.get((fingerprint, allocation))
        return None if entry is None else entry[0]

    def payload_bytes(self, fingerprint: str, allocation: str) -> int:
        """How long that model's payload was (0 if not cached)."""
        entry = self._models.get((fingerprint, allocation))
        return 0 if entry is None else entry[1]


class ModelPool:
    """One network per architecture and its cost, built on first use; devices train on it in
    turn (the runtime trains one task at a time)."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]) -> None:
        self.num_classes = num_classes
        self.in_shape = in_shape
        self._nets: dict[str, nn.Module] = {}
        self._costs: dict[str, ModelCost] = {}
        self._layouts: dict[str, ModelLayout] = {}
        self._warmed: set[str] = set()  # architectures this process has trained once, untimed

    def net(self, model_name: str) -> nn.Module:
        """The shared network of ``model_name``; its weights are whatever was loaded last."""
        if model_name not in self._nets:
            self._nets[model_name] = build_model(model_name, self.num_classes, self.in_shape)
        return self._nets[model_name]

    def layout(self, model_name: str) -> ModelLayout:
        """The wire layout of ``model_name``'s network, which global models name by digest."""
        if model_name not in self._layouts:
            self._layouts[model_name] = model_layout(self.net(model_name))
        return self._layouts[model_name]

    def cost(self, model_name: str) -> ModelCost:
        """Parameter, activation and FLOP counts of ``model_name`` (``fedmpq.resources``)."""
        if model_name not in self._costs:
            self._costs[model_name] = model_cost(self.net(model_name), self.in_shape)
        return self._costs[model_name]

    def warm_up(
        self,
        task: TaskMessage,
        global_state: Mapping[str, np.ndarray],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """Train ``task`` once on the first sample of ``(x, y)``, the first time this process
        meets its architecture.

        A process's first task pays one-off costs (lazy imports, kernel set-up) that a device
        training every round does not; whoever times training pays them here, untimed.
        """
        if task.model_name in self._warmed:
            return
        net = self.net(task.model_name)
        execute_task(task, net, global_state, x[:1], y[:1], seed=0, memory={})
        self._warmed.add(task.model_name)
