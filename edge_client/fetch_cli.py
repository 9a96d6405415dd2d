"""``fedmpq agent fetch-model``: receive, verify and store the model the coordinator published.

Needs neither torch nor training data: with ``fedmpq agent predict`` it is all an
inference-only device runs.  Broker, client id and CA default to the agent's environment
(``$FEDMPQ_BROKER``, ``$FEDMPQ_CLIENT_ID``, ``$FEDMPQ_CA_FILE``), as install-agent.sh writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from edge_client.model_delivery import fetch_model
from edge_client.model_store import ModelStore, default_model_dir
from fedmpq.errors import FedmpqError
from fedmpq.mqtt import BrokerAddress
from fedmpq.topics import Topics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmpq agent fetch-model", description=__doc__)
    p.add_argument(
        "--broker",
        default=os.environ.get("FEDMPQ_BROKER"),
        required="FEDMPQ_BROKER" not in os.environ,
        help="mqtt[s]://USER:PASSWORD@HOST:PORT; default $FEDMPQ_BROKER",
    )
    p.add_argument(
        "--ca-file",
        default=os.environ.get("FEDMPQ_CA_FILE") or None,
        help="CA certificate that signed the broker's (mqtts://); default $FEDMPQ_CA_FILE",
    )
    p.add_argument(
        "--client-id",
        default=os.environ.get("FEDMPQ_CLIENT_ID") or f"fetch-{os.getpid()}",
        help="this device's id; default $FEDMPQ_CLIENT_ID",
    )
    p.add_argument("--model-dir", type=Path, help=f"default {default_model_dir()}")
    p.add_argument("--run-id", default="", help="only accept this run's model")
    p.add_argument("--topic-prefix", default="fedmpq")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        broker = BrokerAddress.parse(args.broker)
        if args.ca_file is not None:
            broker = dataclasses.replace(broker, ca_file=args.ca_file)
        stored = fetch_model(
            broker,
            ModelStore(args.model_dir or default_model_dir()),
            client_id=args.client_id,
            topics=Topics(args.topic_prefix),
            run_id=args.run_id,
            timeout=args.timeout,
        )
    except FedmpqError as exc:
        print(f"fedmpq agent fetch-model: {exc}", file=sys.stderr)
        return 2
    print(f"stored model of run {stored.run_id} (round {stored.round}) at {stored.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
