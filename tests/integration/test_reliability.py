"""Fault injection on real processes: coordinator kill -9 + resume, broker restart."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def _kill_running(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            assert p.wait(timeout=DEADLINE_S) == 0
        finally:
            _kill_running([p])


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
        _kill_running(agents)
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
        _kill_running([coordinator, *agents])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["participants"] == ["device-0000", "device-0001"] for r in rows[1:])
    sent = [json.loads(line) for line in (tmp_path / "agents.jsonl").read_text().splitlines()]
    assert {(s["client_id"], s["round"]) for s in sent} >= {
        (c, r) for c in ("device-0000", "device-0001") for r in range(1, 5)
    }


def _update_acl(path: Path, update_writers: str) -> None:
    """Everyone may read everything and write every fedmpq topic but the updates, which
    only ``update_writers`` (a topic filter) may be published on."""
    writable = ["register/+", "status/+", "task/+", "model_at/+", "control", "model"]
    lines = ["topic read #", *(f"topic write fedmpq/{t}" for t in writable)]
    path.write_text("\n".join([*lines, f"topic write {update_writers}", ""]))
    path.chmod(0o644)


def _wait_for_broker_log(broker, text: str, proc: subprocess.Popen) -> None:
    """Wait until the broker has logged ``text`` (while ``proc`` runs)."""
    deadline = time.monotonic() + DEADLINE_S
    while text not in broker.log:
        assert time.monotonic() < deadline, f"the broker never logged {text!r}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # returns at once if it exited
        assert proc.poll() is None, f"exited early with {proc.returncode}"


@pytest.fixture
def acl_file() -> Iterator[Path]:
    """A path for an ACL file mosquitto can read: it drops root privileges before reading,
    and pytest's own temporary tree is private to its user."""
    shared = Path(tempfile.mkdtemp(prefix="fedmpq-acl-"))
    shared.chmod(0o755)
    yield shared / "fedmpq.acl"
    shutil.rmtree(shared)


def test_a_lost_update_is_asked_for_again_well_before_the_deadline(
    mosquitto_factory, tmp_path, acl_file
):
    """The broker refuses device-0001's first update (an ACL, as surely as a full queue
    drops one) and then lets updates through: the coordinator sends the silent device its
    task again, the device sends the same update again, and the round closes long before
    its 120 s deadline, counting every byte it sent again."""
    acl = acl_file
    _update_acl(acl, "fedmpq/update/device-0000")
    broker = mosquitto_factory(extra_config=(f"acl_file {acl}", "log_type all"))
    url, run_id = broker.url, "lost-update"
    agents = _agents(url, run_id, tmp_path, 2)
    coordinator = _coordinator(url, run_id, tmp_path, 2)
    try:
        _wait_for_broker_log(broker, "Denied PUBLISH from device-0001", coordinator)
        _update_acl(acl, "fedmpq/update/+")
        os.kill(broker.pid, signal.SIGHUP)  # mosquitto reloads its ACL file
        _wait_for_broker_log(broker, "Reloading config", coordinator)
        _finish([coordinator, *agents])
    finally:
        _kill_running([coordinator, *agents])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["participants"] == ["device-0000", "device-0001"] for r in rows[1:])
    first = rows[1]
    assert first["round_seconds"] < 60 and first["dropped"] == {}
    assert first["rejected"] == {}  # the update sent again counted once, nothing refused
    # The re-sent task is in device-0001's downlink (same-sized tasks and models).
    link = first["link_bytes"]
    assert link["device-0001"]["down"] > link["device-0000"]["down"]
    assert link["device-0001"]["up"] == link["device-0000"]["up"] > 0
    assert "sending the task again" in (tmp_path / "coordinator0.log").read_text()
    assert "re-sending update of round 1" in (tmp_path / "agent-1.log").read_text()
