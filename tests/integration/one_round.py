"""One agent process and one coordinator process run a one-round fixed:4 run, as an
operator would start them: what the deployment tests (passwords, TLS) share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from coordinator.metrics import read_metrics
from edge_client.model_store import ModelStore, StoredModel

TIMEOUT_S = 240


def run_one_round(
    tmp_path: Path,
    run_id: str,
    model: str,
    agent_broker: list[str],
    coordinator_url: str,
) -> tuple[subprocess.CompletedProcess[str], StoredModel]:
    """Run device ``dev1`` (``agent_broker``: its ``--broker`` flag and any TLS flags)
    against a coordinator at ``coordinator_url``; check that both exit cleanly, that
    ``dev1`` took part and that it stored the run's ONNX model.

    Returns the coordinator's finished process and the model the agent stored."""
    out, model_dir = tmp_path / "run", tmp_path / "agent-model"
    agent = subprocess.Popen(
        [sys.executable, "-m", "fedmpq.cli", "agent", *agent_broker, "--client-id", "dev1",
         "--run-id", run_id, "--exit-when-done", "--threads", "1",
         "--model-dir", str(model_dir)],
        stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        coordinator = subprocess.run(
            [sys.executable, "-m", "fedmpq.cli", "coordinator", "--broker", coordinator_url,
             "--run-id", run_id, "--rounds", "1", "--min-clients", "1", "--policy", "fixed:4",
             "--model", model, "--out-dir", str(out), "--threads", "1",
             "--round-deadline", "120"],
            capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        assert coordinator.returncode == 0, coordinator.stderr[-3000:]
        assert agent.wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert read_metrics(out / "metrics.jsonl")[-1]["participants"] == ["dev1"]
    stored = ModelStore(model_dir).current()  # re-verifies the fingerprint
    assert stored.path.read_bytes() == (out / "model.onnx").read_bytes()
    return coordinator, stored
