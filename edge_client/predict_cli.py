"""``fedmpq agent predict INPUT``: classify an input with the model the agent received.

Runs onnxruntime only; torch is never imported on this path, so it works (and stays
small in memory) on devices that only do inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_client.inference import Predictor, load_input, pixel_range_warning
from edge_client.model_store import ModelStore, default_model_dir
from fedmpq.cli_common import make_parser
from fedmpq.errors import FedmpqError


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("fedmpq agent predict", __doc__)
    p.add_argument("input", type=Path, help="a .npy array of raw pixels, or a PNG/JPEG image")
    p.add_argument(
        "--model-dir",
        type=Path,
        help=f"the agent's model directory (default {default_model_dir()})",
    )
    p.add_argument("--model", type=Path, help="an ONNX file to use instead of the stored model")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print classes and probabilities as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = args.model or ModelStore(args.model_dir or default_model_dir()).current().path
        predictor = Predictor(path, threads=args.threads)
        x = load_input(args.input, predictor.input_shape)
        prediction = predictor.predict(x)
    except FedmpqError as exc:
        print(f"fedmpq agent predict: {exc}", file=sys.stderr)
        return 2
    warning = pixel_range_warning(x)
    if warning:
        print(f"fedmpq agent predict: warning: {warning}", file=sys.stderr)
    labels = [predictor.label(int(c)) for c in prediction.classes]
    if args.json:
        row = {
            "classes": prediction.classes.tolist(),
            "labels": labels,
            "probabilities": [
                [round(float(v), 6) for v in row] for row in prediction.probabilities
            ],
        }
        print(json.dumps(row))
    else:
        print("\n".join(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
