"""Shared fixtures: a real mosquitto broker per test, and an MQTT loop.

Tests under ``tests/integration`` are marked ``integration`` automatically, so
``pytest -m "not integration"`` runs the fast, broker-free suite.

Without a mosquitto binary the broker fixtures skip; CI sets
``FEDMPQ_REQUIRE_MOSQUITTO=1`` to turn that skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import settings

from fedmpq.broker import MosquittoBroker, find_mosquitto
from fedmpq.mqtt import MqttLoop

# .ci/run sets HYPOTHESIS_PROFILE=ci: CI draws the same examples every run, so a red build
# means a change broke something; a plain `pytest` (and the fuzz campaign in benchmarks/)
# keeps drawing new ones, which is where new failing examples are found and then pinned.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_INTEGRATION_DIR = Path(__file__).parent / "integration"
_DEPLOY_CONF = Path(__file__).parent.parent / "deploy" / "mosquitto" / "fedmpq.conf"


def shipped_queue_lines() -> list[str]:
    """The queue limits of deploy/mosquitto/fedmpq.conf.  mosquitto's default drops QoS 1
    messages past 1000 queued for one client, and the coordinator is one client for the
    whole fleet: a flood of registrations lost a real device's update (the flaky
    test_register_flood_selects_no_fake).  Every test broker runs what we ship."""
    text = _DEPLOY_CONF.read_text()
    block = text[text.index("# --- queues") : text.index("# --- end of queues")]
    lines = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    assert {ln.split()[0] for ln in lines} == {"max_queued_messages", "max_queued_bytes"}
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True, scope="session")
def _agent_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Agents started by tests store received ONNX models here, not in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMPQ_MODEL_DIR", str(tmp_path_factory.mktemp("agent-model")))
        yield


def _require_mosquitto() -> None:
    if find_mosquitto() is not None:
        return
    reason = "mosquitto is not installed (apt-get install mosquitto)"
    if os.environ.get("FEDMPQ_REQUIRE_MOSQUITTO") == "1":
        pytest.fail(f"{reason}, and FEDMPQ_REQUIRE_MOSQUITTO=1 requires it")
    pytest.skip(reason)


@contextlib.contextmanager
def _broker_pool() -> Iterator[Callable[..., MosquittoBroker]]:
    _require_mosquitto()
    brokers: list[MosquittoBroker] = []

    def make(extra_config: Sequence[str] = ()) -> MosquittoBroker:
        # A test's own lines come later: they win over the shipped queue limits.
        broker = MosquittoBroker(extra_config=[*shipped_queue_lines(), *extra_config])
        brokers.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture
def mosquitto_factory() -> Iterator[Callable[..., MosquittoBroker]]:
    """Start mosquitto brokers with extra config lines; all are stopped after the test.

    ``make(extra_config=("max_packet_size 10000",))`` returns a running broker.
    """
    with _broker_pool() as make:
        yield make


@pytest.fixture(scope="module")
def module_mosquitto() -> Iterator[MosquittoBroker]:
    """One mosquitto shared by a test module's expensive end-to-end runs."""
    with _broker_pool() as make:
        yield make()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A fresh mosquitto on 127.0.0.1 and a free port, anonymous, no persistence, with the
    shipped queue limits."""
    return mosquitto_factory()


@pytest.fixture
def mqtt_loop() -> Iterator[MqttLoop]:
    """A running MqttLoop; stopping it closes the test's connections."""
    with MqttLoop() as loop:
        yield loop
