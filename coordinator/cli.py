"""``fedmpq coordinator``: run a federated training run against an MQTT broker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from coordinator.config import load_config
from coordinator.mqtt_service import MqttCoordinator
from fedmpq.errors import FedmpqError
from fedmpq.mqtt import BrokerAddress
from fedmpq.policies import parse_policy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmpq coordinator", description=__doc__)
    p.add_argument(
        "--broker",
        default=os.environ.get("FEDMPQ_BROKER"),
        required="FEDMPQ_BROKER" not in os.environ,
        help="mqtt://[USER:PASSWORD@]HOST:PORT (mqtts:// for TLS); default $FEDMPQ_BROKER",
    )
    p.add_argument("--config", type=Path, help="run config (TOML); options below override it")
    p.add_argument("--run-id")
    p.add_argument("--rounds", type=int)
    p.add_argument("--min-clients", type=int, help="devices to wait for before round 1")
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--policy", help="float32 | fixed:BITS | ... (see README)")
    p.add_argument("--model")
    p.add_argument("--dataset")
    p.add_argument("--out-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--round-deadline", type=float, dest="round_deadline_s")
    p.add_argument("--topic-prefix")
    p.add_argument(
        "--observer",
        choices=["minmax", "mse"],
        help="how symmetric scales are chosen: max|w| or the clip of least error",
    )
    p.add_argument("--device-keys", help="key file (fedmpq keys): accept only signed device frames")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir from its checkpoint"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--log-level", default="INFO")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [
        "run_id",
        "rounds",
        "min_clients",
        "clients_per_round",
        "model",
        "dataset",
        "out_dir",
        "seed",
        "round_deadline_s",
        "topic_prefix",
        "device_keys",
        "observer",
    ]
    values: dict[str, Any] = {key: getattr(args, key) for key in keys}
    if args.policy:
        name, params = parse_policy(args.policy)
        values["policy"] = {"name": name, **params}
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config, _overrides(args))
        coordinator = MqttCoordinator(
            config, BrokerAddress.parse(args.broker), protocol=args.protocol, resume=args.resume
        )
        if args.progress:
            from coordinator.progress import run_with_progress

            rows = run_with_progress(coordinator)
        else:
            rows = coordinator.run()
    except FedmpqError as exc:
        print(f"fedmpq coordinator: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    final = rows[-1]
    print(
        f"run {config.run_id}: {len(rows) - 1} rounds, "
        f"final accuracy {100 * final['accuracy']:.2f}%, "
        f"uplink {final['cumulative_uplink_bytes'] / 1e6:.2f} MB\n"
        f"  metrics: {Path(config.out_dir) / 'metrics.jsonl'}\n"
        f"  plot:    {Path(config.out_dir) / 'accuracy.png'}"
    )
    return 0
