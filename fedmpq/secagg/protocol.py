"""A whole secure-aggregation round without a transport: devices and coordinator in one
process, messages handed over as the MQTT topics would carry them.

This is the reference for wiring the steps into the round engine, and what the tests and
the benchmark run.  Devices can drop at each step: before sharing keys (never in the
sum, never masked against), after sharing but before sending their masked input (not in
the sum; their pairwise masks are removed from the survivors' inputs with their
reconstructed mask key) or after sending it (in the sum; their self mask is removed with
their reconstructed seed, they just do not help unmask).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    server = SecureAggregation(setup)
    devices = {cid: DeviceSession(cid, setup) for cid in setup.client_ids}

    for cid, device in devices.items():
        if cid not in drop.before_sharing:
            server.add_keys(device.advertise())
    roster = server.roster()
    for entry in roster.keys:
        cid = entry.client_id
        if cid not in drop.before_sharing:
            server.add_shares(devices[cid].share_keys(roster))
    for inbox in server.forward_shares():
        cid = inbox.client_id
        if cid not in drop.before_sending:
            server.add_masked_input(devices[cid].masked_input(inbox, codes[cid], bits[cid]))
    request = server.unmask_request()
    for cid in request.survivors:
        if cid not in drop.after_sending:
            server.add_unmask_response(devices[cid].unmask(request))
    return server.result()
