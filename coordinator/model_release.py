"""What the coordinator hands over after training: the final bit allocation on disk
(``final_bits.json``) and the exported ONNX model as a ``ModelMessage``.

A heterogeneous policy gives each client its own allocation; the released model uses
the per-layer maximum over the last round's clients, i.e. the precision the most
capable device trained each layer at (for a uniform policy that is just its width).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from coordinator.config import RunConfig
from coordinator.export import ExportedModel, InputSpec
from fedmpq.data.datasets import DatasetSplit
from fedmpq.errors import ConfigError, FedmpqError
from fedmpq.fileio import write_atomic
from fedmpq.model_metadata import class_names_metadata
from fedmpq.policies import BitAllocation
from fedmpq.wire.codec import encode
from fedmpq.wire.messages import ModelMessage

log = logging.getLogger("fedmpq.coordinator")

FINAL_BITS = "final_bits.json"
MODEL_FILE = "model.onnx"


def final_bits(allocations: Mapping[str, BitAllocation]) -> dict[str, int]:
    """Per-layer maximum bit-width over the clients' allocations of one round."""
    bits: dict[str, int] = {}
    for allocation in allocations.values():
        for layer, b in allocation.bits.items():
            bits[layer] = max(bits.get(layer, 0), b)
    return bits


def released_bits(out_dir: Path, allocations: Mapping[str, BitAllocation]) -> dict[str, int]:
    """The per-layer maximum of ``allocations`` or, with none (no round of this process
    changed the model, e.g. a resumed run with nothing left to do), the bits already in
    ``final_bits.json``; ``{}`` if neither: an empty file would only break ``fedmpq export``."""
    return final_bits(allocations) or read_final_bits(out_dir).get("bits", {})


def input_spec(data: DatasetSplit) -> InputSpec:
    """Input shape, classes and normalisation of a data set, for the exported graph."""
    train = data.train
    scale = 255.0 if train.x.dtype.kind == "u" and train.x.itemsize == 1 else 1.0
    return InputSpec(data.in_shape, data.num_classes, train.mean, train.std, scale)


def write_final_bits(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``final_bits.json``: ``bits`` plus the run's model, dataset, scheme, round."""
    write_atomic(out_dir / FINAL_BITS, (json.dumps(record, indent=1) + "\n").encode())


def read_final_bits(run_dir: Path) -> dict[str, Any]:
    """Read a run's ``final_bits.json`` (``{}`` if the run predates it)."""
    path = run_dir / FINAL_BITS
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("bits", {}), dict):
        raise ConfigError(f"{path}: expected a JSON object with a 'bits' object")
    return record


def model_message(
    exported: ExportedModel, spec: InputSpec, *, run_id: str, round: int, model_name: str
) -> ModelMessage:
    """The retained message that delivers ``exported`` to the devices."""
    return ModelMessage(
        run_id=run_id,
        round=round,
        model_name=model_name,
        fingerprint=hashlib.sha256(exported.onnx_bytes).hexdigest(),
        onnx=exported.onnx_bytes,
        input_shape=list(spec.shape),
        num_classes=spec.num_classes,
        mean=list(spec.mean),
        std=list(spec.std),
        pixel_scale=spec.pixel_scale,
        bits=dict(exported.bits),
    )


def release_model(
    config: RunConfig,
    model: nn.Module,
    state: Mapping[str, np.ndarray],
    allocations: Mapping[str, BitAllocation],
    data: DatasetSplit,
    round: int,
) -> bytes | None:
    """Write the run's final artefacts and return the encoded ``ModelMessage`` to publish.

    Writes ``final_bits.json`` (never an empty one: :func:`released_bits`); with
    ``config.publish_onnx`` also ``model.onnx``, returning its message (``None`` otherwise,
    or when the model cannot be exported: that is logged, the run's result stands).
    """
    out_dir = Path(config.out_dir)
    bits = released_bits(out_dir, allocations)
    if not bits:
        log.warning("no round changed the model: no %s written, no model published", FINAL_BITS)
        return None
    record = {
        "run_id": config.run_id,
        "round": round,
        "model": config.model,
        "dataset": config.dataset,
        "scheme": config.scheme,
        "observer": config.observer,
        "per_channel": config.per_channel,
        "bits": bits,
    }
    write_final_bits(out_dir, record)
    if not config.publish_onnx:
        return None
    try:
        from coordinator.export import build_onnx

        spec = input_spec(data)
        meta = {"run_id": config.run_id, "round": str(round), "model_name": config.model}
        meta |= class_names_metadata(data.class_names)
        exported = build_onnx(
            model,
            state,
            bits,
            spec,
            scheme=config.scheme,
            per_channel=config.per_channel,
            metadata=meta,
            observer=config.observer,
        )
    except (ImportError, FedmpqError) as exc:
        log.warning("not publishing an ONNX model: %s", exc)
        return None
    write_atomic(out_dir / MODEL_FILE, exported.onnx_bytes)
    message = model_message(
        exported, spec, run_id=config.run_id, round=round, model_name=config.model
    )
    log.info(
        "publishing %s (%d bytes, opset %d)", MODEL_FILE, len(exported.onnx_bytes), exported.opset
    )
    return encode(message)
