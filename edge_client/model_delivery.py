"""Receive the trained model the coordinator publishes, without torch.

The coordinator publishes a ``ModelMessage`` (ONNX bytes and their SHA-256 fingerprint),
retained, on ``{prefix}/model`` after a run.  :func:`fetch_model` connects, takes that
message, checks it and stores it with :class:`~edge_client.model_store.ModelStore`: what an
inference-only device (``pip install fedmpq``, no torch) needs before ``fedmpq agent
predict``.  The training agent stores the same message the same way while it runs.
"""

from __future__ import annotations

import logging
import threading

from edge_client.model_store import ModelStore, ModelStoreError, StoredModel
from fedmpq.errors import DecodeError
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.topics import Topics
from fedmpq.wire.codec import DecodeLimits, decode
from fedmpq.wire.messages import ModelMessage

log = logging.getLogger("fedmpq.agent")


def store_model_message(
    payload: bytes, store: ModelStore, *, run_id: str = "", limits: DecodeLimits | None = None
) -> StoredModel | None:
    """Decode a ``ModelMessage`` frame, verify its fingerprint and make it current.

    Returns ``None`` for a model of another run than ``run_id`` (``""``: any run).

    Raises
    ------
    DecodeError
        For a malformed frame.
    ModelStoreError
        If the ONNX bytes do not match the fingerprint (nothing is stored).
    """
    msg = decode(payload, ModelMessage, limits or DecodeLimits())
    if run_id and msg.run_id != run_id:
        return None
    return store.save_message(msg)


def fetch_model(
    broker: BrokerAddress,
    store: ModelStore,
    *,
    client_id: str,
    topics: Topics | None = None,
    run_id: str = "",
    timeout: float = 60.0,
) -> StoredModel:
    """Wait for the published model, verify it and store it.

    Parameters
    ----------
    broker
        Where the coordinator publishes (``mqtts://`` with the device's credentials).
    store
        The device's model directory.
    client_id
        This device's MQTT client id (its user name on a broker with ACLs).
    topics
        Topic layout (default prefix ``fedmpq``).
    run_id
        Only accept the model of this run (``""``: whichever is published).
    timeout
        Seconds to wait for a valid model.

    Raises
    ------
    ModelStoreError
        If no valid model arrived within ``timeout`` (the last rejection says why).
    """
    topics = topics or Topics()
    catcher = _ModelCatcher(store, client_id, run_id)
    with MqttLoop("fedmpq-fetch") as loop:
        connection = Connection(loop, broker, client_id, on_message=catcher.on_message)
        connection.subscribe(topics.model, qos=1)
        connection.connect()
        try:
            arrived = catcher.done.wait(timeout)
        finally:
            connection.close()
    if not arrived:
        why = f"; last rejected: {catcher.rejected[-1]}" if catcher.rejected else ""
        raise ModelStoreError(
            f"no model{f' of run {run_id}' if run_id else ''} arrived on {topics.model} "
            f"from {broker.url} within {timeout:g} s{why}"
        )
    return catcher.stored[0]


class _ModelCatcher:
    """Stores the first valid model message of the run and sets ``done``; keeps why the
    others were rejected."""

    def __init__(self, store: ModelStore, client_id: str, run_id: str) -> None:
        self.store = store
        self.client_id = client_id
        self.run_id = run_id
        self.done = threading.Event()
        self.stored: list[StoredModel] = []
        self.rejected: list[str] = []

    def on_message(self, connection: Connection, topic: str, payload: bytes) -> None:
        if self.done.is_set():
            return
        try:
            stored = store_model_message(payload, self.store, run_id=self.run_id)
        except (DecodeError, ModelStoreError) as exc:
            self.rejected.append(str(exc))
            log.warning("%s: rejected model message: %s", self.client_id, exc)
            return
        if stored is not None:
            self.stored.append(stored)
            self.done.set()
