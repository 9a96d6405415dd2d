"""End-to-end rounds: a real coordinator and real agent processes over real mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.metrics import read_metrics

ROUND_TIMEOUT_S = 300


def _agent(url: str, index: int, run_id: str, report: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "edge_client", "--broker", url,
        "--clients", "1", "--first-index", str(index), "--num-partitions", "3",
        "--partition", "iid", "--run-id", run_id, "--exit-when-done",
        "--report", str(report), "--threads", "1",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _run(
    url: str, tmp: Path, run_id: str, policy: str, rounds: int
) -> tuple[list[dict], list[dict]]:
    """Run a coordinator and 3 agents to the end; return (metrics rows, agent report rows)."""
    out = tmp / run_id
    out.mkdir()
    report = out / "agents.jsonl"
    agents = [_agent(url, i, run_id, report, out / f"agent-{i}.log") for i in range(3)]
    try:
        coordinator = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator",
                "--broker",
                url,
                "--run-id",
                run_id,
                "--rounds",
                str(rounds),
                "--min-clients",
                "3",
                "--policy",
                policy,
                "--out-dir",
                str(out),
                "--threads",
                "1",
                "--round-deadline",
                "240",
            ],
            capture_output=True,
            text=True,
            timeout=ROUND_TIMEOUT_S * rounds,
            check=False,
        )
        assert coordinator.returncode == 0, coordinator.stderr[-4000:]
        for agent in agents:
            assert agent.wait(timeout=60) == 0
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    return read_metrics(out / "metrics.jsonl"), reports


@pytest.fixture(scope="module")
def runs(module_mosquitto, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    return {
        "fixed4": _run(module_mosquitto.url, tmp, "it-fixed4", "fixed:4", rounds=3),
        "float32": _run(module_mosquitto.url, tmp, "it-float32", "float32", rounds=1),
    }


def test_three_rounds_improve_accuracy(runs):
    rows, _ = runs["fixed4"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(len(r["participants"]) == 3 for r in rows[1:])
    assert rows[3]["accuracy"] > rows[0]["accuracy"] + 0.2


def test_uplink_counted_equals_bytes_sent(runs):
    rows, reports = runs["fixed4"]
    updates = [r for r in reports if r["event"] == "update"]
    sent = sum(r["bytes"] for r in updates)
    assert len(updates) == 9
    assert rows[-1]["cumulative_uplink_bytes"] == sent


def test_fixed4_uplink_at_least_7x_below_float32(runs):
    rows4, _ = runs["fixed4"]
    rows32, _ = runs["float32"]
    per_round_4 = rows4[1]["uplink_bytes"]
    per_round_32 = rows32[1]["uplink_bytes"]
    assert per_round_32 / per_round_4 >= 7.0


def test_per_client_bits_logged(runs):
    rows, _ = runs["fixed4"]
    assert set(rows[1]["client_bits"].values()) == {4.0}
