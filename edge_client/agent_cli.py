"""fedmpq agent: run one device, or several emulated ones, against a broker.

fedmpq agent predict INPUT classifies an input with the model the agent received (see
fedmpq agent predict --help). The command line is parsed and checked before torch is
imported; training starts in edge_client.cli.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_client.model_store import default_model_dir
from fedmpq.cli_common import add_connection_flags, add_log_flag, broker_address, make_parser
from fedmpq.errors import ConfigError
from fedmpq.profiles import COMPUTE_TIMES, MEASURED


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("fedmpq agent", __doc__)
    add_connection_flags(p, topic_prefix="fedmpq")
    _add_device_flags(p)
    _add_run_flags(p)
    _add_emulation_flags(p)
    add_log_flag(p)
    return p


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    """Which devices this process hosts, and the data each trains on."""
    p.add_argument("--client-id", help="this device's id (default PREFIX-INDEX)")
    p.add_argument("--clients", type=int, default=1, help="devices to host in this process")
    p.add_argument("--id-prefix", default="device", help="id prefix of hosted devices")
    p.add_argument("--first-index", type=int, help="index of the first hosted device (default 0)")
    p.add_argument(
        "--data",
        default="fashion-mnist-small",
        help="data set: fashion-mnist-small, idx:DIR, cifar10-bin:DIR, folder:DIR or"
        " module:PKG.MOD:FUNC",
    )
    p.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K")
    p.add_argument(
        "--num-partitions", type=int, default=1, help="split the data among this many devices"
    )
    p.add_argument(
        "--partition-index",
        type=int,
        help="which share (0..num-partitions - 1) this one device trains on; needed when"
        " --num-partitions is larger than --clients, so two agents never train on the same share",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the partition and local training")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Which run to join, the device's keys and limits, and what to keep."""
    p.add_argument("--run-id", default="", help="only take part in this run")
    p.add_argument("--exit-when-done", action="store_true", help="exit when the run finishes")
    p.add_argument("--report", type=Path, help="append one JSON line per update sent")
    p.add_argument(
        "--keys",
        type=Path,
        default=os.environ.get("FEDMPQ_KEYS") or None,
        help="device key file (fedmpq keys): each device signs with its key, and refuses"
        " whatever the coordinator's key did not sign; default $FEDMPQ_KEYS",
    )
    p.add_argument("--max-epochs", type=int, default=20, help="refuse tasks asking for more epochs")
    p.add_argument(
        "--max-batch-size", type=int, default=4096, help="refuse tasks with larger batches"
    )
    p.add_argument(
        "--model-dir",
        default=str(default_model_dir()),
        help="where to keep the trained ONNX model the coordinator publishes ('' = don't);"
        " default $FEDMPQ_MODEL_DIR or ~/.local/share/fedmpq",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument(
        "--secure-dump",
        type=Path,
        help="in secure rounds, also write the device's own unmasked codes to DIR"
        " (one .npz per round; they never leave the device)",
    )


def _add_emulation_flags(p: argparse.ArgumentParser) -> None:
    """Emulating devices of a fleet instead of reporting this machine."""
    p.add_argument(
        "--fleet",
        type=Path,
        help="emulate devices of this fleet mix or device profile (profiles/*.toml) instead"
        " of reporting this machine; device INDEX gets the fleet's INDEX-th profile of"
        " --num-partitions devices",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="with --fleet: delay each update by the emulated time instead of only reporting it",
    )
    p.add_argument(
        "--compute-time",
        choices=COMPUTE_TIMES,
        default=MEASURED,
        help="with --fleet: emulated compute is this host's CPU time x host/profile GFLOPS"
        " (measured) or the task's FLOP count / profile GFLOPS (analytic)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check an agent command line; exits with a one-line error if it cannot work."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error("--clients must be >= 1")
    if args.num_partitions < 1:
        p.error("--num-partitions must be >= 1")
    if args.partition_index is not None:
        if args.clients != 1 or args.first_index is not None:
            p.error(
                "--partition-index names one device's share: not with --clients or --first-index"
            )
        if not 0 <= args.partition_index < args.num_partitions:
            p.error(f"--partition-index must be within 0..{args.num_partitions - 1}")
        args.first_index = args.partition_index
    elif args.first_index is None and args.clients < args.num_partitions:
        # Two agents started by hand would otherwise both train on share 0.
        p.error(
            f"--num-partitions {args.num_partitions} with {args.clients} device(s) here needs"
            f" --partition-index 0..{args.num_partitions - 1} (or --first-index): which share"
            " of the data this agent trains on"
        )
    if args.first_index is None:
        args.first_index = 0
    try:
        broker_address(args)
    except ConfigError as exc:
        p.error(str(exc))
    last = args.first_index + args.clients
    if last > args.num_partitions:
        p.error(f"devices {args.first_index}..{last - 1} need --num-partitions >= {last}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["predict"]:
        from edge_client.predict_cli import main as predict

        return predict(args[1:])
    if args[:1] == ["fetch-model"]:
        from edge_client.fetch_cli import main as fetch

        return fetch(args[1:])
    options = parse_args(args)
    try:
        from edge_client.cli import run_agent
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print(
            "fedmpq agent: training needs torch, which this install leaves out: install "
            "fedmpq[train] (deploy/install-agent.sh without --inference-only), or use "
            "'fedmpq agent fetch-model' and 'fedmpq agent predict' for inference only",
            file=sys.stderr,
        )
        return 2
    return run_agent(options)
