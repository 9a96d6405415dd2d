"""Issue 15's attacks, published from outside on a real mosquitto against a real coordinator
and two real agents: each run must complete with no device dropped or frozen and end in
the model of the clean run (same keys setting), byte for byte."""

from __future__ import annotations

import contextlib
import hashlib
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zstandard

from coordinator.checkpoint import load_checkpoint
from coordinator.metrics import read_metrics
from edge_client.model_store import ModelStore
from fedmpq.errors import DecodeError
from fedmpq.keys_cli import main as keys_main
from fedmpq.models import build_model
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.state import fingerprint, model_layout, state_to_numpy
from fedmpq.topics import Topics
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import (
    ControlMessage,
    DeviceProfile,
    GlobalModelMessage,
    ModelMessage,
    RegisterMessage,
    ResourceUsage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.signing import load_key_file
from fedmpq.wire.tensors import decode_state, encode_state

DEADLINE_S = 300
ROUNDS = 2
DEVICES = ("device-0000", "device-0001")
TOPICS = Topics()
PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64")


@dataclass
class Run:
    """A finished run: its final model's fingerprint, metrics rows and directory."""

    fingerprint: str
    rows: list[dict[str, Any]]
    out: Path
    seconds: float


@dataclass
class Attack:
    """What an attack gets: the broker, the run, a connection of its own, the keys."""

    url: str
    run_id: str
    out: Path
    conn: Connection
    keys: Path | None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.conn.publish(topic, payload, 1, retain)


@contextmanager
def _attacker(url: str, name: str) -> Iterator[Connection]:
    with MqttLoop() as loop:
        conn = Connection(loop, BrokerAddress.parse(url), name, on_message=lambda *_: None)
        conn.connect()
        assert conn.wait_connected(30.0)
        try:
            yield conn
        finally:
            conn.flush(30.0)
            conn.close()


def _first_global(url: str, run_id: str, round: int) -> Callable[[], GlobalModelMessage]:
    """Start watching for round ``round``'s global model (at any allocation); the returned
    call waits for it."""
    seen: list[GlobalModelMessage] = []
    got = threading.Event()
    # The link names the layout by digest: decode against the run's model, as a device does.
    layout = model_layout(build_model("mlp", 10, (1, 28, 28)))

    def on_message(_c: Connection, _t: str, payload: bytes) -> None:
        try:
            msg = decode(payload, GlobalModelMessage, layout=layout)
        except Exception:
            return
        if msg.run_id == run_id and msg.round == round and not got.is_set():
            seen.append(msg)
            got.set()

    loop = MqttLoop()
    loop.start()
    watcher = Connection(loop, BrokerAddress.parse(url), f"watch-{run_id}", on_message=on_message)
    watcher.subscribe(f"{TOPICS.prefix}/model_at/+")  # the models of every allocation
    watcher.connect()

    def wait() -> GlobalModelMessage:
        try:
            assert got.wait(DEADLINE_S), f"no global model of round {round}"
            return seen[0]
        finally:
            watcher.close()
            loop.stop()

    return wait


def run_fleet(
    url: str,
    out: Path,
    run_id: str,
    *,
    signed: bool,
    before: Callable[[Attack], None] | None = None,
    during: Callable[[Attack, GlobalModelMessage], None] | None = None,
) -> Run:
    """A 2-device, 2-round mlp run; ``before`` runs before the agents start, ``during`` once
    round 1's global model is out."""
    out.mkdir(parents=True, exist_ok=True)
    keys = out / "keys.toml" if signed else None
    if keys is not None:
        assert keys_main(["--out", str(keys), *DEVICES]) == 0
    started = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    with _attacker(url, f"attacker-{run_id}") as conn:
        attack = Attack(url, run_id, out, conn, keys)
        if before is not None:
            before(attack)
        round_one = _first_global(url, run_id, 1)
        try:
            for i in range(len(DEVICES)):
                cmd = [
                    sys.executable, "-m", "edge_client", "--broker", url, "--clients", "1",
                    "--first-index", str(i), "--num-partitions", str(len(DEVICES)),
                    "--run-id", run_id, "--exit-when-done", "--threads", "1",
                    "--model-dir", str(out / f"model-{i}"),
                ]  # fmt: skip
                cmd += ["--keys", str(keys)] if keys is not None else []
                log = (out / f"agent-{i}.log").open("wb")
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            cmd = [
                sys.executable, "-m", "coordinator", "--broker", url, "--run-id", run_id,
                "--rounds", str(ROUNDS), "--min-clients", str(len(DEVICES)), "--policy",
                "fixed:4", "--model", "mlp", "--out-dir", str(out), "--threads", "1",
                "--round-deadline", "120", "--log-level", "INFO",
            ]  # fmt: skip
            cmd += ["--device-keys", str(keys)] if keys is not None else []
            log = (out / "coordinator.log").open("wb")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
            glob = round_one()
            if during is not None:
                during(attack, glob)
            for p in procs:
                assert p.wait(timeout=DEADLINE_S) == 0, (out / "coordinator.log").read_text()[
                    -3000:
                ]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    seconds = time.perf_counter() - started
    final = decode(load_checkpoint(out).global_frame, GlobalModelMessage)
    rows = read_metrics(out / "metrics.jsonl")
    return Run(final.fingerprint, rows, out, seconds)


_CLEAN: dict[bool, Run] = {}


def clean_run(url: str, tmp_factory: pytest.TempPathFactory, signed: bool) -> Run:
    if signed not in _CLEAN:
        out = tmp_factory.mktemp(f"clean-{'signed' if signed else 'unsigned'}")
        _CLEAN[signed] = run_fleet(url, out, f"clean-{signed}", signed=signed)
    return _CLEAN[signed]


def rejected(run: Run, reason: str) -> int:
    """Messages rejected for ``reason`` over the whole run (rows count per round)."""
    return sum(r.get("rejected", {}).get(reason, 0) for r in run.rows)


def assert_like_clean(run: Run, clean: Run) -> None:
    """Every round counted with both devices, and the model of the clean run."""
    assert [r["round"] for r in run.rows] == list(range(ROUNDS + 1))
    for row in run.rows[1:]:
        assert row["participants"] == list(DEVICES), row
        assert row["counted"] and row["dropped"] == {} and row["selected"] == len(DEVICES), row
    assert run.fingerprint == clean.fingerprint
    assert [r["accuracy"] for r in run.rows] == [r["accuracy"] for r in clean.rows]


def _update(glob: GlobalModelMessage, client_id: str, samples: int, scale: float) -> bytes:
    state = {k: v * np.float32(scale) for k, v in decode_state(glob.tensors).items()}
    tensors = encode_state(state, {name: 4 for name in state})  # as a 4-bit device would
    msg = UpdateMessage(
        glob.run_id, glob.round, client_id, samples, glob.fingerprint, "weights", tensors,
        ResourceUsage(0.0, 0, 0.0), {},
    )  # fmt: skip
    return encode(msg)


# --------------------------------------------------------------------------- finding 1


def test_fake_control_finished_stops_no_agent(module_mosquitto, tmp_path, tmp_path_factory):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=True)

    def before(a: Attack) -> None:
        # Retained: a genuine, signed "finished" of an older run (replayed), then ...
        assert a.keys is not None
        signer = load_key_file(a.keys).signer(a.keys)
        old = ControlMessage("an-older-run", "finished", 9, "", time.time())
        a.publish(TOPICS.control, encode(old, key=signer), retain=True)

    def during(a: Attack, _glob: GlobalModelMessage) -> None:
        # ... a forged "finished" of this very run, retained too.
        forged = ControlMessage(a.run_id, "finished", 1, "", time.time())
        a.publish(TOPICS.control, encode(forged), retain=True)

    run = run_fleet(url, tmp_path, "fake-finished", signed=True, before=before, during=during)
    assert_like_clean(run, clean)
    logs = "".join((tmp_path / f"agent-{i}.log").read_text() for i in range(2))
    assert "not signed by the coordinator" in logs


