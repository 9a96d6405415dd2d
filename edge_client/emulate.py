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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_client.supervisor import Child, stop_processes, supervise
from fedmpq.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto
from fedmpq.cli_common import make_parser
from fedmpq.errors import ConfigError, FedmpqError
from fedmpq.mqtt import BrokerAddress
from fedmpq.policy_catalog import parse_policy, policy_help
from fedmpq.profiles import COMPUTE_TIMES, MEASURED, load_fleet
from fedmpq.run_config import RunConfig, load_config
from fedmpq.settings import as_flags
from fedmpq.wire.signing import write_key_files

KEY_FILE = "device_keys.toml"
#: The embedded broker is one Python thread sharing a process with this command: at 1000
#: devices it stops answering keep-alives (measured), so larger fleets get mosquitto.
EMBEDDED_MAX_DEVICES = 200


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("fedmpq emulate", __doc__)
    p.add_argument("--clients", type=int, default=10, help="emulated devices")
    p.add_argument("--rounds", type=int, default=20, help="training rounds")
    p.add_argument("--per-round", type=int, default=0, help="clients per round (0 = all)")
    p.add_argument(
        "--policy",
        default="fixed:4",
        metavar="NAME[:BITS]",
        help=f"one of {policy_help()}; other parameters go in --config's [policy] table",
    )
    p.add_argument("--model", default="cnn", help="mlp, cnn, resnet20 or resnet18")
    p.add_argument(
        "--dataset",
        default="fashion-mnist-small",
        help="fashion-mnist-small, idx:DIR, cifar10-bin:DIR, folder:DIR or module:PKG.MOD:FUNC",
    )
    p.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:ALPHA or shards:K")
    p.add_argument("--config", type=Path, help="run config (TOML) passed to the coordinator")
    p.add_argument(
        "--broker",
        help="embedded (in-process amqtt), mosquitto (start a local one) or mqtt://HOST:PORT;"
        f" default: embedded up to {EMBEDDED_MAX_DEVICES} devices, mosquitto beyond",
    )
    p.add_argument("--workers", type=int, default=2, help="agent processes hosting the devices")
    p.add_argument("--out-dir", type=Path, help="logs, metrics and models (default runs/RUN_ID)")
    p.add_argument("--run-id", default="", help="names the run (default emulate-<time>)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, selection and training")
    p.add_argument(
        "--round-deadline", type=float, default=600.0, help="seconds a round waits for updates"
    )
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
    training = run_config(args, out).training  # the devices' limits admit what the run asks
    command = [
        sys.executable, "-m", "edge_client",
        "--broker", url, "--protocol", protocol,
        "--clients", str(count), "--first-index", str(first), "--id-prefix", "device",
        "--num-partitions", str(args.clients), "--partition", args.partition,
        "--data", args.dataset, "--seed", str(args.seed),
        "--run-id", run_id, "--exit-when-done", "--threads", "1",
        "--report", str(out / "agents.jsonl"), "--log-level", "INFO",
        "--keys", str(out / KEY_FILE),
        "--max-epochs", str(max(20, training.epochs)),
        "--max-batch-size", str(max(4096, training.batch_size)),
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
        "--broker", url, "--protocol", protocol, "--policy", args.policy,
        *as_flags(RunConfig, {**_settings(args, out), "run_id": run_id}),
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


def _settings(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The run config settings this command line gives the coordinator (beside --policy)."""
    return {
        "rounds": args.rounds,
        "min_clients": args.clients,
        "clients_per_round": args.per_round,
        "model": args.model,
        "dataset": args.dataset,
        "seed": args.seed,
        "round_deadline_s": args.round_deadline,
        "out_dir": str(out),
    }


def run_config(args: argparse.Namespace, out: Path) -> RunConfig:
    """The run config the coordinator will load from this command line, checked now."""
    name, params = parse_policy(args.policy)
    return load_config(args.config, {**_settings(args, out), "policy": {"name": name, **params}})


def check_data_spec(spec: str) -> None:
    """Fail now if a data set spec names a directory that is not there (the agents read
    the data itself, and report anything else wrong with it)."""
    form, sep, rest = spec.partition(":")
    if sep and form in ("idx", "cifar10-bin", "folder") and not Path(rest).is_dir():
        raise ConfigError(f"--dataset {spec}: {rest} is not a directory")


def check_broker(spec: str) -> None:
    """Fail now if ``spec`` is a broker URL that is malformed or not accepting connections."""
    if spec in ("embedded", "mosquitto"):
        return
    address = BrokerAddress.parse(spec)
    try:
        socket.create_connection((address.host, address.port), timeout=2).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the broker at {address.url}: {exc}") from exc


def check_args(args: argparse.Namespace, out: Path) -> str:
    """Check everything that can be checked before starting anything; the broker spec."""
    if args.clients < 1 or args.workers < 1:
        raise ConfigError("--clients and --workers must be >= 1")
    run_config(args, out)
    if args.fleet is not None:
        load_fleet(args.fleet)
    check_data_spec(args.dataset)
    spec = _broker_spec(args)
    check_broker(spec)
    return spec


def _start(name: str, command: list[str], log: Path, done_ok: bool) -> Child:
    with open(log, "wb") as log_file:  # the child holds its own descriptor
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    return Child(name, process, log, done_ok)


def run_fleet(args: argparse.Namespace, spec: str, run_id: str, out: Path) -> int:
    """Run the broker, the agents and the coordinator until the run ends or one fails."""
    children: list[Child] = []
    try:
        with broker_for(spec) as (url, protocol):
            print(
                f"broker {url} (MQTT {protocol}); {args.clients} devices in "
                f"{min(args.workers, args.clients)} agent processes; logs in {out}"
            )
            for worker, (first, count) in enumerate(split_range(args.clients, args.workers)):
                cmd = agent_command(args, url, protocol, run_id, first, count, out)
                children.append(_start(f"agent {worker}", cmd, out / f"agent-{worker}.log", True))
            # The coordinator's stdout is this terminal (its progress bar); its log is a file.
            with open(out / "coordinator.log", "wb") as log:
                command = _coordinator_command(args, url, protocol, run_id, out)
                coordinator = Child(
                    "the coordinator",
                    subprocess.Popen(command, stderr=log),
                    out / "coordinator.log",
                )
            children.insert(0, coordinator)
            failure = supervise(coordinator, children[1:])
            if failure is not None:
                print(f"fedmpq emulate: {failure} (log: {failure.child.log})", file=sys.stderr)
                return failure.returncode
            stop_processes([child.process for child in children], timeout=30)
    finally:
        stop_processes([child.process for child in children], timeout=0, grace=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_id = args.run_id or time.strftime("emulate-%Y%m%d-%H%M%S")
    out = args.out_dir or Path("runs") / run_id
    try:
        spec = check_args(args, out)
        out.mkdir(parents=True, exist_ok=True)
        from edge_client.emulation import raise_fd_limit

        # A local broker inherits this limit and holds a socket per device.
        raise_fd_limit(2 * args.clients + 256)
        # Every emulated device is enrolled with its own key, as a real fleet would be, and
        # the coordinator signs what it sends; the agents verify it with its public key.
        devices = (f"device-{i:04d}" for i in range(args.clients))
        write_key_files(out / KEY_FILE, devices)
        return run_fleet(args, spec, run_id, out)
    except FedmpqError as exc:
        print(f"fedmpq emulate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
