"""``fedmpq export RUN_DIR --out model.onnx``: a run's global model as mixed-precision ONNX.

Bits come from ``--bits N`` (every layer), ``--bits-file JSON`` (``{layer: bits}``),
or by default the run's ``final_bits.json``.  The export is checked with the ONNX
checker, then (unless ``--no-validate``) onnxruntime runs it on the data set's test
split next to the torch fake-quant model: the command fails if top-1 accuracy
differs by more than 0.5 points or a logit by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmpq.cli_common import make_parser
from fedmpq.errors import FedmpqError
from fedmpq.fileio import write_atomic
from fedmpq.model_metadata import class_names_metadata
from fedmpq.quant_spec import OBSERVER_MINMAX, SCHEME_SYMMETRIC
from fedmpq.wire.codec import decode
from fedmpq.wire.messages import GlobalModelMessage
from fedmpq.wire.tensors import decode_state

if TYPE_CHECKING:  # torch only for the type checker: --help and bad flags must stay fast
    from torch import nn

    from coordinator.export import ExportedModel
    from fedmpq.data.datasets import DatasetSplit

#: Largest accepted top-1 accuracy gap between onnxruntime and torch, in points.
MAX_ACCURACY_GAP = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("fedmpq export", __doc__)
    p.add_argument("run_dir", type=Path, help="a run directory (global_model.msgpack)")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--bits", type=int, help="one bit-width for every layer (1..8, 32)")
    bits.add_argument("--bits-file", type=Path, help="JSON {layer: bits}")
    p.add_argument("--dataset", help="data set spec (default: the run's, else fashion-mnist-small)")
    p.add_argument("--scheme", choices=["symmetric", "affine"], help="default: the run's")
    p.add_argument("--observer", choices=["minmax", "mse"], help="default: the run's")
    p.add_argument("--per-tensor", action="store_true", help="one scale per tensor")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted |logit difference|")
    return p


def _bits(args: argparse.Namespace, record: dict[str, Any], layers: list[str]) -> dict[str, int]:
    from coordinator.export import ExportError

    if args.bits is not None:
        return {name: args.bits for name in layers}
    if args.bits_file is not None:
        try:
            bits = json.loads(args.bits_file.read_text())
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot read --bits-file {args.bits_file}: {exc}") from exc
        if not isinstance(bits, dict) or not all(isinstance(v, int) for v in bits.values()):
            raise ExportError(f"{args.bits_file}: expected a JSON object {{layer: bits}}")
        return bits
    if record.get("bits"):
        return {str(k): int(v) for k, v in record["bits"].items()}
    raise ExportError(f"{args.run_dir} has no final_bits.json: pass --bits N or --bits-file")


def validate(
    onnx_bytes: bytes, reference: Any, x_raw: np.ndarray, x_norm: Any, y: np.ndarray
) -> dict[str, float]:
    """Accuracy of onnxruntime and of the torch reference on the same data, and the
    largest logit difference."""
    import onnxruntime as ort

    from coordinator.export import torch_logits

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    ours = np.concatenate(
        [
            session.run(None, {"pixels": x_raw[i : i + 1024].astype(np.float32)})[0]
            for i in range(0, len(x_raw), 1024)
        ]
    )
    ref = torch_logits(reference, x_norm)
    return {
        "onnx_accuracy": float((ours.argmax(1) == y).mean()),
        "torch_accuracy": float((ref.argmax(1) == y).mean()),
        "max_abs_logit_diff": float(np.abs(ours - ref).max()),
    }


@dataclass(frozen=True)
class _ExportJob:
    """A run's global model and how to quantize it, as the run and the flags say."""

    glob: GlobalModelMessage
    data: DatasetSplit
    model: nn.Module
    state: dict[str, np.ndarray]
    bits: dict[str, int]
    scheme: str
    per_channel: bool
    observer: str


