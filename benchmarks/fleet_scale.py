"""Fleet scale: 10, 100 and 1000 emulated devices against one mosquitto on this machine.

For each fleet size the benchmark starts a fresh mosquitto, an instrumented coordinator
in its own process and the devices multiplexed onto ``--workers`` agent processes (the
same command ``fedmpq emulate`` runs), emulating ``profiles/fleet-mixed.toml``; a tiny
model (``cnn``, 105k parameters, 4-bit updates) keeps training out of the picture.  It
measures

* **connect + register**: agents launched -> every device registered (includes agent
  start-up: python, torch, data set, probe), and the span of the registration burst
  (first -> last registration received);
* **per-round coordinator overhead**, excluding training and evaluation: selection,
  task encoding and publishing, decoding, validating and aggregating every update,
  closing the round -- i.e. the round's wall time minus the time the coordinator sat
  waiting for devices and minus test-set evaluation;
* **coordinator peak RSS** (``ru_maxrss`` of the coordinator process) and **broker
  RSS** (psutil on mosquitto's pid, sampled every 0.2 s, peak);
* **link bytes**: what the broker itself counts (mosquitto's ``$SYS/broker/bytes/sent``,
  ``sys_interval 1``) per round, against what the selected devices need (their models,
  tasks and updates, from the metrics row) and against the row's own up + down total;
  the coordinator waits for two counter samples once every device registered and again
  after the last round (:class:`SettledCounters`), so neither the registration burst nor
  the end of the run is counted as a round's;
* **emulated round time** against the analytic time of the slowest participant:
  FLOP-count compute (``fedmpq.resources.training_seconds`` at the profile's GFLOPS)
  plus both transfers over its links; and against the emulation's own parts (measured
  host compute stretched by host/profile GFLOPS plus transfers), which checks that the
  coordinator's figure is the slowest device's.

Run from the repository root::

    python -m benchmarks.fleet_scale                 # 10, 100, 1000 devices
    python -m benchmarks.fleet_scale --sizes 10 100  # fewer

The machine is shared and small (2 cores): timings are noisy; ratios are from one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

from benchmarks.link_bytes import BROKER_CONFIG, BrokerCounters
from coordinator.events import (
    DevicesReady,
    Evaluated,
    Event,
    FrameHandled,
    RoundClosed,
    RoundOpened,
    RoundTimed,
)
from edge_client.emulate import KEY_FILE, agent_command, split_range, stop_processes
from edge_client.emulate import build_parser as emulate_parser
from edge_client.emulation import COMPUTE_TIMES, MEASURED, round_seconds
from fedmpq.broker import MosquittoBroker
from fedmpq.data.datasets import load_dataset
from fedmpq.data.partition import parse_partition, partition
from fedmpq.models import build_model
from fedmpq.mqtt import BrokerAddress
from fedmpq.profiles import load_fleet
from fedmpq.resources import model_cost, training_seconds
from fedmpq.topics import REGISTER, TASK, UPDATE
from fedmpq.wire.signing import write_key_files

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fleet_scale.json"
FLEET = ROOT / "profiles" / "fleet-mixed.toml"
MODEL = "cnn"
DATASET = "fashion-mnist-small"
PARTITION = "iid"
SEED = 0
MIB = 2**20


# --- the coordinator process ------------------------------------------------------------
class RoundTimer:
    """Observes a coordinator through its engine's events; never changes what it does.

    Per round: the wall time, the time spent waiting for devices, the time evaluating and
    handling frames, and the sizes of the tasks and the updates.
    """

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.register_times: list[float] = []
        self.registered_at = 0.0
        self.handle_s = self.evaluate_s = 0.0
        self.sizes: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, FrameHandled):
            self.handle_s += event.seconds
            if event.kind == REGISTER:
                self.register_times.append(time.time())
            elif event.kind == UPDATE:
                self.sizes.setdefault("update", {})[event.client_id] = event.nbytes
        elif isinstance(event, DevicesReady):
            self.registered_at = self.registered_at or event.at  # the first is registration
        elif isinstance(event, RoundOpened):
            self._opened(event)
        elif isinstance(event, Evaluated):
            self.evaluate_s += event.seconds
        elif isinstance(event, RoundClosed):
            self.rounds.append({"round": event.round, "row": event.row, "sizes": self.sizes})
        elif isinstance(event, RoundTimed):
            self._timed(event)

    def _opened(self, event: RoundOpened) -> None:
        if self.sizes.get("round") != event.round:  # a new round, not the quorum retry
            self.sizes = {"round": event.round, "task": {}}
            self.handle_s = self.evaluate_s = 0.0
        for m in event.outgoing:
            if m.kind == TASK:
                self.sizes["task"][m.client_id] = len(m.payload)

    def _timed(self, event: RoundTimed) -> None:
        self.rounds[-1] |= {
            "wall_s": event.wall_s,
            # Selection, tasks, publishing, decoding, validating, aggregating, closing.
            "overhead_s": event.wall_s - event.idle_s - self.evaluate_s,
            "handle_s": self.handle_s,
            "evaluate_s": self.evaluate_s,
        }


class SettledCounters:
    """Holds the coordinator for two fresh samples of mosquitto's byte counters before round
    1 opens and after the last round closes, so that neither the registration burst (1,000
    registrations and statuses, ~1 MB) nor the end of the run (the ``finished``
    announcement to every device, their ``offline`` statuses) is counted as a round's.

    It waits on the samples themselves (``$SYS`` publications), over its own connection,
    closed again before the coordinator goes on.
    """

    def __init__(self, url: str, last_round: int) -> None:
        self.address = BrokerAddress.parse(url)
        self.last_round = last_round
        self.held_first = False

    def __call__(self, event: Event) -> None:
        first = isinstance(event, DevicesReady) and not self.held_first
        last = isinstance(event, RoundTimed) and event.round == self.last_round
        if first or last:
            self.held_first = True
            # Entering waits for two samples, one of which may be a retained earlier one.
            with BrokerCounters(self.address, client_id="fleet-scale-settle") as counters:
                counters.wait_samples(1)


def coordinator_child(spec: dict[str, Any]) -> None:
    """Run an instrumented coordinator as ``spec`` says; write its measurements as JSON."""
    import torch

    from coordinator.config import RunConfig
    from coordinator.mqtt_service import MqttCoordinator

    torch.set_num_threads(1)
    config = RunConfig(
        run_id=spec["run_id"],
        model=MODEL,
        dataset=DATASET,
        rounds=spec["rounds"],
        clients_per_round=spec["per_round"],
        min_clients=spec["clients"],
        registration_timeout_s=600.0,
        round_deadline_s=120.0,
        seed=SEED,
        out_dir=spec["out"],
        device_keys=spec["keys"],
        publish_onnx=False,
    )
    coordinator = MqttCoordinator(config, BrokerAddress.parse(spec["url"]))
    timer = RoundTimer()
    coordinator.engine.observers.subscribe(timer)
    coordinator.engine.observers.subscribe(SettledCounters(spec["url"], spec["rounds"]))
    coordinator.run()
    result = {
        "registered_at": timer.registered_at,
        "first_register": min(timer.register_times, default=0.0),
        "last_register": max(timer.register_times, default=0.0),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rounds": timer.rounds,
    }
    Path(spec["result"]).write_text(json.dumps(result))


# --- the driver -------------------------------------------------------------------------
class PeakRss:
    """Samples a process's RSS on a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def analytic_slowest(
    clients: int, rounds: list[dict[str, Any]], samples: list[int]
) -> list[dict[str, float]]:
    """Per round: the emulated round time and the analytic time of the slowest participant
    (FLOP-count compute at the profile's GFLOPS plus transfers of the bytes that moved)."""
    specs = load_fleet(FLEET).assign(clients, seed=SEED)
    data = load_dataset(DATASET)
    cost = model_cost(build_model(MODEL, data.num_classes, data.in_shape), data.in_shape)
    out = []
    for r in rounds:
        row, sizes = r["row"], r["sizes"]
        slowest = 0.0
        for cid in row["participants"]:
            index = int(cid.rsplit("-", 1)[1])
            spec = specs[index]
            compute = training_seconds(cost, samples[index], 1, spec.gflops.value)
            down = row["link_bytes"][cid]["down"]  # its task and its model
            slowest = max(slowest, round_seconds(spec, compute, down, sizes["update"][cid]))
        out.append({"emulated_s": row["emulated_seconds"], "analytic_s": slowest})
    return out


