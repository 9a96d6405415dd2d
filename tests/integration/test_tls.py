"""TLS as shipped: credentials from deploy/make-credentials.sh, mosquitto with
deploy/mosquitto/fedmpq.conf (its paths and ports adapted to this test), a real coordinator
and agent doing a round over TLS, and the connections the broker must refuse."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from one_round import run_one_round

from fedmpq.broker import MosquittoBroker, find_mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _make_credentials(out: Path, *devices: str) -> None:
    subprocess.run(
        ["bash", str(DEPLOY / "make-credentials.sh"), "--out", str(out),
         "--server-name", "127.0.0.1", "--client-certs", *devices],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    # mosquitto drops root privileges before reading its files, and pytest's temporary tree
    # is private to its user: the broker's copies go to a world-readable directory.
    shared = Path(tempfile.mkdtemp(prefix="fedmpq-tls-"))
    shared.chmod(0o755)
    ours, other = shared / "ours", tmp_path_factory.mktemp("other-ca")
    _make_credentials(ours, "dev1")
    _make_credentials(other, "dev1")  # a second fleet: another CA, another dev1 certificate
    for path in ours.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    ours.chmod(0o755)
    passwords = {p.name: p.read_text() for p in (ours / "passwords").iterdir()}
    yield {"dir": ours, "other": other, "passwords": passwords}
    shutil.rmtree(shared)


def shipped_config(creds_dir: Path, tls_port: int, *, require_certificate: bool) -> list[str]:
    """deploy/mosquitto/fedmpq.conf with this test's files and ports.

    The shipped loopback listener is the test broker's own (``MosquittoBroker`` writes it);
    persistence is off.  ``require_certificate`` uncomments the client-certificate line.
    """
    paths = {
        "certfile": creds_dir / "server.crt",
        "keyfile": creds_dir / "server.key",
        "cafile": creds_dir / "ca.crt",
        "password_file": creds_dir / "fedmpq.passwd",
        "acl_file": DEPLOY / "mosquitto" / "fedmpq.acl",
    }
    lines = []
    for raw in (DEPLOY / "mosquitto" / "fedmpq.conf").read_text().splitlines():
        line = raw.strip()
        if require_certificate and line == "#require_certificate true":
            line = line[1:]
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener" and value == "8883":
            lines.append(f"listener {tls_port} 127.0.0.1")
        elif key == "listener" or key.startswith("persistence"):
            assert key != "listener" or value.endswith("127.0.0.1"), "a plain public listener"
        else:
            lines.append(f"{key} {paths[key]}" if key in paths else line)
    assert any(ln.startswith("require_certificate") for ln in lines) == require_certificate
    return lines


def _start(creds, *, require_certificate: bool) -> tuple[MosquittoBroker, int]:
    tls_port = free_port()
    broker = MosquittoBroker(
        extra_config=shipped_config(creds["dir"], tls_port, require_certificate=require_certificate)
    )
    broker.start()
    return broker, tls_port


@pytest.fixture(scope="module")
def tls_broker(creds):
    broker, tls_port = _start(creds, require_certificate=False)
    yield broker, tls_port
    broker.stop()


def _tls_url(creds, user: str, port: int) -> str:
    ca = creds["dir"] / "ca.crt"
    return f"mqtts://{user}:{creds['passwords'][user]}@127.0.0.1:{port}?ca={ca}"


def attempt(
    port: int,
    user: str,
    password: str,
    *,
    host: str = "127.0.0.1",
    ca: Path | None = None,
    cert: Path | None = None,
) -> str:
    """Connect a raw paho client; ``"connected"`` or why it was refused."""
    done = threading.Event()
    outcome: list[str] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)

    def on_connect(client, userdata, flags, reason, properties):
        outcome.append(f"refused: {reason}" if reason.is_failure else "connected")
        done.set()

    def on_disconnect(client, userdata, flags, reason, properties):
        outcome.append(f"disconnected: {reason}")
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    if ca is not None:
        client.tls_set(
            ca_certs=str(ca),
            certfile=None if cert is None else str(cert),
            keyfile=None if cert is None else str(cert.with_suffix(".key")),
        )
    try:
        client.connect(host, port)
    except (OSError, ssl.SSLError) as exc:  # TCP refused or the TLS handshake failed
        return f"refused: {type(exc).__name__}: {exc}"
    client.loop_start()
    try:
        assert done.wait(15), "neither CONNACK nor disconnect"
        if outcome[0] == "connected":
            # With TLS 1.3 a rejected client certificate surfaces after the handshake:
            # make a round trip so that a dropped connection shows.
            got = threading.Event()
            client.on_subscribe = lambda *args: got.set()
            client.subscribe("fedmpq/control", qos=1)
            if not got.wait(10):
                return "refused: no SUBACK"
        return outcome[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_round_over_tls_delivers_the_model(tls_broker, creds, tmp_path):
    _, tls_port = tls_broker
    # The agent names its CA with the flag, the coordinator in the URL: both forms work.
    agent_broker = [
        "--broker", f"mqtts://dev1:{creds['passwords']['dev1']}@127.0.0.1:{tls_port}",
        "--ca-file", str(creds["dir"] / "ca.crt"),
    ]  # fmt: skip
    coordinator_url = _tls_url(creds, "coordinator", tls_port)
    coordinator, _ = run_one_round(tmp_path, "tls", "mlp", agent_broker, coordinator_url)
    assert "mqtts://127.0.0.1" in coordinator.stderr + coordinator.stdout


def test_tls_listener_refuses_what_it_must(tls_broker, creds):
    broker, tls_port = tls_broker
    password = creds["passwords"]["dev1"]
    assert attempt(tls_port, "dev1", password, ca=creds["dir"] / "ca.crt") == "connected"
    # A device that trusts another CA does not accept this broker's certificate.
    refused = attempt(tls_port, "dev1", password, ca=creds["other"] / "ca.crt")
    assert refused.startswith("refused") and "certificate verify failed" in refused
    # Plain MQTT on the TLS port: the broker waits for a TLS handshake and drops it.
    assert attempt(tls_port, "dev1", password) != "connected"
    # The plain listener is the coordinator's, on loopback only: no other address reaches it.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", broker.port), timeout=5).close()
    # A good certificate with a wrong password is still refused.
    assert attempt(tls_port, "dev1", password + "x", ca=creds["dir"] / "ca.crt") != "connected"


def test_required_client_certificate_must_come_from_the_fleet_ca(creds):
    broker, tls_port = _start(creds, require_certificate=True)
    try:
        password, ca = creds["passwords"]["dev1"], creds["dir"] / "ca.crt"
        ours = creds["dir"] / "clients" / "dev1.crt"
        theirs = creds["other"] / "clients" / "dev1.crt"
        assert attempt(tls_port, "dev1", password, ca=ca, cert=ours) == "connected"
        assert "certificate verify failed" not in broker.log
        assert attempt(tls_port, "dev1", password, ca=ca, cert=theirs) != "connected"
        assert "certificate verify failed" in broker.log  # refused for its certificate
        assert attempt(tls_port, "dev1", password, ca=ca) != "connected"
    finally:
        broker.stop()