def test_fake_task_with_a_million_epochs_is_refused(module_mosquitto, tmp_path, tmp_path_factory):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=True)

    def during(a: Attack, glob: GlobalModelMessage) -> None:
        for round in (1, 2):
            task = TaskMessage(
                a.run_id, round, "device-0000", "mlp", glob.fingerprint, "fixed", {},
                "symmetric", True, 10**6, 1, 0.05, 60.0, False,
            )  # fmt: skip
            a.publish(TOPICS.task("device-0000"), encode(task))

    run = run_fleet(url, tmp_path, "fake-task", signed=True, during=during)
    assert_like_clean(run, clean)


def test_fake_global_model_is_refused(module_mosquitto, tmp_path, tmp_path_factory):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=True)

    def during(a: Attack, glob: GlobalModelMessage) -> None:
        state = {k: v * np.float32(-50) for k, v in decode_state(glob.tensors).items()}
        fake = GlobalModelMessage(
            a.run_id, 1, "mlp", glob.fingerprint, encode_state(state, {k: 32 for k in state})
        )
        fake.allocation = glob.allocation
        a.publish(TOPICS.model_at(glob.allocation), encode(fake), retain=True)

    run = run_fleet(url, tmp_path, "fake-global", signed=True, during=during)
    assert_like_clean(run, clean)


