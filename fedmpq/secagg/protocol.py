"""A whole secure-aggregation round without a transport: devices and coordinator in one
process, messages handed over as the MQTT topics would carry them.

This is the reference for wiring the steps into the round engine, and what the tests and
the benchmark run.  Devices can drop at each step: after advertising keys but before
sharing them (never in the sum, never masked against), after sharing but before sending
their masked input (not in the sum; their pairwise masks are removed from the survivors'
inputs with their reconstructed mask key) or after sending it (in the sum; their self mask
is removed with their reconstructed seed, they just do not help unmask).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from fedmpq.secagg.coordinator import SecureAggregation, SecureSum
from fedmpq.secagg.device import DeviceSession
from fedmpq.secagg.messages import SecAggSetup


@dataclass(frozen=True)
class Dropouts:
    """Devices that stop answering, by the step they stop before."""

    before_sharing: frozenset[str] = field(default_factory=frozenset)
    before_sending: frozenset[str] = field(default_factory=frozenset)
    after_sending: frozenset[str] = field(default_factory=frozenset)


def simulate_round(
    setup: SecAggSetup,
    codes: Mapping[str, Mapping[str, np.ndarray]],
    bits: Mapping[str, Mapping[str, int]],
    dropouts: Dropouts | None = None,
    cpu_seconds: MutableMapping[str, float] | None = None,
) -> SecureSum:
    """Run one round: every selected device masks ``codes[device]`` at ``bits[device]``.

    Parameters
    ----------
    setup
        The round's setup; every device in it must have ``codes`` and ``bits``.
    codes, bits
        Per device, per layer: signed grid codes and the precision they are at.
    dropouts
        Who drops when; default nobody.
    cpu_seconds
        If given, CPU seconds are added to it per step and side: ``device_keys``,
        ``device_shares``, ``device_mask``, ``device_unmask`` (summed over devices) and
        ``coordinator_keys``, ``coordinator_shares``, ``coordinator_sum``,
        ``coordinator_unmask``.

    Returns
    -------
    SecureSum
        The integer sum of the inputs that arrived, unmasked.

    Raises
    ------
    SecAggError
        If a step is left with fewer devices than the threshold.
    """
    drop = dropouts or Dropouts()
    clock = _Clock(cpu_seconds)
    server, devices = _advertise_keys(setup, clock)
    _share_keys(server, devices, drop, clock)
    _send_masked_inputs(server, devices, codes, bits, drop, clock)
    _unmask(server, devices, drop, clock)
    with clock("coordinator_unmask"):
        return server.result()


def _advertise_keys(
    setup: SecAggSetup, clock: _Clock
) -> tuple[SecureAggregation, dict[str, DeviceSession]]:
    """Steps 1-2: the coordinator and every selected device, each device's keys collected."""
    with clock("coordinator_keys"):
        server = SecureAggregation(setup)
    devices = {}
    for cid in setup.client_ids:
        with clock("device_keys"):
            devices[cid] = DeviceSession(cid, setup)
            keys = devices[cid].advertise()
        with clock("coordinator_keys"):
            server.add_keys(keys)
    return server, devices


def _share_keys(
    server: SecureAggregation, devices: Mapping[str, DeviceSession], drop: Dropouts, clock: _Clock
) -> None:
    """Step 3: the roster goes out; devices still there send their encrypted shares."""
    with clock("coordinator_keys"):
        roster = server.roster()
    for entry in roster.keys:
        if entry.client_id in drop.before_sharing:
            continue
        with clock("device_shares"):
            shares = devices[entry.client_id].share_keys(roster)
        with clock("coordinator_shares"):
            server.add_shares(shares)


def _send_masked_inputs(
    server: SecureAggregation,
    devices: Mapping[str, DeviceSession],
    codes: Mapping[str, Mapping[str, np.ndarray]],
    bits: Mapping[str, Mapping[str, int]],
    drop: Dropouts,
    clock: _Clock,
) -> None:
    """Step 4: shares are forwarded; devices still there send their masked inputs."""
    with clock("coordinator_shares"):
        inboxes = server.forward_shares()
    for inbox in inboxes:
        cid = inbox.client_id
        if cid not in drop.before_sending:
            with clock("device_mask"):
                masked = devices[cid].masked_input(inbox, codes[cid], bits[cid])
            with clock("coordinator_sum"):
                server.add_masked_input(masked)


def _unmask(
    server: SecureAggregation, devices: Mapping[str, DeviceSession], drop: Dropouts, clock: _Clock
) -> None:
    """Step 5: survivors still there answer the unmasking request."""
    with clock("coordinator_unmask"):
        request = server.unmask_request()
    for cid in request.survivors:
        if cid not in drop.after_sending:
            with clock("device_unmask"):
                response = devices[cid].unmask(request)
            with clock("coordinator_unmask"):
                server.add_unmask_response(response)


@dataclass
class _Clock:
    """Adds the CPU time of each ``with clock(step):`` block to ``totals[step]``, if kept."""

    totals: MutableMapping[str, float] | None

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            if self.totals is not None:
                self.totals[step] = self.totals.get(step, 0.0) + time.process_time() - start
