"""Link bytes as the broker counts them: mosquitto's own byte counters next to ours.

Runs ``fedmpq emulate`` (the demo: 10 devices, Dirichlet(0.5), cnn) against a mosquitto
started with ``sys_interval 1`` and reads ``$SYS/broker/bytes/sent`` and ``/received``
while it runs, once per policy (default: fixed:4 for 20 rounds, float32 for 3).  For each
run it prints, per round and on average, what the broker sent and received next to the
metrics row's ``uplink_bytes + downlink_bytes``, and the ratio of broker bytes per round
between the policies.

The broker's ``sent`` is every delivery: the models, tasks and announcements to the
devices (our ``downlink_bytes``) and the updates to the coordinator (our
``uplink_bytes``), plus MQTT framing, acknowledgements and registrations.  ``received``
adds what the coordinator publishes once (a model per allocation, the tasks) and what the
devices publish.  The counters move every second, so a round's share is taken between
the samples around its announcement; totals over a run are exact.

Run from the repository root::

    python -m benchmarks.link_bytes                          # fixed:4 x 20, float32 x 3
    python -m benchmarks.link_bytes --runs fixed:4=5 float32=2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from coordinator.metrics import read_metrics
from fedmpq.broker import MosquittoBroker
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.topics import Topics
from fedmpq.wire.codec import decode
from fedmpq.wire.messages import ControlMessage

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "link_bytes.json"
SENT, RECEIVED = "$SYS/broker/bytes/sent", "$SYS/broker/bytes/received"
#: What makes the broker count its byte totals every second.
BROKER_CONFIG = ("sys_interval 1",)


class BrokerCounters:
    """Samples of mosquitto's byte counters and the times rounds were announced.

    The counters include what the broker sends this watcher (``own_bytes``, estimated
    from packet sizes), which :meth:`sent` subtracts.
    """

    def __init__(
        self,
        address: BrokerAddress,
        topics: Topics | None = None,
        client_id: str = "link-bytes-watcher",
    ) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (time, sent, received)
        self.opened: dict[int, float] = {}  # round -> when its announcement arrived
        self.finished: float | None = None  # when the run's end was announced
        self.own_bytes = 0
        self._latest = {SENT: -1, RECEIVED: -1}
        self._changed = threading.Condition()
        self._topics = topics = topics or Topics()
        self._loop = MqttLoop()
        self._conn = Connection(self._loop, address, client_id, on_message=self._on)
        self._conn.subscribe(SENT, qos=0)
        self._conn.subscribe(RECEIVED, qos=0)
        self._conn.subscribe(topics.control, qos=0)

    def __enter__(self) -> BrokerCounters:
        self._loop.start()
        self._conn.connect()
        self.wait_samples(2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()
        self._loop.stop()

    def _on(self, _conn: Connection, topic: str, payload: bytes) -> None:
        # A QoS 0 PUBLISH: fixed header (2), topic length (2), topic, properties (1), payload.
        self.own_bytes += 5 + len(topic) + len(payload)
        if topic == self._topics.control:
            msg = decode(payload, ControlMessage)
            if msg.state == "open":
                self.opened.setdefault(msg.round, time.monotonic())
            elif msg.state == "finished" and self.finished is None:
                self.finished = time.monotonic()
            return
        with self._changed:
            self._latest[topic] = int(payload)
            if topic == SENT and self._latest[RECEIVED] >= 0:
                sample = (time.monotonic(), self._latest[SENT], self._latest[RECEIVED])
                self.samples.append(sample)
                self._changed.notify_all()

    def wait_samples(self, count: int, timeout: float = 30.0) -> tuple[int, int]:
        """Wait for ``count`` more samples; the latest (sent - own bytes, received)."""
        with self._changed:
            target = len(self.samples) + count
            if not self._changed.wait_for(lambda: len(self.samples) >= target, timeout):
                raise TimeoutError("mosquitto published no $SYS byte counters (sys_interval?)")
            _, sent, received = self.samples[-1]
            return sent - self.own_bytes, received

    def at(self, when: float) -> tuple[int, int]:
        """The counters of the last sample before ``when``."""
        before = [s for s in self.samples if s[0] <= when] or self.samples[:1]
        return before[-1][1], before[-1][2]

    def round_marks(self, end: tuple[int, int]) -> list[tuple[int, int]]:
        """The counters at each round's announcement (rounds 1, 2, ...), then ``end``: round
        r's bytes are the difference of marks r and r + 1."""
        rounds = sorted(r for r in self.opened if r >= 1)  # 0: the coordinator connecting
        return [self.at(self.opened[r]) for r in rounds] + [end]


