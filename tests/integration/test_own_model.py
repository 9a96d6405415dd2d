"""A model the package does not ship (examples/tiny_model.py), named ``module:...``: a real
coordinator and two agent processes train it for two rounds over real mosquitto, the
coordinator publishes it as ONNX, and ``fedmpq export`` re-exports and checks it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from coordinator.metrics import read_metrics
from edge_client.inference import Predictor
from edge_client.model_store import ModelStore
from fedmpq.data.datasets import load_dataset

MODEL = "module:examples.tiny_model:build"
TIMEOUT_S = 400


def _agent(url: str, index: int, tmp: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "fedmpq.cli", "agent", "--broker", url,
        "--clients", "1", "--first-index", str(index), "--num-partitions", "2",
        "--run-id", "own-model", "--exit-when-done", "--threads", "1",
        "--model-dir", str(tmp / f"model-{index}"),
    ]  # fmt: skip
    log = (tmp / f"agent-{index}.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def test_own_model_trains_two_rounds_and_exports(module_mosquitto, tmp_path):
    out = tmp_path / "run"
    agents = [_agent(module_mosquitto.url, i, tmp_path) for i in range(2)]
    try:
        coordinator = subprocess.run(
            [sys.executable, "-m", "fedmpq.cli", "coordinator", "--broker", module_mosquitto.url,
             "--run-id", "own-model", "--rounds", "2", "--min-clients", "2", "--policy",
             "fixed:4", "--model", MODEL, "--out-dir", str(out), "--threads", "1",
             "--round-deadline", "240"],
            capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        assert coordinator.returncode == 0, coordinator.stderr[-3000:]
        for i, agent in enumerate(agents):
            assert agent.wait(timeout=60) == 0, (tmp_path / f"agent-{i}.log").read_text()[-3000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["participants"]) == 2 for r in rows[1:])
    published = (out / "model.onnx").read_bytes()
    for i in range(2):
        assert ModelStore(tmp_path / f"model-{i}").current().path.read_bytes() == published
    exported = tmp_path / "tiny.onnx"
    export = subprocess.run(
        [sys.executable, "-m", "fedmpq.cli", "export", str(out), "--out", str(exported)],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr
    assert "parity" not in export.stderr
    test = load_dataset("fashion-mnist-small").test
    classes = Predictor(exported).predict(test.x[:500]).classes
    # Two rounds of a 1.4k-weight model: well above chance (10%), not yet good.
    assert (classes == test.y[:500]).mean() > 0.2
    assert np.array_equal(classes, Predictor(out / "model.onnx").predict(test.x[:500]).classes)