def stretched_slowest(report: Path, clients: int) -> dict[int, float]:
    """Per round: the slowest participant rebuilt from the agents' own report rows
    (stretched measured compute + transfers), to check the coordinator's figure."""
    specs = load_fleet(FLEET).assign(clients, seed=SEED)
    slowest: dict[int, float] = defaultdict(float)
    for line in report.read_text().splitlines():
        row = json.loads(line)
        if row.get("event") != "update":
            continue
        spec = specs[int(row["client_id"].rsplit("-", 1)[1])]
        t = round_seconds(spec, row["compute_seconds"], row["downlink_bytes"], row["bytes"])
        slowest[row["round"]] = max(slowest[row["round"]], t)
    return slowest


def link_bytes(rounds: list[dict[str, Any]], marks: list[tuple[int, int]]) -> dict[str, Any]:
    """Per round: what the broker sent (its own counter, between round announcements),
    what the selected devices need (models + tasks down, updates up) and the row's total,
    up and down."""
    per_round = []
    for r, before, after in zip(rounds, marks, marks[1:], strict=False):
        row = r["row"]
        need = sum(d["up"] + d["down"] for d in row["link_bytes"].values())
        up, down = row["uplink_bytes"], row["downlink_bytes"]
        per_round.append(
            {"broker_sent": after[0] - before[0], "need": need, "up": up, "down": down}
            | {"ours": up + down}
        )
    total = {k: sum(p[k] for p in per_round) for k in ("broker_sent", "need", "ours", "up", "down")}
    return {"per_round": per_round, "total": total}


