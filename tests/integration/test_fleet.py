"""A 50-device mixed fleet for 2 rounds: ``fedmpq emulate --fleet`` against real mosquitto.

Checks what makes the emulation bind: devices announced offline by churn are not
selected, crashed devices do not stall the round, and every emulated time is the
device's profile applied to what it did.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.metrics import read_metrics
from edge_client.emulation import round_seconds
from fedmpq.profiles import load_fleet

FLEET = Path(__file__).resolve().parents[2] / "profiles" / "fleet-mixed.toml"
CLIENTS = 50
DEADLINE_S = 60.0
WORKERS = 2  # agent processes


@pytest.fixture(scope="module")
def fleet_run(module_mosquitto, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet")
    cmd = [
        sys.executable, "-m", "fedmpq.cli", "emulate",
        "--broker", module_mosquitto.url, "--fleet", str(FLEET),
        "--clients", str(CLIENTS), "--per-round", "0", "--rounds", "2",
        "--model", "cnn", "--partition", "iid", "--workers", str(WORKERS), "--seed", "0",
        "--round-deadline", str(DEADLINE_S), "--run-id", "it-fleet", "--out-dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    logs = "".join(p.read_text()[-2000:] for p in out.glob("*.log"))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    events = [json.loads(line) for line in (out / "agents.jsonl").read_text().splitlines()]
    return read_metrics(out / "metrics.jsonl"), events


def _of(events, kind):
    return [e for e in events if e["event"] == kind]


def test_churned_devices_are_not_selected(fleet_run):
    rows, events = fleet_run
    away = [e for e in _of(events, "availability") if not e["online"] and e["round"] <= 2]
    assert away, "the seeded fleet should take some device offline in round 2"
    for e in away:
        assert e["client_id"] not in rows[e["round"]]["client_bits"], e


def test_crashed_devices_do_not_stall_the_round(fleet_run):
    rows, events = fleet_run
    crashes = _of(events, "crash")
    assert crashes, "the seeded fleet should crash some device"
    for e in crashes:
        row = rows[e["round"]]
        assert e["client_id"] in row["dropped"]
        assert e["client_id"] not in row["participants"]
        assert row["round_seconds"] < DEADLINE_S / 2  # closed when the rest answered
    for row in rows[1:]:
        assert len(row["participants"]) + len(row["dropped"]) == row["selected"]


def test_emulated_time_follows_the_profiles(fleet_run):
    rows, events = fleet_run
    specs = load_fleet(FLEET).assign(CLIENTS, seed=0)
    updates = _of(events, "update")
    assert len(updates) == sum(len(r["participants"]) for r in rows[1:])
    for u in updates:
        spec = specs[int(u["client_id"].rsplit("-", 1)[1])]
        assert u["profile"] == spec.name
        stretch = u["host_gflops"] / spec.gflops.value
        assert u["compute_seconds"] == pytest.approx(u["host_seconds"] * stretch)
        expected = round_seconds(spec, u["compute_seconds"], u["downlink_bytes"], u["bytes"])
        assert u["emulated_seconds"] == pytest.approx(expected)
    for row in rows[1:]:
        slowest = max(u["emulated_seconds"] for u in updates if u["round"] == row["round"])
        assert row["emulated_seconds"] == pytest.approx(slowest)
    # Each agent process probes the host once; on a busy host two probes differ by a third,
    # so each device is judged against its own process's figure, never another's.
    assert len({u["host_gflops"] for u in updates}) <= WORKERS

    # Slower boards take longer for the same work: compare the two ends of the fleet, per
    # second of host CPU at the host GFLOPS each device's own process measured.
    def seconds_per_host_gflop(u: dict) -> float:
        return u["compute_seconds"] / (u["host_seconds"] * u["host_gflops"])

    zero = [seconds_per_host_gflop(u) for u in updates if u["profile"] == "rpi-zero-2w"]
    pi5 = [seconds_per_host_gflop(u) for u in updates if u["profile"] == "rpi-5"]
    assert zero and pi5
    assert min(zero) / max(pi5) == pytest.approx(31.4 / 5.1)  # the profiles' GFLOPS
