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
from pathlib import Path
from typing import Any

import numpy as np

from fedmpq.cli_common import make_parser
from fedmpq.errors import FedmpqError
from fedmpq.fileio import write_atomic
from fedmpq.model_metadata import class_names_metadata
from fedmpq.quant_spec import OBSERVER_MINMAX, SCHEME_SYMMETRIC
from fedmpq.wire.codec import decode
from fedmpq.wire.messages import GlobalModelMessage
from fedmpq.wire.tensors import decode_state

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch, onnx and the data sets only once the command line is known to be good.
    from coordinator.export import ExportError, build_onnx, fake_quant_model
    from coordinator.model_release import input_spec, read_final_bits
    from fedmpq.data.datasets import load_dataset
    from fedmpq.models import build_model, quantizable_layers

    try:
        try:
            glob = decode((args.run_dir / "global_model.msgpack").read_bytes(), GlobalModelMessage)
        except OSError as exc:
            raise ExportError(f"cannot read the run's global model: {exc}") from exc
        record = read_final_bits(args.run_dir)
        data = load_dataset(args.dataset or record.get("dataset", "fashion-mnist-small"))
        state = decode_state(glob.tensors)
        model = build_model(glob.model_name, data.num_classes, data.in_shape)
        bits = _bits(args, record, quantizable_layers(model))
        scheme = args.scheme or record.get("scheme", SCHEME_SYMMETRIC)
        per_channel = not args.per_tensor and bool(record.get("per_channel", True))
        observer = args.observer or record.get("observer", OBSERVER_MINMAX)
        spec = input_spec(data)
        meta = {"run_id": glob.run_id, "round": str(glob.round), "model_name": glob.model_name}
        meta |= class_names_metadata(data.class_names)
        exported = build_onnx(
            model,
            state,
            bits,
            spec,
            scheme=scheme,
            per_channel=per_channel,
            metadata=meta,
            observer=observer,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, exported.onnx_bytes)
        print(
            f"wrote {args.out}: {len(exported.onnx_bytes)} bytes, opset {exported.opset}; "
            f"weights {exported.weight_bytes} bytes stored, ideal sum(n*|W|)/8 = "
            f"{exported.ideal_weight_bytes} bytes"
        )
        if args.no_validate:
            return 0
        x_norm, y = data.test.tensors()
        reference = fake_quant_model(
            build_model(glob.model_name, data.num_classes, data.in_shape),
            state,
            bits,
            scheme=scheme,
            per_channel=per_channel,
            observer=observer,
        )
        result = validate(exported.onnx_bytes, reference, data.test.x, x_norm, y.numpy())
    except FedmpqError as exc:
        print(f"fedmpq export: {exc}", file=sys.stderr)
        return 2
    gap = 100 * abs(result["onnx_accuracy"] - result["torch_accuracy"])
    print(
        f"test accuracy: onnxruntime {100 * result['onnx_accuracy']:.2f}%, torch fake-quant "
        f"{100 * result['torch_accuracy']:.2f}% (gap {gap:.2f} points); "
        f"max |logit diff| {result['max_abs_logit_diff']:.2e}"
    )
    if gap > MAX_ACCURACY_GAP or result["max_abs_logit_diff"] > args.atol:
        print(
            f"fedmpq export: parity check failed (allowed: {MAX_ACCURACY_GAP} points, "
            f"atol {args.atol})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