def test_tampered_onnx_model_is_never_stored(module_mosquitto, tmp_path, tmp_path_factory):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=True)
    tampered = b"not the model the coordinator trained"

    def during(a: Attack, _glob: GlobalModelMessage) -> None:
        fake = ModelMessage(
            a.run_id, ROUNDS, "mlp", hashlib.sha256(tampered).hexdigest(), tampered,
            [1, 28, 28], 10, [0.0], [1.0], 1.0, {},
        )  # fmt: skip
        a.publish(TOPICS.model, encode(fake), retain=True)

    run = run_fleet(url, tmp_path, "fake-model", signed=True, during=during)
    assert_like_clean(run, clean)
    released = (tmp_path / "model.onnx").read_bytes()
    for i in range(2):
        stored = ModelStore(tmp_path / f"model-{i}").current()
        assert stored.path.read_bytes() == released


# --------------------------------------------------------------------------- findings 2 and 4


@pytest.mark.parametrize("attack", ["samples", "scales"])
def test_forged_poisoned_update_is_rejected(module_mosquitto, tmp_path, tmp_path_factory, attack):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=True)
    samples, scale = (10**12, 1.0) if attack == "samples" else (100, 1e30)

    def during(a: Attack, glob: GlobalModelMessage) -> None:
        a.publish(TOPICS.update("device-0000"), _update(glob, "device-0000", samples, scale))

    run = run_fleet(url, tmp_path, f"poison-{attack}", signed=True, during=during)
    assert_like_clean(run, clean)
    assert rejected(run, "bad_signature") >= 1


def test_forged_update_first_without_keys_does_not_take_the_devices_place(
    module_mosquitto, tmp_path, tmp_path_factory
):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=False)

    def during(a: Attack, glob: GlobalModelMessage) -> None:
        for cid in DEVICES:  # before either device can have trained
            a.publish(TOPICS.update(cid), _update(glob, cid, 600, 1.0))

    run = run_fleet(url, tmp_path, "forged-first", signed=False, during=during)
    assert_like_clean(run, clean)
    assert rejected(run, "token") == 2
    assert rejected(run, "duplicate") == 0


# --------------------------------------------------------------------------- finding 5


def test_register_flood_selects_no_fake(module_mosquitto, tmp_path, tmp_path_factory):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=False)

    def during(a: Attack, _glob: GlobalModelMessage) -> None:
        for i in range(5000):
            reg = RegisterMessage(f"fake-{i:04d}", "x", PROFILE, 10**12, True, 0.0)
            a.publish(TOPICS.register(reg.client_id), encode(reg))

    run = run_fleet(url, tmp_path, "flood", signed=False, during=during)
    assert_like_clean(run, clean)
    unproven = rejected(run, "unproven")
    assert unproven <= 5000
    log_lines = (tmp_path / "coordinator.log").read_text().count("rejected unproven")
    assert log_lines <= math.ceil(run.seconds) + 1  # once per reason per second at most
    print(f"flood run {run.seconds:.1f} s, clean run {clean.seconds:.1f} s, unproven {unproven}")


def test_zstd_bombs_are_refused_cheaply(module_mosquitto, tmp_path, tmp_path_factory):
    url = module_mosquitto.url
    clean = clean_run(url, tmp_path_factory, signed=False)
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (250 * 2**20))
    frame = {"v": 2, "type": "update", "codec": "zstd", "body": bomb, "sig": b""}
    payload = msgpack.packb(frame, use_bin_type=True)
    assert len(payload) < 100_000

    def during(a: Attack, _glob: GlobalModelMessage) -> None:
        for _ in range(100):
            a.publish(TOPICS.update("device-0000"), payload)

    run = run_fleet(url, tmp_path, "bombs", signed=False, during=during)
    assert_like_clean(run, clean)
    assert rejected(run, "malformed") == 100
    print(f"bomb run {run.seconds:.1f} s, clean run {clean.seconds:.1f} s")