def emulate(url: str, policy: str, rounds: int, out: Path, extra: list[str]) -> Path:
    """Run the demo with ``policy`` for ``rounds`` rounds on the broker at ``url`` (without
    the ONNX release at the end: it is not a round's traffic)."""
    run_id = f"links-{policy.replace(':', '')}"
    out.mkdir(parents=True, exist_ok=True)
    config = out / "no_release.toml"
    config.write_text("publish_onnx = false\n")
    cmd = [
        sys.executable, "-m", "fedmpq.cli", "emulate", "--clients", "10", "--rounds",
        str(rounds), "--policy", policy, "--broker", url, "--run-id", run_id,
        "--out-dir", str(out / run_id), "--config", str(config), *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / run_id


def measure(policy: str, rounds: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One run on a fresh mosquitto: broker counters per round next to the metrics rows."""
    broker = MosquittoBroker(extra_config=BROKER_CONFIG)
    with broker, BrokerCounters(broker.address) as counters:
        start_sent, _ = counters.wait_samples(1)
        run_dir = emulate(broker.url, policy, rounds, out, extra)
        end_sent, end_received = counters.wait_samples(2)
        marks = counters.round_marks((end_sent, end_received))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["round"] > 0]
    per_round = []
    for row, before, after in zip(rows, marks, marks[1:], strict=False):
        ours = row["uplink_bytes"] + row["downlink_bytes"]
        broker_sent, broker_received = after[0] - before[0], after[1] - before[1]
        per_round.append(
            {
                "round": row["round"],
                "accuracy": row["accuracy"],
                "uplink_bytes": row["uplink_bytes"],
                "downlink_bytes": row["downlink_bytes"],
                "ours_bytes": ours,
                "broker_sent": broker_sent,
                "broker_received": broker_received,
            }
        )
    n = len(rows)
    ours_total = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows)
    return {
        "policy": policy,
        "rounds": n,
        "accuracy": rows[-1]["accuracy"] if rows else None,
        "uplink_per_round": sum(r["uplink_bytes"] for r in rows) / n,
        "downlink_per_round": sum(r["downlink_bytes"] for r in rows) / n,
        "ours_per_round": ours_total / n,
        # From the first round's announcement to the end: registration is not a round's.
        "broker_sent_per_round": (end_sent - marks[0][0]) / n,
        "broker_received_per_round": (end_received - marks[0][1]) / n,
        "broker_sent_whole_run": end_sent - start_sent,
        "per_round": per_round,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["fixed:4=20", "float32=3"], help="POLICY=ROUNDS")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work-dir", type=Path, default=Path("runs/link_bytes"))
    args, extra = p.parse_known_args(argv)
    results = []
    for spec in args.runs:
        policy, _, rounds = spec.partition("=")
        r = measure(policy, int(rounds), args.work_dir, extra)
        results.append(r)
        total = r["broker_sent_per_round"] + r["broker_received_per_round"]
        print(
            f"{policy:>8}: {r['rounds']} rounds, accuracy {r['accuracy']:.4f}; per round: "
            f"ours up {r['uplink_per_round']:,.0f} + down {r['downlink_per_round']:,.0f} = "
            f"{r['ours_per_round']:,.0f} B; broker sent {r['broker_sent_per_round']:,.0f} "
            f"(x{r['broker_sent_per_round'] / r['ours_per_round']:.3f} of ours), "
            f"received {r['broker_received_per_round']:,.0f}, total {total:,.0f} B"
        )
    base = results[-1]
    base_total = base["broker_sent_per_round"] + base["broker_received_per_round"]
    for r in results[:-1]:
        total = r["broker_sent_per_round"] + r["broker_received_per_round"]
        print(f"{base['policy']} / {r['policy']} broker bytes per round: {base_total / total:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
