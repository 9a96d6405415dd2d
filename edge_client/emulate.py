"""``fedmpq emulate``: a whole fleet on this machine, in one command.

Starts a broker (the embedded one unless ``--broker`` names a real broker), the
coordinator as its own process, and the emulated devices multiplexed onto a few
agent processes; shows the coordinator's progress bar and prints where the
metrics and the plot are.  The coordinator runs as a separate program, as it
would on a server: this module starts it by command line and never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from edge_client.emulation import COMPUTE_TIMES, MEASURED, raise_fd_limit
from fedmpq.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto
from fedmpq.errors import FedmpqError
from fedmpq.wire.signing import generate_keys, write_keyring

KEY_FILE = "device_keys.toml"
#: The embedded broker is one Python thread sharing a process with this command: at 1000
#: devices it stops answering keep-alives (measured), so larger fleets get mosquitto.
EMBEDDED_MAX_DEVICES = 200


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmpq emulate", description=__doc__)
    p.add_argument("--clients", type=int, default=10, help="emulated devices")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=0, help="clients per round (0 = all)")
    p.add_argument("--policy", default="fixed:4", help="float32 | fixed:BITS | ...")
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="fashion-mnist-small")
    p.add_argument("--partition", default="dirichlet:0.5", help="iid | dirichlet:ALPHA | shards:K")
    p.add_argument("--config", type=Path, help="run config (TOML) passed to the coordinator")
    p.add_argument(
        "--broker",
        help="embedded (in-process amqtt), mosquitto (start a local one) or mqtt://HOST:PORT;"
        f" default: embedded up to {EMBEDDED_MAX_DEVICES} devices, mosquitto beyond",
    )
    p.add_argument("--workers", type=int, default=2, help="agent processes hosting the devices")
    p.add_argument("--out-dir", type=Path, help="default: runs/<run id>")
    p.add_argument("--run-id", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-deadline", type=float, default=600.0)
    p.add_argument(
        "--fleet",
        type=Path,
        help="fleet mix or device profile (profiles/*.toml): devices report and obey these"
        " profiles (RAM, GFLOPS, links, churn, crashes); counts are scaled to --clients",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="with --fleet: delay updates by the emulated time (default: only report it)",
    )
    p.add_argument(
        "--compute-time",
        choices=COMPUTE_TIMES,
        default=MEASURED,
        help="with --fleet: emulated compute = host CPU time x host/profile GFLOPS (measured)"
        " or FLOP count / profile GFLOPS (analytic)",
    )
    return p


@contextlib.contextmanager
def broker_for(spec: str) -> Iterator[tuple[str, str]]:
    """Yield (broker URL, MQTT protocol version) for ``spec``, running a broker if needed."""
    if spec == "embedded":
        with EmbeddedBroker() as broker:
            yield broker.url, "3.1.1"  # amqtt speaks MQTT 3.1.1 only
    elif spec == "mosquitto":
        with MosquittoBroker() as broker:
            yield broker.url, "5"
    else:
        yield spec, "5"


def agent_command(
    args: argparse.Namespace,
    url: str,
    protocol: str,
    run_id: str,
    first: int,
    count: int,
    out: Path,
) -> list[str]:
    """The command line of one agent process serving devices ``first .. first+count-1``."""
    command = [
        sys.executable, "-m", "edge_client",
        "--broker", url, "--protocol", protocol,
        "--clients", str(count), "--first-index", str(first), "--id-prefix", "device",
        "--num-partitions", str(args.clients), "--partition", args.partition,
        "--data", args.dataset, "--seed", str(args.seed),
        "--run-id", run_id, "--exit-when-done", "--threads", "1",
        "--report", str(out / "agents.jsonl"), "--log-level", "INFO",
        "--keys", str(out / KEY_FILE),
        "--model-dir", str(out / "agent-model"),
    ]  # fmt: skip
    if args.fleet:
        command += ["--fleet", str(args.fleet), "--compute-time", args.compute_time]
        command += ["--realtime"] if args.realtime else []
    return command


def _coordinator_command(
    args: argparse.Namespace, url: str, protocol: str, run_id: str, out: Path
) -> list[str]:
    command = [
        sys.executable, "-m", "coordinator",
        "--broker", url, "--protocol", protocol, "--run-id", run_id,
        "--rounds", str(args.rounds), "--min-clients", str(args.clients),
        "--clients-per-round", str(args.per_round), "--policy", args.policy,
        "--model", args.model, "--dataset", args.dataset, "--seed", str(args.seed),
        "--round-deadline", str(args.round_deadline), "--out-dir", str(out),
        "--device-keys", str(out / KEY_FILE),
        "--threads", "1", "--progress", "--log-level", "WARNING",
    ]  # fmt: skip
    if args.config:
        command += ["--config", str(args.config)]
    return command


def _broker_spec(args: argparse.Namespace) -> str:
    if args.broker:
        return str(args.broker)
    if args.clients <= EMBEDDED_MAX_DEVICES:
        return "embedded"
    if find_mosquitto() is None:
        raise FedmpqError(
            f"{args.clients} devices need mosquitto (apt-get install mosquitto) or --broker "
            f"mqtt://HOST:PORT; the embedded broker holds up to {EMBEDDED_MAX_DEVICES}"
        )
    return "mosquitto"


def split_range(total: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous (first, count) ranges that cover ``total`` in ``parts`` near-equal pieces."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    ranges, first = [], 0
    for i in range(parts):
        count = base + (1 if i < extra else 0)
        ranges.append((first, count))
        first += count
    return ranges


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait up to ``timeout`` s in all for ``processes`` to exit, then terminate, then kill."""
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clients < 1:
        print("fedmpq emulate: --clients must be >= 1", file=sys.stderr)
        return 2
    run_id = args.run_id or time.strftime("emulate-%Y%m%d-%H%M%S")
    out = args.out_dir or Path("runs") / run_id
    out.mkdir(parents=True, exist_ok=True)
    # A local broker inherits this limit and holds a socket per device.
    raise_fd_limit(2 * args.clients + 256)
    # Every emulated device is enrolled with its own key, as a real fleet would be.
    write_keyring(out / KEY_FILE, generate_keys(f"device-{i:04d}" for i in range(args.clients)))
    agents: list[subprocess.Popen[bytes]] = []
    try:
        with broker_for(_broker_spec(args)) as (url, protocol):
            print(
                f"broker {url} (MQTT {protocol}); {args.clients} devices in "
                f"{min(args.workers, args.clients)} agent processes; logs in {out}"
            )
            for worker, (first, count) in enumerate(split_range(args.clients, args.workers)):
                log_file = open(out / f"agent-{worker}.log", "wb")  # noqa: SIM115 (child owns it)
                cmd = agent_command(args, url, protocol, run_id, first, count, out)
                agents.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT))
            with open(out / "coordinator.log", "wb") as coordinator_log:
                coordinator = subprocess.run(
                    _coordinator_command(args, url, protocol, run_id, out),
                    stderr=coordinator_log,
                    check=False,
                )
            stop_processes(agents, timeout=30)
    except FedmpqError as exc:
        print(f"fedmpq emulate: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_processes(agents, timeout=0)
    if coordinator.returncode != 0:
        print(
            f"fedmpq emulate: the coordinator failed; see {out / 'coordinator.log'}",
            file=sys.stderr,
        )
        return coordinator.returncode
    return 0