def _load_job(args: argparse.Namespace) -> _ExportJob:
    """Read the run directory and its data set; flags override what the run recorded."""
    from coordinator.export import ExportError
    from coordinator.model_release import read_final_bits
    from fedmpq.data.datasets import load_dataset
    from fedmpq.models import build_model, quantizable_layers

    try:
        glob = decode((args.run_dir / "global_model.msgpack").read_bytes(), GlobalModelMessage)
    except OSError as exc:
        raise ExportError(f"cannot read the run's global model: {exc}") from exc
    record = read_final_bits(args.run_dir)
    data = load_dataset(args.dataset or record.get("dataset", "fashion-mnist-small"))
    state = decode_state(glob.tensors)
    model = build_model(glob.model_name, data.num_classes, data.in_shape)
    return _ExportJob(
        glob=glob,
        data=data,
        model=model,
        state=state,
        bits=_bits(args, record, quantizable_layers(model)),
        scheme=args.scheme or record.get("scheme", SCHEME_SYMMETRIC),
        per_channel=not args.per_tensor and bool(record.get("per_channel", True)),
        observer=args.observer or record.get("observer", OBSERVER_MINMAX),
    )


def _write_onnx(job: _ExportJob, out: Path) -> ExportedModel:
    """Export ``job`` to ``out`` and say what it weighs."""
    from coordinator.export import build_onnx
    from coordinator.model_release import input_spec

    glob = job.glob
    meta = {"run_id": glob.run_id, "round": str(glob.round), "model_name": glob.model_name}
    meta |= class_names_metadata(job.data.class_names)
    exported = build_onnx(
        job.model,
        job.state,
        job.bits,
        input_spec(job.data),
        scheme=job.scheme,
        per_channel=job.per_channel,
        metadata=meta,
        observer=job.observer,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, exported.onnx_bytes)
    print(
        f"wrote {out}: {len(exported.onnx_bytes)} bytes, opset {exported.opset}; "
        f"weights {exported.weight_bytes} bytes stored, ideal sum(n*|W|)/8 = "
        f"{exported.ideal_weight_bytes} bytes"
    )
    return exported


def _parity(job: _ExportJob, exported: ExportedModel) -> dict[str, float]:
    """:func:`validate` of the export against the torch fake-quant model on the test split."""
    from coordinator.export import fake_quant_model
    from fedmpq.models import build_model

    x_norm, y = job.data.test.tensors()
    reference = fake_quant_model(
        build_model(job.glob.model_name, job.data.num_classes, job.data.in_shape),
        job.state,
        job.bits,
        scheme=job.scheme,
        per_channel=job.per_channel,
        observer=job.observer,
    )
    return validate(exported.onnx_bytes, reference, job.data.test.x, x_norm, y.numpy())


def _report_parity(result: dict[str, float], atol: float) -> int:
    """Print the parity check; 0 if it passed, else 1."""
    gap = 100 * abs(result["onnx_accuracy"] - result["torch_accuracy"])
    print(
        f"test accuracy: onnxruntime {100 * result['onnx_accuracy']:.2f}%, torch fake-quant "
        f"{100 * result['torch_accuracy']:.2f}% (gap {gap:.2f} points); "
        f"max |logit diff| {result['max_abs_logit_diff']:.2e}"
    )
    if gap > MAX_ACCURACY_GAP or result["max_abs_logit_diff"] > atol:
        print(
            f"fedmpq export: parity check failed (allowed: {MAX_ACCURACY_GAP} points, atol {atol})",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch, onnx and the data sets are imported by the steps below, only once the command
    # line is known to be good.
    try:
        job = _load_job(args)
        exported = _write_onnx(job, args.out)
        if args.no_validate:
            return 0
        result = _parity(job, exported)
    except FedmpqError as exc:
        print(f"fedmpq export: {exc}", file=sys.stderr)
        return 2
    return _report_parity(result, args.atol)


if __name__ == "__main__":
    sys.exit(main())
