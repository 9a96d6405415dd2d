"""The shipped broker configuration: mosquitto with deploy/mosquitto's authentication and
ACL lines (TLS left out: the test listener is plain), passwords made by
deploy/make-credentials.sh, a real coordinator and agent, and raw MQTT clients."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from one_round import run_one_round

from fedmpq.broker import MosquittoBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BEGIN = "# --- authentication and authorisation"
END = "# --- end of authentication and authorisation"


def shipped_auth_lines(passwd: Path) -> list[str]:
    """The auth block of deploy/mosquitto/fedmpq.conf, with this test's file paths."""
    text = (DEPLOY / "mosquitto" / "fedmpq.conf").read_text()
    block = text[text.index(BEGIN) : text.index(END)].splitlines()[1:]
    paths = {"password_file": str(passwd), "acl_file": str(DEPLOY / "mosquitto" / "fedmpq.acl")}
    lines = []
    for line in block:
        key = line.split(" ", 1)[0]
        if line and not line.startswith("#"):
            lines.append(f"{key} {paths[key]}" if key in paths else line)
    assert {"allow_anonymous", "password_file", "acl_file"} <= {ln.split()[0] for ln in lines}
    return lines


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    out = tmp_path_factory.mktemp("creds")
    subprocess.run(
        ["bash", str(DEPLOY / "make-credentials.sh"), "--out", str(out), "dev1", "dev2"],
        check=True, capture_output=True,
    )  # fmt: skip
    # mosquitto drops root privileges before reading the file: make it readable (as
    # deploy/README.md installs it: group mosquitto, mode 640).
    # pytest's own temporary tree is private to its user, so the file goes elsewhere.
    shared = Path(tempfile.mkdtemp(prefix="fedmpq-passwd-"))
    shared.chmod(0o755)
    passwd = shared / "fedmpq.passwd"
    shutil.copy(out / "fedmpq.passwd", passwd)
    passwd.chmod(0o644)
    yield {p.name: p.read_text() for p in (out / "passwords").iterdir()} | {"_passwd": str(passwd)}
    shutil.rmtree(shared)


@pytest.fixture(scope="module")
def broker(credentials):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(extra_config=shipped_auth_lines(Path(credentials["_passwd"])))
    broker.start()
    yield broker
    broker.stop()


def _url(broker, user: str, password: str) -> str:
    return f"mqtt://{user}:{password}@{broker.host}:{broker.port}"


class Client:
    """A raw paho client that records what it receives."""

    def __init__(self, broker, user: str, password: str) -> None:
        self.connected = threading.Event()
        self.reason: object = None
        self.received: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties):
        self.reason = reason
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.got:
            self.received.append((msg.topic, msg.payload))
            self.got.notify_all()

    def wait_for(self, payload: bytes, timeout: float = 10.0) -> bool:
        with self.got:
            return self.got.wait_for(lambda: any(p == payload for _, p in self.received), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_wrong_password_is_refused(broker, credentials):
    bad = Client(broker, "dev1", credentials["dev1"] + "x")
    try:
        assert bad.connected.wait(10)
        assert bad.reason.is_failure
        good = Client(broker, "dev1", credentials["dev1"])
        assert good.connected.wait(10) and not good.reason.is_failure
        good.close()
    finally:
        bad.close()


def test_device_cannot_publish_on_another_devices_topic(broker, credentials):
    coordinator = Client(broker, "coordinator", credentials["coordinator"])
    dev1 = Client(broker, "dev1", credentials["dev1"])
    dev2 = Client(broker, "dev2", credentials["dev2"])
    try:
        for c in (coordinator, dev1, dev2):
            assert c.connected.wait(10) and not c.reason.is_failure
        coordinator.client.subscribe("fedmpq/update/+", qos=1)
        # dev2 may not read dev1's tasks either: its subscription is refused by the ACL.
        dev2.client.subscribe("fedmpq/task/dev1", qos=1)
        dev2.client.publish("fedmpq/update/dev1", b"forged", qos=1).wait_for_publish(10)
        coordinator.client.publish("fedmpq/task/dev1", b"task", qos=1).wait_for_publish(10)
        dev1.client.publish("fedmpq/update/dev1", b"genuine", qos=1).wait_for_publish(10)
        # The genuine update arrives after the forged one was handled by the broker.
        assert coordinator.wait_for(b"genuine")
        assert all(p != b"forged" for _, p in coordinator.received)
        assert all(p != b"task" for _, p in dev2.received)
    finally:
        for c in (coordinator, dev1, dev2):
            c.close()


def test_round_with_passwords_delivers_the_onnx_model(broker, credentials, tmp_path):
    agent_broker = ["--broker", _url(broker, "dev1", credentials["dev1"])]
    coordinator_url = _url(broker, "coordinator", credentials["coordinator"])
    _, stored = run_one_round(tmp_path, "deploy", "cnn", agent_broker, coordinator_url)
    assert set(stored.bits.values()) == {4}
