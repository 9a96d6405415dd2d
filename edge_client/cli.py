"""Run the devices an agent command line names (``fedmpq agent``; parsed in
``edge_client.agent_cli``, before torch is imported here)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import torch

from edge_client.device import Device, RealDevice
from edge_client.emulated_device import EmulatedDevice
from edge_client.emulation import ProfileBinding, raise_fd_limit
from edge_client.profiling import measure_profile
from edge_client.runtime import AgentOptions, AgentRuntime
from edge_client.task import TaskLimits
from fedmpq.cli_common import broker_address, configure_logging
from fedmpq.data.datasets import load_dataset, subset
from fedmpq.data.partition import parse_partition, partition
from fedmpq.errors import FedmpqError
from fedmpq.profiles import load_fleet
from fedmpq.topics import Topics
from fedmpq.wire.signing import KeyFile, load_key_file


def make_devices(
    args: argparse.Namespace, keyfile: KeyFile | None = None, stop: threading.Event | None = None
) -> tuple[list[Device], int, tuple[int, int, int]]:
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
    keys = keyfile.keys if keyfile is not None else {}
    limits = TaskLimits(max_epochs=args.max_epochs, max_batch_size=args.max_batch_size)
    devices: list[Device] = []
    for index in range(args.first_index, last):
        client_id = (
            args.client_id
            if args.client_id and args.clients == 1
            else f"{args.id_prefix}-{index:04d}"
        )
        x, y = subset(data.train, parts[index]).tensors()
        if keys and client_id not in keys:
            raise FedmpqError(f"{args.keys} holds no key for device {client_id}")
        device = RealDevice(
            client_id, x, y, profile, seed=args.seed * 7919 + index, key=keys.get(client_id),
            limits=limits, stop=stop,
        )  # fmt: skip
        if fleet is None:
            devices.append(device)
            continue
        # The host's figure comes from the same probe a real device runs on itself.
        binding = ProfileBinding(
            fleet[index],
            host_gflops=profile.gflops,
            seed=f"{args.seed}:{client_id}",
            realtime=args.realtime,
            compute_time=args.compute_time,
        )
        devices.append(EmulatedDevice(device, binding))
    return devices, data.num_classes, data.in_shape


def run_agent(args: argparse.Namespace) -> int:
    """Run the devices of a checked command line (``edge_client.agent_cli.parse_args``)."""
    configure_logging(args.log_level)
    torch.set_num_threads(args.threads)
    raise_fd_limit(2 * args.clients + 64)  # a socket per hosted device, plus files
    try:
        keyfile = load_key_file(args.keys) if args.keys else None
        stop = threading.Event()  # SIGTERM: training stops between batches
        devices, num_classes, in_shape = make_devices(args, keyfile, stop)
        options = AgentOptions(
            broker=broker_address(args),
            topics=Topics(args.topic_prefix),
            num_classes=num_classes,
            in_shape=in_shape,
            protocol=args.protocol,
            run_id=args.run_id,
            exit_when_done=args.exit_when_done,
            report_path=args.report,
            model_dir=Path(args.model_dir) if args.model_dir else None,
            coordinator_key=keyfile.require_public(args.keys) if keyfile is not None else None,
            secure_dump=args.secure_dump,
        )
        runtime = AgentRuntime(devices, options)

        def on_sigterm(*_: object) -> None:
            stop.set()
            runtime.stop()

        signal.signal(signal.SIGTERM, on_sigterm)
        runtime.run()
    except FedmpqError as exc:
        print(f"fedmpq agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
