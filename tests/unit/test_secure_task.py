"""The agent's side of a secure round (edge_client.secure_task): keys at once, the masked
input when both the shares and the codes are there (either order), the same answer to a
re-sent question, the coordinator's frames read through the downlink check, and the
device's own dump readable without pickle."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge_client.device import SecureCodes
from edge_client.downlink_check import DownlinkCheck, RateLimitedLog
from edge_client.secure_task import SecureTask, answer_frame, dump_codes
from fedmpq.secagg import LayerGrid, SecAggError, SecAggSetup, SecureAggregation
from fedmpq.secagg.grid import device_codes
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmpq.wire.codec import DEFAULT_LIMITS, encode
from fedmpq.wire.messages import TaskMessage

IDS = ["a", "b", "c"]
SETUP = SecAggSetup("run", 4, IDS, 2, [LayerGrid("w", 6, 4, 1.0), LayerGrid("b", 2, 8, 0.5)])


def task(cid: str, setup: SecAggSetup | None = SETUP) -> TaskMessage:
    return TaskMessage(
        "run", 4, cid, "mlp", "fp", "fixed", {"w": 2}, "symmetric", True, 1, 8, 0.1, 60.0,
        False, secagg=setup,
    )  # fmt: skip


def codes(cid: str) -> SecureCodes:
    state = {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.array([0.1, -0.2])}
    return SecureCodes(*device_codes(state, SETUP, {"w": 2}, np.random.default_rng(len(cid))))


class Round:
    """Three devices' SecureTasks and the coordinator's protocol object between them."""

    def __init__(self) -> None:
        self.server = SecureAggregation(SETUP)
        self.sent: dict[str, list[object]] = {cid: [] for cid in IDS}
        self.devices = {cid: SecureTask(task(cid), self.sent[cid].append) for cid in IDS}
        for d in self.devices.values():
            d.advertise()
        for cid in IDS:
            self.server.add_keys(self.last(cid, AdvertiseKeys))
        roster = self.server.roster()
        for cid in IDS:
            self.devices[cid].answer(roster)
            self.server.add_shares(self.last(cid, ShareKeys))

    def last(self, cid: str, kind: type) -> object:
        msg = self.sent[cid][-1]
        assert isinstance(msg, kind)
        return msg


def test_the_masked_input_goes_out_once_both_shares_and_codes_are_there():
    r = Round()
    inboxes = {i.client_id: i for i in r.server.forward_shares()}
    r.devices["a"].answer(inboxes["a"])  # shares first ...
    assert isinstance(r.sent["a"][-1], ShareKeys)
    r.devices["a"].trained(codes("a"))  # ... then the codes
    r.devices["b"].trained(codes("b"))  # codes first ...
    assert isinstance(r.sent["b"][-1], ShareKeys)
    r.devices["b"].answer(inboxes["b"])  # ... then the shares
    masked = {cid: r.last(cid, MaskedInput) for cid in "ab"}
    r.devices["a"].answer(inboxes["a"])  # asked again: the same answer
    assert r.sent["a"][-1] == masked["a"]
    for m in masked.values():
        r.server.add_masked_input(m)
    request = r.server.unmask_request()
    assert request.dropped == ["c"]
    for cid in "ab":
        r.devices[cid].answer(request)
        r.server.add_unmask_response(r.last(cid, UnmaskResponse))
    total = r.server.result()
    for layer in SETUP.layers:
        mine = [codes(c) for c in "ab"]
        plain = sum(
            m.codes[layer.name].reshape(-1) << (layer.bits - m.bits[layer.name]) for m in mine
        )
        assert np.array_equal(total.codes[layer.name], plain)


def test_a_task_whose_setup_is_for_another_round_is_refused():
    other = SecAggSetup("run", 5, IDS, 2, SETUP.layers)
    with pytest.raises(SecAggError, match="another round"):
        SecureTask(task("a", other), lambda m: None)


def test_questions_arrive_through_the_downlink_check(caplog):
    r = Round()
    device = r.devices["a"]
    check = DownlinkCheck(None, RateLimitedLog())
    inbox = next(i for i in r.server.forward_shares() if i.client_id == "a")
    assert not answer_frame(device, check, "a", encode(task("a")), DEFAULT_LIMITS)  # a task
    assert answer_frame(device, check, "a", encode(inbox), DEFAULT_LIMITS)
    device.trained(codes("a"))
    assert isinstance(r.sent["a"][-1], MaskedInput)
    with caplog.at_level(logging.WARNING, logger="fedmpq.agent"):
        assert answer_frame(device, check, "a", b"\x93garbage", DEFAULT_LIMITS) is False
        forged = UnmaskRequest("run", 4, ["a", "b", "c"], ["c"])  # "c" both: unmasks it
        assert answer_frame(device, check, "a", encode(forged), DEFAULT_LIMITS)
    assert "refused secure-aggregation step" in caplog.text
    assert isinstance(r.sent["a"][-1], MaskedInput)  # nothing revealed


def test_the_dump_is_the_devices_codes_and_grid_without_pickle(tmp_path):
    path = dump_codes(tmp_path, "a", task("a"), codes("a"))
    with np.load(path, allow_pickle=False) as saved:
        assert np.array_equal(saved["codes/w"], codes("a").codes["w"])
        assert saved["codes/w"].shape == (2, 3)
        assert list(saved["grid/w"]) == [2.0, 4.0, 1.0]