def run_size(
    clients: int, per_round: int, rounds: int, workers: int, compute_time: str, out: Path
) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # agents append to their report file
    out.mkdir(parents=True)
    run_id = f"scale-{clients}"
    write_key_files(out / KEY_FILE, (f"device-{i:04d}" for i in range(clients)))
    result_path = out / "coordinator.json"
    emulate_argv = ["--clients", str(clients), "--partition", PARTITION, "--dataset", DATASET]
    emulate_argv += ["--seed", str(SEED), "--fleet", str(FLEET), "--compute-time", compute_time]
    args = emulate_parser().parse_args(emulate_argv)
    broker = MosquittoBroker(extra_config=BROKER_CONFIG)
    with broker, BrokerCounters(broker.address) as counters:
        assert broker.pid is not None
        broker_rss = PeakRss(broker.pid)
        spec = {
            "run_id": run_id,
            "rounds": rounds,
            "per_round": per_round,
            "clients": clients,
            "out": str(out),
            "keys": str(out / KEY_FILE),
            "url": broker.url,
            "result": str(result_path),
        }
        child_log = open(out / "coordinator.log", "wb")  # noqa: SIM115 (child owns it)
        coordinator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.fleet_scale",
                "--coordinator-child",
                json.dumps(spec),
            ],
            stdout=child_log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        launched = time.time()
        agents = []
        for worker, (first, count) in enumerate(split_range(clients, workers)):
            cmd = agent_command(args, broker.url, "5", run_id, first, count, out)
            cmd[cmd.index("--log-level") + 1] = "WARNING"
            log = open(out / f"agent-{worker}.log", "wb")  # noqa: SIM115 (child owns it)
            agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        agent_rss = [PeakRss(agent.pid) for agent in agents]
        try:
            code = coordinator.wait(timeout=1800)
            stop_processes(agents, timeout=30)
        finally:
            stop_processes([coordinator, *agents], timeout=0)
        broker_peak = broker_rss.stop()
        agent_peak = max(sampler.stop() for sampler in agent_rss)
        end = counters.wait_samples(2)
        if counters.finished is not None:  # round 3 ends before the run's end is announced
            end = counters.at(counters.finished)
        marks = counters.round_marks(end)
    if code != 0:
        raise SystemExit(f"coordinator failed for {clients} devices: see {out}/coordinator.log")
    measured = json.loads(result_path.read_text())
    data = load_dataset(DATASET)
    scheme, params = parse_partition(PARTITION)
    samples = [len(p) for p in partition(data.train.y, clients, scheme, seed=SEED, **params)]
    emulated = analytic_slowest(clients, measured["rounds"], samples)
    rebuilt = stretched_slowest(out / "agents.jsonl", clients)
    rows = measured["rounds"]
    return {
        "clients": clients,
        "per_round": per_round,
        "workers": workers,
        "compute_time": compute_time,
        "register_s": measured["registered_at"] - launched,
        "register_burst_s": measured["last_register"] - measured["first_register"],
        "overhead_s": [r["overhead_s"] for r in rows],
        "round_wall_s": [r["wall_s"] for r in rows],
        "participants": [len(r["row"]["participants"]) for r in rows],
        "dropped": [len(r["row"].get("dropped", {})) for r in rows],
        "coordinator_peak_rss_bytes": measured["peak_rss_bytes"],
        "broker_peak_rss_bytes": broker_peak,
        "agent_process_peak_rss_bytes": agent_peak,
        "link_bytes": link_bytes(rows, marks),
        "emulated_vs_analytic": emulated,
        "emulated_vs_rebuilt": [
            {"emulated_s": r["row"]["emulated_seconds"], "rebuilt_s": rebuilt[r["round"]]}
            for r in rows
        ],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    base_rss = results[0]["coordinator_peak_rss_bytes"]
    print(
        f"\n{'devices':>7} {'/round':>6} {'register':>9} {'burst':>6} {'overhead/round':>15}"
        f" {'coord RSS':>10} {'x first':>7} {'broker RSS':>10} {'agent RSS':>9}"
        f" {'emul/analytic':>13} {'ours up + down/round':>23} {'broker sent/round':>17}"
        f" {'/ need':>6} {'/ ours':>6}"
    )
    for r in results:
        over = r["overhead_s"]
        ratios = [e["emulated_s"] / e["analytic_s"] for e in r["emulated_vs_analytic"]]
        links, n = r["link_bytes"]["total"], len(r["link_bytes"]["per_round"])
        print(
            f"{r['clients']:>7} {r['per_round']:>6} {r['register_s']:>8.1f}s"
            f" {r['register_burst_s']:>5.1f}s"
            f" {sum(over) / len(over):>7.3f}s/{max(over):>5.3f}s"
            f" {r['coordinator_peak_rss_bytes'] / MIB:>8.0f}M"
            f" {r['coordinator_peak_rss_bytes'] / base_rss:>7.2f}"
            f" {r['broker_peak_rss_bytes'] / MIB:>9.1f}M"
            f" {r['agent_process_peak_rss_bytes'] / MIB:>8.0f}M"
            f" {min(ratios):>6.2f}-{max(ratios):<6.2f}"
            f" {links['up'] / n:>10,.0f} + {links['down'] / n:>10,.0f}"
            f" {links['broker_sent'] / n:>15,.0f} B {links['broker_sent'] / links['need']:>6.3f}"
            f" {links['broker_sent'] / links['ours']:>6.3f}"
        )
    print(
        "overhead/round: mean/max over rounds; x first: coordinator RSS over the first size's;"
        " agent RSS: peak of the largest agent process;"
        "\nemul/analytic: emulated round time over the FLOP-count analytic time of the slowest"
        " participant (min-max over rounds);\nours up + down/round: the metrics rows' uplink"
        " and downlink bytes; broker sent/round: mosquitto's own count; / need:"
        " over the models, tasks and updates of the selected devices; / ours: over the row's"
        " up + down"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_scale", description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compute-time", choices=COMPUTE_TIMES, default=MEASURED)
    p.add_argument("--work-dir", type=Path, default=Path("runs") / "fleet_scale")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--coordinator-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.coordinator_child:
        coordinator_child(json.loads(args.coordinator_child))
        return 0
    results = []
    for clients in args.sizes:
        per_round = min(args.per_round, clients)
        print(f"{clients} devices, {per_round} per round, {args.workers} agent processes ...")
        results.append(
            run_size(
                clients,
                per_round,
                args.rounds,
                args.workers,
                args.compute_time,
                args.work_dir / f"{clients}-{args.compute_time}",
            )
        )
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
                "model": MODEL,
                "fleet": str(FLEET.relative_to(ROOT)),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
