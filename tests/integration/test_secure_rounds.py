"""Secure aggregation end to end: real mosquitto, a real coordinator and five real agent
processes, every frame signed.  Round 2 loses a device right after its masked input went
out (its input still counts; its self mask is rebuilt from shares), round 3 one right after
it shared its keys, before it could mask (left out; its pairwise masks are rebuilt).  Each
round's model is checked against the plain mean of exactly the inputs that arrived, from
the codes each device kept on its own disk (``--secure-dump``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from coordinator.metrics import read_metrics
from fedmpq.keys_cli import main as keys_main
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.secagg import LayerGrid, SecAggSetup, SecureSum, lift
from fedmpq.secagg.grid import mean_state
from fedmpq.state import fingerprint
from fedmpq.topics import Topics
from fedmpq.wire.codec import decode_body, decode_envelope

DEVICES = [f"device-{i:04d}" for i in range(5)]
DEADLINE_S = 300
#: (round, device, the frame type it is killed on)
KILLS = [(2, DEVICES[1], "secagg_masked"), (3, DEVICES[2], "secagg_shares")]
CONFIG = """
run_id = "{run_id}"
model = "mlp"
rounds = 3
min_clients = 5
round_deadline_s = 120.0
offline_grace_s = 0.5
secure_aggregation = true
secure_step_s = 60.0
clip_multiple = 0.0
device_keys = "{keys}"
out_dir = "{out}"
publish_onnx = false

[policy]
name = "fixed"
bits = 4
anchored = false

[training]
epochs = 3
"""


class Killer:
    """Watches every device frame on the broker; kills a device (SIGKILL) the moment its
    frame of the given type and round is seen, and remembers every frame type it saw."""

    def __init__(self, url: str, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        self.procs = procs
        self.seen: list[tuple[int, str, str]] = []  # round, device, type
        self.killed: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.loop = MqttLoop()
        self.conn = Connection(
            self.loop, BrokerAddress.parse(url), "test-killer", on_message=self.on_message
        )
        self.conn.subscribe(f"{Topics().prefix}/update/+")

    def on_message(self, _conn: Connection, topic: str, payload: bytes) -> None:
        cid = topic.rsplit("/", 1)[-1]
        env = decode_envelope(payload)
        msg = decode_body(env)
        with self.lock:
            self.seen.append((msg.round, cid, env.type))
            if (msg.round, cid, env.type) in KILLS:
                os.kill(self.procs[cid].pid, signal.SIGKILL)
                self.killed.append((msg.round, cid))

    def __enter__(self) -> Killer:
        self.loop.start()
        self.conn.connect()
        assert self.conn.wait_connected(30.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        self.loop.stop()


def _agents(url: str, run_id: str, out: Path, keys: Path) -> dict[str, subprocess.Popen[bytes]]:
    procs = {}
    for i, cid in enumerate(DEVICES):
        cmd = [
            sys.executable, "-m", "edge_client", "--broker", url, "--clients", "1",
            "--first-index", str(i), "--num-partitions", str(len(DEVICES)), "--run-id", run_id,
            "--exit-when-done", "--threads", "1", "--keys", str(keys),
            "--model-dir", str(out / f"model-{i}"), "--secure-dump", str(out / "codes" / cid),
        ]  # fmt: skip
        log = (out / f"agent-{i}.log").open("wb")
        procs[cid] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return procs


def _expected_fingerprint(out: Path, round: int, contributors: list[str]) -> str:
    """The model's fingerprint if it is the plain mean of ``contributors``' grid values."""
    files = [out / "codes" / c / f"{c}-round{round}.npz" for c in contributors]
    dumps = [np.load(f, allow_pickle=False) for f in files]
    names = sorted(k.split("/", 1)[1] for k in dumps[0].files if k.startswith("codes/"))
    layers, sums, template = [], {}, {}
    for name in names:
        _, grid_bits, scale = dumps[0][f"grid/{name}"]
        codes = dumps[0][f"codes/{name}"]
        layers.append(LayerGrid(name, codes.size, int(grid_bits), float(scale)))
        sums[name] = sum(
            lift(d[f"codes/{name}"].reshape(-1), int(d[f"grid/{name}"][0]), int(grid_bits))
            for d in dumps
        )
        template[name] = np.zeros(codes.shape, np.float32)
    setup = SecAggSetup("", round, contributors, 2, layers)
    return fingerprint(mean_state(SecureSum(tuple(contributors), sums), setup, template))


def test_three_secure_rounds_with_a_device_killed_after_and_one_before_masking(mosquitto, tmp_path):
    url, run_id = mosquitto.url, "secure-it"
    keys = tmp_path / "keys.toml"
    assert keys_main(["--out", str(keys), *DEVICES]) == 0
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(run_id=run_id, keys=keys, out=tmp_path))
    procs = _agents(url, run_id, tmp_path, keys)
    coordinator = None
    try:
        with Killer(url, procs) as killer:
            cmd = [sys.executable, "-m", "coordinator", "--broker", url, "--config", str(config),
                   "--threads", "1", "--log-level", "INFO"]  # fmt: skip
            log = (tmp_path / "coordinator.log").open("wb")
            coordinator = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
            assert coordinator.wait(timeout=DEADLINE_S) == 0, (
                tmp_path / "coordinator.log"
            ).read_text()[-3000:]
            for cid, p in procs.items():
                if (2, cid) not in killer.killed and (3, cid) not in killer.killed:
                    assert p.wait(timeout=60) == 0
    finally:
        for p in [*procs.values(), *([coordinator] if coordinator else [])]:
            if p.poll() is None:
                p.kill()
    assert killer.killed == [(2, DEVICES[1]), (3, DEVICES[2])]
    # The device killed before masking never sent its masked input.
    assert (3, DEVICES[2], "secagg_masked") not in killer.seen
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    everyone = DEVICES
    expected = {1: everyone, 2: everyone, 3: [DEVICES[0], DEVICES[3], DEVICES[4]]}
    assert rows[3]["secure"]["devices"] == 4  # the device killed in round 2 is not asked
    for row in rows[1:]:
        r = row["round"]
        assert row["counted"], row
        assert row["participants"] == expected[r], row
        assert row["model_fingerprint"] == _expected_fingerprint(tmp_path, r, expected[r])
    assert rows[2]["secure"]["answered"]["unmask"] == 4  # the killed device did not answer
    assert rows[3]["secure"]["answered"]["shares"] == 4  # ... but this one shared its keys
    assert rows[3]["secure"]["answered"]["masked"] == 3
    # Nothing in the clear: no device sent a plain update.
    assert not any(t == "update" for _, _, t in killer.seen)
