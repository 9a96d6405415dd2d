"""What a run leaves behind, as collaborators the transport adapter calls through small
interfaces: checkpoints, the metrics log (and its plot), and the released model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.config import RunConfig
from coordinator.metrics import MetricsLog, plot_accuracy
from coordinator.workload import Workload
from fedmpq.fileio import write_atomic
from fedmpq.policies import BitAllocation


class CheckpointStore(Protocol):
    def save(self, ckpt: Checkpoint) -> None: ...

    def load(self) -> Checkpoint: ...


class MetricsSink(Protocol):
    rows: list[dict[str, Any]]

    def append(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ModelRelease(Protocol):
    def release(
        self, round: int, state: Mapping[str, np.ndarray], allocations: Mapping[str, BitAllocation]
    ) -> bytes | None:
        """Hand over the final model; the payload to publish to the devices, if any."""
        ...


class DirectoryCheckpoints:
    """``checkpoint.msgpack`` and the model alone (``global_model.msgpack``, for export),
    each written atomically into the run directory."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def save(self, ckpt: Checkpoint) -> None:
        write_atomic(self.out_dir / "global_model.msgpack", ckpt.global_frame)
        save_checkpoint(self.out_dir, ckpt)

    def load(self) -> Checkpoint:
        return load_checkpoint(self.out_dir)


class PlottedMetrics(MetricsLog):
    """``metrics.jsonl``, plotted into ``accuracy.png`` when the run closes."""

    def __init__(self, out_dir: Path, keep_through: int | None, title: str) -> None:
        super().__init__(out_dir / "metrics.jsonl", keep_through=keep_through)
        self.plot_path = out_dir / "accuracy.png"
        self.title = title

    def close(self) -> None:
        plot_accuracy(self.rows, self.plot_path, title=self.title)


class OnnxRelease:
    """``final_bits.json`` and, with ``publish_onnx``, the ONNX model (model_release)."""

    def __init__(self, config: RunConfig, workload: Workload) -> None:
        self.config = config
        self.workload = workload

    def release(
        self, round: int, state: Mapping[str, np.ndarray], allocations: Mapping[str, BitAllocation]
    ) -> bytes | None:
        from coordinator.model_release import release_model

        w = self.workload
        return release_model(self.config, w.model, state, allocations, w.data, round)


def run_title(config: RunConfig) -> str:
    name, params = config.policy_params()
    detail = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{config.model} on {config.dataset}, policy {name}({detail})"
