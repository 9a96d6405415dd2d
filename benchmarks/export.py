"""ONNX export: file size against float32 and the ideal ``sum(n_l * |W_l|) / 8``,
onnxruntime accuracy against the torch fake-quant model, and the agent's memory for
inference (onnxruntime only) against training (torch).

Run from the repository root::

    python -m benchmarks.export                 # trains the cnn centrally first (~1 min)
    python -m benchmarks.export --run-dir runs/X  # a federated run's global model instead

Prints a table and writes ``benchmarks/results/export.json``.  Peak RSS is measured in
fresh subprocesses as ``VmHWM`` of /proc/self/status (``ru_maxrss`` would include the
parent's peak, which Linux carries over to a child); memory depends on the machine and
on what else runs on it (a shared 2-core machine when these numbers were taken).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coordinator.export import build_onnx, fake_quant_model
from coordinator.export_cli import validate
from coordinator.model_release import input_spec
from fedmpq.data.datasets import load_dataset
from fedmpq.models import build_model, quantizable_layers
from fedmpq.state import state_to_numpy
from fedmpq.wire.codec import decode
from fedmpq.wire.messages import GlobalModelMessage
from fedmpq.wire.tensors import decode_state

RESULTS = Path(__file__).parent / "results" / "export.json"
MODEL = "cnn"

_INFERENCE_RSS = """
import sys, numpy as np
from edge_client.inference import Predictor
p = Predictor(sys.argv[1])
x = np.load(sys.argv[2], allow_pickle=False)
for i in range(0, len(x), 100):
    p.predict(x[i:i + 100])
assert 'torch' not in sys.modules
print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024)
"""

_TRAINING_RSS = """
import sys, torch
from edge_client.training import train_local
from fedmpq.data.datasets import load_dataset, subset
from fedmpq.models import build_model, quantizable_layers
torch.set_num_threads(1)
d = load_dataset("fashion-mnist-small")
x, y = subset(d.train, range(1200)).tensors()
m = build_model("cnn", d.num_classes, d.in_shape)
bits = dict.fromkeys(quantizable_layers(m), 4)
train_local(m, x, y, bits, scheme="symmetric", per_channel=True, epochs=1, batch_size=32,
            learning_rate=0.05)
print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024)
"""


def _train_centrally(data: Any, epochs: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = build_model(MODEL, data.num_classes, data.in_shape)
    x, y = data.train.tensors()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return state_to_numpy(model)


def _peak_rss(code: str, *args: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, help="use this run's global_model.msgpack")
    p.add_argument("--epochs", type=int, default=2, help="central training epochs")
    args = p.parse_args(argv)
    data = load_dataset("fashion-mnist-small")
    if args.run_dir:
        glob = decode((args.run_dir / "global_model.msgpack").read_bytes(), GlobalModelMessage)
        state, source = decode_state(glob.tensors), f"run {glob.run_id} round {glob.round}"
    else:
        state, source = _train_centrally(data, args.epochs), f"central, {args.epochs} epochs"
    layers = quantizable_layers(build_model(MODEL, data.num_classes, data.in_shape))
    allocations = {
        "float32": dict.fromkeys(layers, 32),
        "8-bit": dict.fromkeys(layers, 8),
        "4-bit": dict.fromkeys(layers, 4),
        "2-bit": dict.fromkeys(layers, 2),
        "3-bit": dict.fromkeys(layers, 3),
        "mixed 8/4/2/8": dict(zip(layers, [8, 4, 2, 8], strict=True)),
    }
    x_norm, y = data.test.tensors()
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="fedmpq-export-bench-"))
    for label, bits in allocations.items():
        model = build_model(MODEL, data.num_classes, data.in_shape)
        exported = build_onnx(model, state, bits, input_spec(data))
        reference = fake_quant_model(
            build_model(MODEL, data.num_classes, data.in_shape), state, bits
        )
        result = validate(exported.onnx_bytes, reference, data.test.x, x_norm, y.numpy())
        (tmp / f"{label.split()[0]}.onnx").write_bytes(exported.onnx_bytes)
        rows.append(
            {
                "allocation": label,
                "bits": bits,
                "opset": exported.opset,
                "file_bytes": len(exported.onnx_bytes),
                "weight_bytes": exported.weight_bytes,
                "ideal_weight_bytes": exported.ideal_weight_bytes,
                **result,
            }
        )
    np.save(tmp / "x.npy", data.test.x)
    memory = {
        "inference_peak_rss_bytes": _peak_rss(
            _INFERENCE_RSS, str(tmp / "4-bit.onnx"), str(tmp / "x.npy")
        ),
        "training_peak_rss_bytes": _peak_rss(_TRAINING_RSS),
    }
    shutil.rmtree(tmp)
    float_size = rows[0]["file_bytes"]
    table = Table(title=f"{MODEL} on fashion-mnist-small ({source}); test set {len(y)} images")
    for col in ("allocation", "opset", "file KB", "x smaller", "weights KB", "ideal KB",
                "onnxruntime acc", "torch acc", "max |dlogit|"):  # fmt: skip
        table.add_column(col, justify="left" if col == "allocation" else "right")
    for r in rows:
        table.add_row(
            r["allocation"],
            str(r["opset"]),
            f"{r['file_bytes'] / 1024:.1f}",
            f"{float_size / r['file_bytes']:.2f}",
            f"{r['weight_bytes'] / 1024:.1f}",
            f"{r['ideal_weight_bytes'] / 1024:.1f}",
            f"{100 * r['onnx_accuracy']:.2f}%",
            f"{100 * r['torch_accuracy']:.2f}%",
            f"{r['max_abs_logit_diff']:.1e}",
        )
    console = Console(width=150)
    console.print(table)
    console.print(
        f"agent peak RSS: inference (onnxruntime, 4-bit) "
        f"{memory['inference_peak_rss_bytes'] / 2**20:.0f} MiB, "
        f"training (torch QAT, 1 epoch) {memory['training_peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"source": source, "rows": rows, "memory": memory}, indent=1))
    console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
