"""``fedmpq agent``: run one device, or several emulated ones, against a broker."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from edge_client.emulation import COMPUTE_TIMES, MEASURED, EmulatedDevice, raise_fd_limit
from edge_client.model_store import default_model_dir
from edge_client.profiling import measure_profile
from edge_client.runtime import AgentOptions, AgentRuntime, Device
from fedmpq.data.datasets import load_dataset, subset
from fedmpq.data.partition import parse_partition, partition
from fedmpq.errors import FedmpqError
from fedmpq.mqtt import BrokerAddress
from fedmpq.profiles import load_fleet
from fedmpq.topics import Topics
from fedmpq.wire.signing import load_keyring


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmpq agent", description=__doc__)
    p.add_argument(
        "--broker",
        default=os.environ.get("FEDMPQ_BROKER"),
        required="FEDMPQ_BROKER" not in os.environ,
        help="mqtt://[USER:PASSWORD@]HOST:PORT (mqtts:// for TLS); default $FEDMPQ_BROKER,"
        " which keeps the password off the command line",
    )
    p.add_argument(
        "--ca-file",
        default=os.environ.get("FEDMPQ_CA_FILE") or None,
        help="CA certificate that signed the broker's (mqtts://); default $FEDMPQ_CA_FILE",
    )
    p.add_argument("--client-id", help="this device's id (default: PREFIX-INDEX)")
    p.add_argument("--clients", type=int, default=1, help="devices to host in this process")
    p.add_argument("--id-prefix", default="device", help="id prefix for hosted devices")
    p.add_argument("--first-index", type=int, default=0, help="index of the first hosted device")
    p.add_argument(
        "--data",
        default="fashion-mnist-small",
        help="data set: fashion-mnist-small | idx:DIR | cifar10-bin:DIR | folder:DIR"
        " | module:PKG.MOD:FUNC",
    )
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
    p.add_argument(
        "--num-partitions", type=int, default=1, help="split the data among this many devices"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the partition and local training")
    p.add_argument("--topic-prefix", default="fedmpq")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    p.add_argument("--run-id", default="", help="only take part in this run")
    p.add_argument("--exit-when-done", action="store_true", help="exit when the run finishes")
    p.add_argument("--report", type=Path, help="append one JSON line per update sent")
    p.add_argument(
        "--keys", type=Path, help="device key file (fedmpq keys); each device signs with its key"
    )
    p.add_argument(
        "--model-dir",
        default=str(default_model_dir()),
        help="where to keep the trained ONNX model the coordinator publishes ('' = don't);"
        " default $FEDMPQ_MODEL_DIR or ~/.local/share/fedmpq",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
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
    p.add_argument("--log-level", default="INFO")
    return p


def make_devices(args: argparse.Namespace) -> tuple[list[Device], int, tuple[int, int, int]]:
    data = load_dataset(args.data)
    scheme, params = parse_partition(args.partition)
    last = args.first_index + args.clients
    if last > max(args.num_partitions, 1):
        raise FedmpqError(f"devices {args.first_index}..{last - 1} need --num-partitions >= {last}")
    parts = partition(data.train.y, max(args.num_partitions, 1), scheme, seed=args.seed, **params)
    profile = measure_profile()
    fleet = None
    if args.fleet is not None:
        fleet = load_fleet(args.fleet).assign(max(args.num_partitions, last), seed=args.seed)
    keys = load_keyring(args.keys) if args.keys else {}
    devices = []
    for index in range(args.first_index, last):
        client_id = (
            args.client_id
            if args.client_id and args.clients == 1
            else f"{args.id_prefix}-{index:04d}"
        )
        x, y = subset(data.train, parts[index]).tensors()
        if keys and client_id not in keys:
            raise FedmpqError(f"{args.keys} holds no key for device {client_id}")
        device = Device(
            client_id, x, y, profile, seed=args.seed * 7919 + index, key=keys.get(client_id)
        )
        if fleet is not None:
            # The host's figure comes from the same probe a real device runs on itself.
            seed = f"{args.seed}:{client_id}"
            device.emulation = EmulatedDevice(
                fleet[index], profile.gflops, seed, args.realtime, args.compute_time
            )
            device.profile = device.emulation.reported_profile()
        devices.append(device)
    return devices, data.num_classes, data.in_shape


def _broker(args: argparse.Namespace) -> BrokerAddress:
    """``--broker``, with ``--ca-file`` (if given) in place of the URL's ``?ca=``."""
    address = BrokerAddress.parse(args.broker)
    if args.ca_file is None:
        return address
    return dataclasses.replace(address, ca_file=args.ca_file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    raise_fd_limit(2 * args.clients + 64)  # a socket per hosted device, plus files
    try:
        devices, num_classes, in_shape = make_devices(args)
        options = AgentOptions(
            broker=_broker(args),
            topics=Topics(args.topic_prefix),
            num_classes=num_classes,
            in_shape=in_shape,
            protocol=args.protocol,
            run_id=args.run_id,
            exit_when_done=args.exit_when_done,
            report_path=args.report,
            model_dir=Path(args.model_dir) if args.model_dir else None,
        )
        runtime = AgentRuntime(devices, options)
        signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
        runtime.run()
    except FedmpqError as exc:
        print(f"fedmpq agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
