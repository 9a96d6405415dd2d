"""Fault injection on real processes: coordinator kill -9 + resume, broker restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from coordinator.checkpoint import load_checkpoint
from coordinator.metrics import read_metrics
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.topics import Topics
from fedmpq.wire.codec import decode
from fedmpq.wire.messages import ControlMessage, GlobalModelMessage

DEADLINE_S = 240


def _agent(
    url: str, run_id: str, out: Path, index: int, count: int, *extra: str, env=None
) -> subprocess.Popen:
    """Agent process hosting device ``index`` of ``count`` (its log: ``agent-INDEX.log``)."""
    cmd = [
        sys.executable, "-m", "edge_client", "--broker", url, "--clients", "1",
        "--first-index", str(index), "--num-partitions", str(count), "--run-id", run_id,
        "--exit-when-done", "--threads", "1", "--report", str(out / "agents.jsonl"), *extra,
    ]  # fmt: skip
    log = (out / f"agent-{index}.log").open("ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _agents(url: str, run_id: str, out: Path, count: int) -> list[subprocess.Popen]:
    return [_agent(url, run_id, out, i, count) for i in range(count)]


def _coordinator(url: str, run_id: str, out: Path, rounds: int, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "coordinator", "--broker", url, "--run-id", run_id,
        "--rounds", str(rounds), "--min-clients", "2", "--policy", "fixed:4",
        "--model", "mlp", "--out-dir", str(out), "--threads", "1",
        "--round-deadline", "120", *extra,
    ]  # fmt: skip
    log = (out / f"coordinator{len(extra)}.log").open("wb")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)


def _wait_for_round(url: str, run_id: str, round: int, proc: subprocess.Popen) -> None:
    """Wait until round ``round`` is complete: the coordinator announces round
    ``round + 1`` only after logging and checkpointing ``round``."""
    reached = threading.Event()

    def on_message(_conn: Connection, _topic: str, payload: bytes) -> None:
        msg = decode(payload, ControlMessage)
        if msg.run_id == run_id and msg.round > round:
            reached.set()

    with MqttLoop() as loop:
        watcher = Connection(loop, BrokerAddress.parse(url), "test-watcher", on_message=on_message)
        watcher.subscribe(Topics().control)
        watcher.connect()
        deadline = time.monotonic() + DEADLINE_S
        while not reached.wait(timeout=1.0):
            assert proc.poll() is None, f"coordinator exited early with {proc.returncode}"
            assert time.monotonic() < deadline, f"round {round} not done within {DEADLINE_S} s"
        watcher.close()


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            assert p.wait(timeout=DEADLINE_S) == 0
        finally:
            if p.poll() is None:
                p.kill()


def test_coordinator_kill_9_then_resume_continues_byte_identical(module_mosquitto, tmp_path):
    url, run_id = module_mosquitto.url, "resume-it"
    agents = _agents(url, run_id, tmp_path, 2)
    try:
        first = _coordinator(url, run_id, tmp_path, 4)
        _wait_for_round(url, run_id, 2, first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        ckpt = load_checkpoint(tmp_path)
        assert ckpt.round >= 2
        resumed = _coordinator(url, run_id, tmp_path, 4, "--resume")
        _finish([resumed, *agents])
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    log = (tmp_path / "coordinator1.log").read_text()
    resumed_fp = decode(ckpt.global_frame, GlobalModelMessage).fingerprint
    assert f"resumed after round {ckpt.round} from model {resumed_fp}" in log
    rounds = [r["round"] for r in rows]
    assert rounds[-1] == 4
    assert set(rounds) == {0, 1, 2, 3, 4}
    assert all(len(r["participants"]) == 2 for r in rows if r["round"] > ckpt.round)


def test_broker_restart_mid_training_loses_no_update(mosquitto, tmp_path):
    url, run_id = mosquitto.url, "restart-it"
    agents = _agents(url, run_id, tmp_path, 2)
    coordinator = _coordinator(url, run_id, tmp_path, 4)
    try:
        _wait_for_round(url, run_id, 1, coordinator)
        mosquitto.stop()
        mosquitto.start()
        _finish([coordinator, *agents])
    finally:
        for p in [coordinator, *agents]:
            if p.poll() is None:
                p.kill()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["participants"] == ["device-0000", "device-0001"] for r in rows[1:])
    sent = [json.loads(line) for line in (tmp_path / "agents.jsonl").read_text().splitlines()]
    assert {(s["client_id"], s["round"]) for s in sent} >= {
        (c, r) for c in ("device-0000", "device-0001") for r in range(1, 5)
    }
