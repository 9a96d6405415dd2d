"""The model downlink on real processes over a real mosquitto: only the selected devices
receive a model, and the broker's own byte counters agree with the metrics rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.link_bytes import BROKER_CONFIG, BrokerCounters
from coordinator.metrics import read_metrics
from fedmpq.broker import MosquittoBroker, find_mosquitto

DEADLINE_S = 600
ROUNDS = 3


def _agent(url: str, index: int, report: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "edge_client", "--broker", url,
        "--clients", "1", "--first-index", str(index), "--num-partitions", "3",
        "--partition", "iid", "--run-id", "it-downlink", "--exit-when-done",
        "--report", str(report), "--threads", "1",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 registered devices, 1 selected per round, cnn at fixed 4 bits, ROUNDS rounds;
    the broker's counters are read from before the agents start to after the run."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    out = tmp_path_factory.mktemp("downlink")
    report = out / "agents.jsonl"
    broker = MosquittoBroker(extra_config=BROKER_CONFIG)
    with broker, BrokerCounters(broker.address) as counters:
        agents = [_agent(broker.url, i, report, out / f"agent-{i}.log") for i in range(3)]
        try:
            cmd = [
                sys.executable, "-m", "coordinator", "--broker", broker.url,
                "--run-id", "it-downlink", "--rounds", str(ROUNDS), "--min-clients", "3",
                "--clients-per-round", "1", "--policy", "fixed:4", "--model", "cnn",
                "--out-dir", str(out), "--threads", "1", "--round-deadline", "240",
                "--no-publish-onnx",
            ]  # fmt: skip
            coordinator = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
                check=False,
            )
            assert coordinator.returncode == 0, coordinator.stderr[-4000:]
            for agent in agents:
                assert agent.wait(timeout=60) == 0
        finally:
            for agent in agents:
                if agent.poll() is None:
                    agent.kill()
        end = counters.wait_samples(2)
        first_round = counters.at(counters.opened[1])
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    return read_metrics(out / "metrics.jsonl")[1:], reports, first_round, end


def test_only_the_selected_device_receives_a_model(run):
    rows, reports, _, _ = run
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    # Every model a device received was one its task waited for (decoded, with its round).
    assert all(e["round"] is not None for e in reports if e["event"] == "model")
    for row in rows:
        (selected,) = row["client_bits"]
        models = [e for e in reports if e["event"] == "model" and e["round"] == row["round"]]
        assert [e["client_id"] for e in models] == [selected]
        # What it received is what the row counts for it (with its task).
        assert 0 < models[0]["bytes"] < row["link_bytes"][selected]["down"]
        assert set(row["link_bytes"]) == {selected}


def test_the_broker_counts_what_the_metrics_rows_say(run):
    rows, _, first_round, end = run
    ours = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows)
    broker_sent = end[0] - first_round[0]
    assert abs(broker_sent - ours) <= 0.05 * ours, (broker_sent, ours)
