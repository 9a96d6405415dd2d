"""fedmpq coordinator: run a federated training run against an MQTT broker.

Settings come from the run config (--config run.toml) and the flags below, which override
it; every setting is checked before the broker is contacted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedmpq.cli_common import (
    add_connection_flags,
    add_log_flag,
    broker_address,
    configure_logging,
    make_parser,
)
from fedmpq.errors import FedmpqError
from fedmpq.mqtt import BrokerAddress
from fedmpq.policy_catalog import parse_policy, policy_help
from fedmpq.run_config import RunConfig, load_config
from fedmpq.settings import add_flags, flag_values, shown_default_of


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("fedmpq coordinator", __doc__)
    add_connection_flags(p, topic_prefix=None)
    p.add_argument("--config", type=Path, help="run config (TOML); the flags below override it")
    p.add_argument(
        "--policy",
        metavar="NAME[:BITS]",
        help=f"one of {policy_help()}; other parameters go in the run config's"
        f" [policy] table (default {shown_default_of(RunConfig, 'policy')})",
    )
    add_flags(p, RunConfig)
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir from its checkpoint"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    add_log_flag(p)
    return p


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run config settings given on the command line."""
    values = flag_values(args, RunConfig)
    if args.topic_prefix:
        values["topic_prefix"] = args.topic_prefix
    if args.policy:
        name, params = parse_policy(args.policy)
        values["policy"] = {"name": name, **params}
    return values


def run(config: RunConfig, broker: BrokerAddress, args: argparse.Namespace) -> int:
    """Train: the part that needs torch, imported only once the command line is checked."""
    import torch

    from coordinator.mqtt_service import MqttCoordinator

    if args.threads:
        torch.set_num_threads(args.threads)
    coordinator = MqttCoordinator(config, broker, protocol=args.protocol, resume=args.resume)
    if args.progress:
        from coordinator.progress import run_with_progress

        rows = run_with_progress(coordinator)
    else:
        rows = coordinator.run()
    final = rows[-1]
    print(
        f"run {config.run_id}: {len(rows) - 1} rounds, "
        f"final accuracy {100 * final['accuracy']:.2f}%, "
        f"uplink {final['cumulative_uplink_bytes'] / 1e6:.2f} MB\n"
        f"  metrics: {Path(config.out_dir) / 'metrics.jsonl'}\n"
        f"  plot:    {Path(config.out_dir) / 'accuracy.png'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, overrides(args))
        return run(config, broker_address(args), args)
    except FedmpqError as exc:
        print(f"fedmpq coordinator: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