# --------------------------------------------------------------------------- device limits


def test_sigterm_stops_a_long_task_within_seconds(module_mosquitto, tmp_path):
    """An agent whose limits admit a 10^6-epoch task still stops on SIGTERM, mid-task."""
    url, run_id = module_mosquitto.url, "sigterm"
    registered = threading.Event()
    with MqttLoop() as loop:
        conn = Connection(
            loop, BrokerAddress.parse(url), "test-sigterm",
            on_message=lambda *_: registered.set(),
        )  # fmt: skip
        conn.subscribe(TOPICS.register("device-0000"))
        conn.connect()
        assert conn.wait_connected(30.0)
        cmd = [
            sys.executable, "-m", "edge_client", "--broker", url, "--run-id", run_id,
            "--threads", "1", "--max-epochs", str(10**6), "--model-dir", "",
        ]  # fmt: skip
        agent = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert registered.wait(DEADLINE_S)
            state = state_to_numpy(build_model("mlp", 10, (1, 28, 28)))
            fp = fingerprint(state)
            glob = GlobalModelMessage(
                run_id, 1, "mlp", fp, encode_state(state, {k: 32 for k in state})
            )
            task = TaskMessage(
                run_id, 1, "device-0000", "mlp", fp, "fixed", {}, "symmetric", True, 10**6, 32,
                0.05, 60.0, False,
            )  # fmt: skip
            # Retained: the agent subscribes to the model's topic once it holds the task.
            conn.publish(TOPICS.model_at(""), encode(glob), 1, True)
            conn.publish(TOPICS.task("device-0000"), encode(task), 1, False)
            conn.flush(30.0)
            # Training shows as CPU time: wait until the agent has trained for a while.
            baseline = sum(agent.cpu_times()[:2])
            deadline = time.monotonic() + DEADLINE_S
            while sum(agent.cpu_times()[:2]) < baseline + 3.0:
                assert time.monotonic() < deadline and agent.poll() is None
                with contextlib.suppress(psutil.TimeoutExpired):
                    agent.wait(timeout=0.2)  # returns at once if the agent died
            agent.terminate()
            started = time.monotonic()
            assert agent.wait(timeout=30) == 0
            print(f"stopped {time.monotonic() - started:.2f} s after SIGTERM")
        finally:
            if agent.poll() is None:
                agent.kill()
            conn.publish(TOPICS.model_at(""), b"", 1, True)  # no model left for other tests
            conn.flush(30.0)
            conn.close()


def test_a_task_for_a_model_the_device_cannot_build_gets_an_error_status(module_mosquitto):
    """Models travel named by their layout's digest, which the device computes from the
    model it builds: a task naming a model it cannot build is answered at once with an
    ``error`` status (the coordinator stops waiting), not left waiting for its deadline."""
    url, run_id = module_mosquitto.url, "unbuildable"
    registered, errored = threading.Event(), threading.Event()
    statuses: list[StatusMessage] = []

    def on_message(_conn: Connection, topic: str, payload: bytes) -> None:
        if topic == TOPICS.register("device-0000"):
            registered.set()
        else:
            try:
                status = decode(payload, StatusMessage)
            except DecodeError:
                return  # not a status frame (e.g. a cleared retained one)
            statuses.append(status)
            if status.state == "error":
                errored.set()

    with MqttLoop() as loop:
        conn = Connection(loop, BrokerAddress.parse(url), "test-unbuildable", on_message=on_message)
        conn.subscribe(TOPICS.register("device-0000"))
        conn.subscribe(TOPICS.status("device-0000"))
        conn.connect()
        assert conn.wait_connected(30.0)
        cmd = [
            sys.executable, "-m", "edge_client", "--broker", url, "--run-id", run_id,
            "--threads", "1", "--model-dir", "",
        ]  # fmt: skip
        agent = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert registered.wait(DEADLINE_S)
            task = TaskMessage(
                run_id, 1, "device-0000", "no-such-model", "0" * 16, "fixed", {}, "symmetric",
                True, 1, 32, 0.05, 60.0, False,
            )  # fmt: skip
            conn.publish(TOPICS.task("device-0000"), encode(task), 1, False)
            assert errored.wait(DEADLINE_S), [s.state for s in statuses]
            error = next(s for s in statuses if s.state == "error")
            assert error.round == 1 and "no-such-model" in error.detail
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            conn.close()
